"""The per-step path reads nothing back from the device: on a GPU every such read is a synchronisation.

On CPU the reads are free, so the test catches them where they would cost on a GPU: the `host_reads` fixture
(conftest.py, from `testing_utils.record_host_reads`) wraps the tensor methods that copy a value to the host and
records any call made from hf_sam's own code outside logging.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from testing_utils import PACKAGE_DIR, base_args, lm_dataset, tiny_llama

from hf_sam import SAMTrainer, SAMTrainingArguments


@pytest.mark.parametrize(
    "sam",
    [
        {},
        {"sam_adaptive": True, "sam_accumulation": "micro"},
        {"sam_method": "looksam", "sam_looksam_interval": 2},
        {"sam_ascent_fraction": 0.5, "sam_rho_schedule": "lr"},
    ],
    ids=["sam", "asam-micro", "looksam", "partial-lr"],
)
def test_no_host_reads_in_the_step(tmp_path, host_reads, sam):
    args = SAMTrainingArguments(
        **base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4), **sam
    )
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(n=8))
    trainer.train()
    assert "sam_sharpness" in trainer.state.log_history[0]  # logging (the allowed read) did happen
    assert host_reads == []


def test_the_detector_sees_a_host_read(tmp_path, host_reads, monkeypatch):
    """The check above can fail: a `.item()` slipped into the step (here into the metrics) is reported."""
    from hf_sam.metrics import SAMMetrics as _SAMMetrics

    source = (
        "def add_perturbation(self, norm, skipped):\n"
        "    if skipped.item():\n"  # the kind of line the test exists to catch
        "        pass\n"
        "    original(self, norm, skipped)\n"
    )
    namespace = {"original": _SAMMetrics.add_perturbation}
    exec(compile(source, str(Path(PACKAGE_DIR) / "trainer.py"), "exec"), namespace)
    monkeypatch.setattr(_SAMMetrics, "add_perturbation", namespace["add_perturbation"])
    args = SAMTrainingArguments(**base_args(tmp_path, per_device_train_batch_size=2, max_steps=1))
    SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(n=4)).train()
    assert host_reads == ["item in add_perturbation (trainer.py)"]
