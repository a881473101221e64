"""Momentum-SAM (`sam_method="msam"`) against MSAM written from its paper's formula (float64), its refusals, exact
restore, rho -> 0, and bit-identical resume; and `perturb_along_`, the perturbation along given directions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from references import flat_norm, window_loss, windows_of
from testing_utils import (
    ForwardCounter,
    assert_learning_rate_zero_never_changes_the_weights,
    assert_tiny_rho_reproduces_the_plain_trainer,
    assert_updates_close,
    base_args,
    lm_dataset,
    regression_dataset,
    resume_run,
    sgd_args,
    tiny_llama,
    trainable_state,
)
from torch import nn
from torch.func import grad

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from hf_sam.perturbation import perturb_along_, restore_

BETAS, EPS = (0.9, 0.999), 1e-8


# ---- perturbation along given directions --------------------------------------------------------------------------
def test_perturb_along_moves_by_rho_along_the_unit_direction_and_restores_exactly():
    torch.manual_seed(0)
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    start = [p.clone() for p in params]
    dirs = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    dirs_before = [d.clone() for d in dirs]
    backups = [torch.empty_like(p) for p in params]
    norm, skipped = perturb_along_(params, dirs, backups, -0.3)
    total = torch.sqrt(sum((d**2).sum() for d in dirs))
    for p, w, d in zip(params, start, dirs):
        torch.testing.assert_close(p, w - 0.3 * d / total)
    torch.testing.assert_close(norm, total)
    assert not skipped
    assert all(torch.equal(d, d0) for d, d0 in zip(dirs, dirs_before))  # the directions are left alone
    restore_(params, backups)
    assert all(torch.equal(p, w) for p, w in zip(params, start))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_perturb_along_skips_a_zero_or_non_finite_direction(bad):
    params = [torch.ones(3)]
    dirs = [torch.full((3,), bad)]
    _, skipped = perturb_along_(params, dirs, [torch.empty(3)], 0.5)
    assert skipped and torch.equal(params[0], torch.ones(3))


# ---- Momentum-SAM -------------------------------------------------------------------------------------------------
def reference_msam(model, windows, rho, optimizer, lr, momentum=0.9, sign=-1.0):
    """MSAM written from Becker et al. (2024), Algorithm 1: the gradient of step t at w - rho v/||v||, v the
    momentum after step t-1 (none at the first step), applied at w by SGD with momentum (torch semantics) or AdamW
    (no weight decay)."""
    params = trainable_state(model)
    v = None  # SGD's momentum buffer, or Adam's first moment
    s = {k: torch.zeros_like(p) for k, p in params.items()}  # Adam's second moment

    def loss(p, micro, n):
        return window_loss(model, p, micro, n)

    for t, micro_batches in enumerate(windows, start=1):
        n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
        at = params if v is None else {k: params[k] + sign * rho * v[k] / flat_norm(v) for k in params}
        g = grad(loss)(at, micro_batches, n_items)  # all micro-batches of the window at the same point
        if optimizer == "sgd":
            v = g if v is None else {k: momentum * v[k] + g[k] for k in params}
            params = {k: params[k] - lr * v[k] for k in params}
        else:
            v = {k: (1 - BETAS[0]) * g[k] + (BETAS[0] * v[k] if v is not None else 0) for k in params}
            s = {k: BETAS[1] * s[k] + (1 - BETAS[1]) * g[k] ** 2 for k in params}
            for k in params:
                m_hat, s_hat = v[k] / (1 - BETAS[0] ** t), s[k] / (1 - BETAS[1] ** t)
                params[k] = params[k] - lr * m_hat / (s_hat.sqrt() + EPS)
    return params


def optimizer_args(tmp_path, optimizer, **overrides):
    if optimizer == "sgd":
        return sgd_args(tmp_path, learning_rate=0.1, optim_args="momentum=0.9", **overrides)
    return sgd_args(
        tmp_path, optim="adamw_torch", learning_rate=1e-2, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_msam_update_matches_the_formula_with_one_pass_per_micro_batch(tmp_path, optimizer):
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    start, data = trainable_state(model), lm_dataset(8)
    lr = 0.1 if optimizer == "sgd" else 1e-2
    counter = ForwardCounter(model)
    args = SAMTrainingArguments(
        **optimizer_args(tmp_path, optimizer, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        max_steps=4,
        sam_rho=0.2,
        sam_method="msam",
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    assert counter.count == 4 * 2  # one forward per micro-batch: no extra pass
    windows = windows_of(data, 2, 2, 4)
    assert_updates_close(start, trainable_state(model), reference_msam(reference, windows, 0.2, optimizer, lr))
    # Controls: the plain optimizer (rho -> 0) and the opposite sign are other updates on this problem.
    for control in (
        reference_msam(reference, windows, 1e-12, optimizer, lr),
        reference_msam(reference, windows, 0.2, optimizer, lr, sign=1.0),
    ):
        with pytest.raises(AssertionError):
            assert_updates_close(start, trainable_state(model), control, rtol=1e-3)


def test_tiny_rho_reproduces_the_plain_trainer(tmp_path):
    assert_tiny_rho_reproduces_the_plain_trainer(tmp_path, "msam")


def test_learning_rate_zero_never_changes_the_weights(tmp_path):
    training_kwargs = optimizer_args(tmp_path, "sgd", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_learning_rate_zero_never_changes_the_weights(training_kwargs, "msam")


class FailingForward(nn.Module):
    def __init__(self, fail_on_call: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.fail_on_call, self.calls = fail_on_call, 0

    def forward(self, x, labels):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom at the perturbed weights")
        return {"loss": F.mse_loss(self.linear(x).squeeze(-1), labels)}


@pytest.mark.parametrize("fail_on_call", [3, 4], ids=["first-micro-batch", "last-micro-batch"])
def test_msam_exception_in_a_pass_restores_the_weights(tmp_path, fail_on_call):
    """Step 1 (calls 1-2) has no momentum; step 2 runs at w~ and fails on one of its micro-batches: the weights are
    step 1's w, bit for bit (not w~)."""

    def train(model, max_steps):
        args = SAMTrainingArguments(
            **optimizer_args(tmp_path, "sgd", per_device_train_batch_size=4, gradient_accumulation_steps=2),
            max_steps=max_steps,
            sam_rho=0.5,
            sam_method="msam",
        )
        SAMTrainer(model=model, args=args, train_dataset=regression_dataset(16)).train()

    after_step_1 = FailingForward(fail_on_call=0)
    train(after_step_1, 1)
    model = FailingForward(fail_on_call=fail_on_call)
    with pytest.raises(RuntimeError, match="boom"):
        train(model, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_step_1.state_dict()[k]), k


