"""Friendly SAM (`sam_method="friendly"`) against Friendly SAM written from its paper's formula (float64), its
settings, exact restore, rho -> 0, and bit-identical resume (its gradient average lives in sam_state.pt)."""

from __future__ import annotations

import copy

import pytest
import torch
from references import flat_norm, reference_sam_sgd, window_loss, windows_of
from testing_utils import (
    assert_learning_rate_zero_never_changes_the_weights,
    assert_tiny_rho_reproduces_the_plain_trainer,
    assert_updates_close,
    base_args,
    lm_dataset,
    resume_run,
    sgd_args,
    tiny_llama,
    trainable_state,
)
from torch.func import grad

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from hf_sam.variants.friendly import friendly_direction_


# ---- Friendly SAM -------------------------------------------------------------------------------------------------
def test_friendly_direction_matches_the_formula():
    torch.manual_seed(0)
    g, m = [torch.randn(5, dtype=torch.float64)], [torch.randn(5, dtype=torch.float64)]
    g0, m0 = g[0].clone(), m[0].clone()
    friendly_direction_(g, m, sigma=0.8, lam=0.9)
    torch.testing.assert_close(g[0], g0 - 0.8 * m0)  # d = g - sigma m_{t-1}
    torch.testing.assert_close(m[0], 0.9 * m0 + 0.1 * g0)  # m_t = lambda m_{t-1} + (1 - lambda) g


def reference_friendly_sgd(model, windows, lr, rho, sigma, lam, accumulation="exact"):
    """Friendly SAM with SGD from Li et al. (2024) as the authors' code runs it: the first g sets m and is itself the
    direction; afterwards d = g - sigma m_{t-1}, then m_t = lambda m_{t-1} + (1 - lambda) g (clean gradients)."""
    params = trainable_state(model)
    m = None

    def loss(p, micro, n):
        return window_loss(model, p, micro, n)

    for micro_batches in windows:
        n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
        groups = [micro_batches] if accumulation == "exact" else [[mb] for mb in micro_batches]
        sam_grad = {k: torch.zeros_like(v) for k, v in params.items()}
        for group in groups:
            g = grad(loss)(params, group, n_items)
            if m is None:
                d, m = g, g
            else:
                d = {k: g[k] - sigma * m[k] for k in g}
                m = {k: lam * m[k] + (1 - lam) * g[k] for k in g}
            e = {k: rho * d[k] / flat_norm(d) for k in d}
            g_sam = grad(loss)({k: params[k] + e[k] for k in params}, group, n_items)
            sam_grad = {k: sam_grad[k] + g_sam[k] for k in params}
        params = {k: params[k] - lr * sam_grad[k] for k in params}
    return params


@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_friendly_update_matches_the_formula(tmp_path, accumulation):
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    start, data = trainable_state(model), lm_dataset(8)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4),
        sam_rho=0.1,
        sam_method="friendly",
        sam_friendly_sigma=1.0,
        sam_friendly_lambda=0.6,
        sam_accumulation=accumulation,
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    windows = windows_of(data, 2, 2, 4)
    want = reference_friendly_sgd(reference, windows, 0.5, 0.1, 1.0, 0.6, accumulation)
    assert_updates_close(start, trainable_state(model), want)
    # Control: plain SAM (the direction g itself) is another update on this problem.
    plain_sam = reference_sam_sgd(reference, windows, lr=0.5, rho=0.1, accumulation=accumulation)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain_sam, rtol=1e-3)


def test_friendly_settings_are_validated():
    with pytest.raises(ValueError, match=r"`friendly_sigma` \(`--sam_friendly_sigma`\) must be a finite number >= 0"):
        SAMConfig(method="friendly", friendly_sigma=-1.0)
    with pytest.raises(
        ValueError, match=r"`friendly_lambda` \(`--sam_friendly_lambda`\) must be a number in \[0, 1\)"
    ):
        SAMConfig(method="friendly", friendly_lambda=1.0)
    SAMConfig(method="friendly", friendly_sigma=0.0, friendly_lambda=0.0)


def test_tiny_rho_reproduces_the_plain_trainer(tmp_path):
    assert_tiny_rho_reproduces_the_plain_trainer(tmp_path, "friendly")


def test_learning_rate_zero_never_changes_the_weights(tmp_path):
    training_kwargs = sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_learning_rate_zero_never_changes_the_weights(training_kwargs, "friendly")


def test_no_host_reads_in_the_step(tmp_path, host_reads):
    """Nothing in the friendly step reads a value back from the device (a synchronisation on a GPU)."""
    args = SAMTrainingArguments(
        **base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4),
        sam_method="friendly",
    )
    SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(n=8)).train()
    assert host_reads == []


# ---- resume -------------------------------------------------------------------------------------------------------
FRIENDLY_RESUME = {"sam_method": "friendly", "sam_friendly_lambda": 0.6}


def test_friendly_resume_is_bit_identical_and_saves_the_average_by_name(tmp_path):
    full = resume_run(tmp_path / "full", 6, None, FRIENDLY_RESUME)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    resumed = resume_run(tmp_path / "resumed", 6, str(checkpoint), FRIENDLY_RESUME)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
    state = torch.load(checkpoint / "sam_state.pt", weights_only=True)
    assert state["config"]["method"] == "friendly"
    assert set(state["friendly_ema"]) == {n for n, p in tiny_llama().named_parameters() if p.requires_grad}


def test_friendly_resume_needs_its_saved_state(tmp_path):
    """The check above can fail: without sam_state.pt the resumed run restarts its average and diverges."""
    full = resume_run(tmp_path / "full", 6, None, FRIENDLY_RESUME)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    (checkpoint / "sam_state.pt").unlink()
    resumed = resume_run(tmp_path / "resumed", 6, str(checkpoint), FRIENDLY_RESUME)
    assert any(not torch.equal(resumed[name], value) for name, value in full.items())
