"""Preconditioned SAM (`sam_preconditioner="adam"`) against AdamW + SAM written from the formulas (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_updates_close, base_args, lm_dataset, sgd_args, tiny_llama, trainable_state
from test_trainer import window_loss, windows_of
from torch.func import grad

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments

BETAS, EPS, LR = (0.9, 0.999), 1e-8, 1e-2


def reference_sam_adamw(model, windows, rho, preconditioned):
    """AdamW (no weight decay) stepping with grad L(w + e); e = rho d/||d||, d = g / (sqrt(v_hat) + eps) from the
    optimizer's state before this step (d = g when there is none yet), or d = g for plain SAM."""
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}

    def loss(p, micro, n):
        return window_loss(model, p, micro, n)

    for t, micro_batches in enumerate(windows, start=1):
        n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
        g = grad(loss)(params, micro_batches, n_items)
        if preconditioned and t > 1:
            bc2 = 1 - BETAS[1] ** (t - 1)
            d = {k: g[k] / ((v[k] / bc2).sqrt() + EPS) for k in g}
        else:
            d = g
        norm = torch.sqrt(sum((d[k] ** 2).sum() for k in d))
        g_sam = grad(loss)({k: params[k] + rho * d[k] / norm for k in params}, micro_batches, n_items)
        for k in params:
            m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g_sam[k]
            v[k] = BETAS[1] * v[k] + (1 - BETAS[1]) * g_sam[k] ** 2
            m_hat, v_hat = m[k] / (1 - BETAS[0] ** t), v[k] / (1 - BETAS[1] ** t)
            params[k] = params[k] - LR * m_hat / (v_hat.sqrt() + EPS)
    return params


def adam_args(tmp_path, **overrides):
    return sgd_args(
        tmp_path, optim="adamw_torch", learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        **overrides,
    )  # fmt: skip


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