def test_msam_needs_an_optimizer_with_momentum(tmp_path):
    def build(model=None, optimizers=(None, None), **kwargs):
        args = SAMTrainingArguments(**base_args(tmp_path), sam_method="msam", **kwargs)
        return SAMTrainer(model=model or tiny_llama(), args=args, train_dataset=lm_dataset(), optimizers=optimizers)

    with pytest.raises(
        ValueError, match=r"`method='msam'` .* which `optim='sgd'` without `optim_args='momentum=...'`"
    ):
        build(optim="sgd")
    with pytest.raises(ValueError, match=r"which `optim='adafactor'` does not keep"):
        build(optim="adafactor")
    build(optim="sgd", optim_args="momentum=0.9")
    build(optim="adamw_torch")
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"which the optimizer SGD \(momentum=0\) does not keep"):
        build(model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    build(model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None))
    build(model, optimizers=(torch.optim.Adam(model.parameters()), None))
    with pytest.raises(ValueError, match=r"`method='msam'` .* no `adaptive`"):
        SAMConfig(method="msam", adaptive=True)


def test_no_host_reads_in_the_step(tmp_path, host_reads):
    """Nothing in the msam step reads a value back from the device (a synchronisation on a GPU)."""
    args = SAMTrainingArguments(
        **base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4),
        sam_method="msam",
    )
    SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(n=8)).train()
    assert host_reads == []


# ---- resume: MSAM keeps no state of its own; the momentum comes back with optimizer.pt -------------------------
MSAM_RESUME = {"sam_method": "msam", "sam_rho": 0.5, "optim": "sgd", "optim_args": "momentum=0.9"}


def test_msam_resume_is_bit_identical(tmp_path):
    full = resume_run(tmp_path / "full", 6, None, MSAM_RESUME)
    resumed = resume_run(tmp_path / "resumed", 6, str(tmp_path / "full" / "checkpoint-4"), MSAM_RESUME)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
