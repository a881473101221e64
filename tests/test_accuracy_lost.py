"""docs/benefit/accuracy_lost.py: the accuracy-lost readings of docs/benefit.md, recomputed from the committed runs.

Each number checked here is quoted in docs/benefit.md (or docs/variants/msam.md) beside the command that gives it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from testing_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
BENEFIT = ROOT / "docs" / "benefit"


@pytest.fixture(scope="module")
def lost():
    pytest.importorskip("scipy")  # the t quantile of the benchmark's `paired`
    module = load_script(BENEFIT / "accuracy_lost.py", "accuracy_lost_under_test")

    def rows(*argv: str) -> dict[tuple[str, str], dict]:
        return {(r["method"], r["measure"]): r for r in module.main(list(argv))}

    return rows


def points(d: dict) -> tuple[float, float, float]:
    return tuple(round(100 * d[k], 1) for k in ("mean", "low", "high"))


def test_lost_is_accuracy_minus_accuracy_after_paired_by_seed(lost):
    rows = lost("--task", "smollm", "--noise", "0.0")
    sam = rows[("sam", "noise_0.1")]
    assert sam["seeds"] == 3 and round(100 * sam["adamw_lost"], 1) == 31.5 and round(100 * sam["lost"], 1) == 36.8
    assert points(sam["lost_diff"]) == (5.3, 1.3, 9.3)
    assert points(sam["after_diff"]) == (-4.7, -7.3, -2.1)  # the table's reading, for comparison
    # at sigma = 0.1 on clean answers, three of the seven gradient-direction methods lose more beyond the noise
    gradient_methods = ["sam", "asam", "friendly", "preconditioned", "functional", "looksam"]
    gradient_methods += ["functional_preconditioned"]
    excluding = [m for m in gradient_methods if rows[(m, "noise_0.1")]["lost_diff"]["low"] > 0]
    assert sorted(excluding) == ["functional", "looksam", "sam"]
    assert all(rows[(m, "noise_0.1")]["lost_diff"]["mean"] > 0 for m in gradient_methods)
    assert sum(rows[(m, "noise_0.1")]["after_diff"]["high"] < 0 for m in gradient_methods) == 6
    # at sigma = 0.05, LookSAM loses 6.5 points against AdamW's 4.2
    assert round(100 * rows[("looksam", "noise_0.05")]["lost"], 1) == 6.5


def test_five_seed_readings(lost):
    files = ["--files", str(BENEFIT / "results.json"), str(BENEFIT / "extra_seeds.json")]
    msam = lost("--task", "smollm", "--noise", "0.0", "--methods", "msam", *files)[("msam", "int4")]
    assert msam["seeds"] == 5 and points(msam["lost_diff"]) == (-3.2, -4.6, -1.8)
    assert points(msam["after_diff"]) == (3.4, 1.5, 5.3)
    sam = lost("--task", "digits", "--noise", "0.4", "--methods", "sam", *files)[("sam", "int4")]
    assert sam["seeds"] == 5 and points(sam["lost_diff"]) == (-2.7, -5.8, 0.4)


def test_noisy_digits_4bit_gap_includes_zero(lost):
    rows = lost("--task", "digits", "--noise", "0.4", "--measures", "noise_0.2", "int4")
    assert points(rows[("sam", "int4")]["lost_diff"]) == (-3.3, -7.1, 0.5)  # the gap widens by 3.3, -0.5 to +7.1
    assert points(rows[("sam", "noise_0.2")]["lost_diff"]) == (-12.6, -17.1, -8.1)
    assert not math.isnan(rows[("sam", "int4")]["after_diff"]["low"])
