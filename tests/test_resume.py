"""Checkpoint and resume: a run resumed in a new process ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"


def run(out_dir: Path, max_steps: int, resume: str | None, sam: dict) -> dict[str, torch.Tensor]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), str(max_steps), resume or "-", json.dumps(sam)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    return torch.load(out_dir / "final.pt", weights_only=True)


@pytest.mark.parametrize(
    "sam",
    [
        {"sam_rho": 0.05},
        {"sam_rho": 0.05, "sam_accumulation": "micro", "sam_adaptive": True},
        # Steps 4-5 reuse the LookSAM cache computed at step 3: the resumed run must load it from sam_state.pt.
        {"sam_method": "looksam", "sam_looksam_interval": 3},
        # The resumed run's first step preconditions with the second moment loaded from optimizer.pt.
        {"sam_rho": 0.05, "sam_preconditioner": "adam"},
    ],
    ids=["sam", "asam-micro", "looksam", "adam-preconditioned"],
)
def test_resume_is_bit_identical(tmp_path, sam):
    full = run(tmp_path / "full", 6, None, sam)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "sam_state.pt").is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed = run(tmp_path / "resumed", 6, str(checkpoint), sam)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def test_sam_state_holds_the_settings_and_the_looksam_cache(tmp_path):
    run(tmp_path, 4, None, {"sam_method": "looksam", "sam_looksam_interval": 3})
    state = torch.load(tmp_path / "checkpoint-4" / "sam_state.pt", weights_only=True)
    assert state["config"]["method"] == "looksam" and state["config"]["looksam_interval"] == 3
    assert state["looksam_cache"] and all(torch.isfinite(v).all() for v in state["looksam_cache"].values())


def test_looksam_resume_needs_its_saved_state(tmp_path):
    """The check above can fail: without sam_state.pt the resumed LookSAM run recomputes its cache and diverges."""
    sam = {"sam_method": "looksam", "sam_looksam_interval": 3}
    full = run(tmp_path / "full", 6, None, sam)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    (checkpoint / "sam_state.pt").unlink()
    resumed = run(tmp_path / "resumed", 6, str(checkpoint), sam)
    assert any(not torch.equal(resumed[name], value) for name, value in full.items())
