"""Preconditioned SAM (`sam_preconditioner="adam"`) against AdamW + SAM written from the formulas (float64,
`references.reference_sam_adamw`)."""

from __future__ import annotations

import copy

import pytest
import torch
from references import reference_sam_adamw, windows_of
from testing_utils import adam_args, assert_updates_close, base_args, lm_dataset, sgd_args, tiny_llama, trainable_state

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments


def test_preconditioned_update_matches_the_formula(tmp_path):
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    start, data = trainable_state(model), lm_dataset(8)
    args = SAMTrainingArguments(
        **adam_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4),
        sam_rho=0.05,
        sam_preconditioner="adam",
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    windows = windows_of(data, 2, 2, 4)
    want = reference_sam_adamw(reference, windows, rho=0.05, preconditioned=True)
    assert_updates_close(start, trainable_state(model), want)
    # Control: the same run with the unpreconditioned direction is another update.
    plain = reference_sam_adamw(reference, windows, rho=0.05, preconditioned=False)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain, rtol=1e-3)


def test_preconditioner_needs_adam_and_a_supported_method(tmp_path):
    with pytest.raises(ValueError, match=r"`preconditioner='adam'` .* does not keep. Use `optim` in 'adamw_torch'"):
        SAMTrainer(model=tiny_llama(), args=SAMTrainingArguments(**sgd_args(tmp_path), sam_preconditioner="adam"))
    with pytest.raises(ValueError, match=r"`preconditioner='adam'` .* works with `method` in 'sam'"):
        SAMConfig(preconditioner="adam", method="looksam")
    with pytest.raises(ValueError, match=r"`preconditioner` \(`--sam_preconditioner`\) must be one of 'none', 'adam'"):
        SAMConfig(preconditioner="shampoo")
    # A user-built Adam optimizer is accepted, an SGD one refused.
    model = tiny_llama()
    adam = torch.optim.AdamW(model.parameters())
    SAMTrainer(
        model=model, args=SAMTrainingArguments(**base_args(tmp_path), sam_preconditioner="adam"),
        optimizers=(adam, None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="the optimizer SGD does not keep"):
        SAMTrainer(
            model=model, args=SAMTrainingArguments(**base_args(tmp_path), sam_preconditioner="adam"),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )  # fmt: skip
