"""Smoke test of the benchmark script: its `--quick --tiny` mode runs and prints every row (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from testing_utils import load_benchmark_script


def test_quick_tiny_benchmark_prints_every_row(tmp_path, capsys):
    pytest.importorskip("peft")
    bench = load_benchmark_script("bench_sam")
    out_json = tmp_path / "rows.json"
    assert bench.main(["--quick", "--tiny", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = ["plain", "floor", "floor-2", "sam"]
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        rows.append("peer")
    for case in bench.TINY_CASES:
        assert f"### {case}:" in out
    table_rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    for row in rows:
        assert table_rows.count(row) == len(bench.TINY_CASES), (row, out)
    summaries = json.loads(out_json.read_text())
    assert {(s["case"], s["row"]) for s in summaries} == {(c, r) for c in bench.TINY_CASES for r in rows}
    for s in summaries:
        assert s["steps"] >= 1 and s["median_s"] > 0 and s["alloc_peak_mib"] > 0
        # The passes are timed inside each step: every row runs at least one, and never longer than the step.
        assert len(s["pass_times"]) == len(s["step_times"])
        assert all(0 < p < t for p, t in zip(s["pass_times"], s["step_times"])), s
        if s["row"] == "plain":  # one pass, so nothing to compare with the floor's work around two
            assert math.isnan(s["extra_around_ms"])
        elif s["row"] == "floor":
            assert s["extra_around_ms"] == 0.0 and s["x_floor_around"] == 1.0
        else:
            expected = 1 + s["extra_around_ms"] / 1e3 / _floor_median(summaries, s["case"])
            assert s["x_floor_around"] == pytest.approx(expected, rel=1e-12)


def _floor_median(summaries, case):
    (floor,) = [s for s in summaries if s["case"] == case and s["row"] == "floor"]
    return floor["median_s"]


def test_variant_table_entries_are_sam_arguments():
    bench = load_benchmark_script("bench_sam")
    from hf_sam import SAMTrainingArguments

    fields = set(SAMTrainingArguments.__dataclass_fields__)
    for name, kwargs in bench.VARIANTS.items():
        assert set(kwargs) - {"cases"} <= fields, name
    assert bench._parse_variants(['x={"sam_rho": 0.1}']) == {"x": {"sam_rho": 0.1}}
    with pytest.raises(SystemExit):
        bench._parse_variants(['x={"rho": 0.1}'])
