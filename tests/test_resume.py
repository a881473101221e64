"""Checkpoint and resume: a run resumed in a new process ends bit-identical to the uninterrupted run (each run is
`scripts/resume_run.py` in a fresh process, started by `testing_utils.resume_run`)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import resume_run


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
    full = resume_run(tmp_path / "full", 6, None, sam)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "sam_state.pt").is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed = resume_run(tmp_path / "resumed", 6, str(checkpoint), sam)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def test_sam_state_holds_the_settings_and_the_looksam_cache(tmp_path):
    resume_run(tmp_path, 4, None, {"sam_method": "looksam", "sam_looksam_interval": 3})
    state = torch.load(tmp_path / "checkpoint-4" / "sam_state.pt", weights_only=True)
    assert state["config"]["method"] == "looksam" and state["config"]["looksam_interval"] == 3
    assert state["looksam_cache"] and all(torch.isfinite(v).all() for v in state["looksam_cache"].values())


def test_looksam_resume_needs_its_saved_state(tmp_path):
    """The check above can fail: without sam_state.pt the resumed LookSAM run recomputes its cache and diverges."""
    sam = {"sam_method": "looksam", "sam_looksam_interval": 3}
    full = resume_run(tmp_path / "full", 6, None, sam)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    (checkpoint / "sam_state.pt").unlink()
    resumed = resume_run(tmp_path / "resumed", 6, str(checkpoint), sam)
    assert any(not torch.equal(resumed[name], value) for name, value in full.items())
