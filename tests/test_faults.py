"""Faults: exceptions and interrupts inside either pass, out-of-memory retries, non-finite losses."""

from __future__ import annotations

import math

import pytest
import testing_utils
import torch
import torch.nn.functional as F
from datasets import Dataset
from testing_utils import regression_dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sam import SAMTrainer, SAMTrainingArguments


def sgd_args(tmp_path, **overrides) -> dict:
    return testing_utils.sgd_args(tmp_path, **{"learning_rate": 0.1, **overrides})


class Regression(nn.Module):
    """Linear regression that can fail, run out of memory or return a non-finite loss on chosen forward calls."""

    def __init__(self, fail_on_call=None, error=RuntimeError, oom_above=None, poison=None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.fail_on_call, self.error = fail_on_call, error
        self.oom_above = oom_above  # (batch size, which passes): raise an out-of-memory error above that size
        self.poison = poison or {}  # forward call -> value added to the loss (no gradient)
        self.calls = 0
        self.batch_sizes: list[int] = []

    def forward(self, x, labels):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        if self.calls == self.fail_on_call:
            raise self.error("boom")
        if self.oom_above is not None and x.shape[0] > self.oom_above[0] and self.calls % 2 in self.oom_above[1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        loss = F.mse_loss(self.linear(x).squeeze(-1), labels)
        if self.calls in self.poison:
            loss = loss + self.poison[self.calls]
        return {"loss": loss}


class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.after_step = model, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.after_step[0] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = {k: v.clone() for k, v in self.model.state_dict().items()}


def micro_batches(data: Dataset, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    return list(zip(x.split(size), y.split(size)))


def grads_of(w: dict[str, torch.Tensor], x, y, scale: float) -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    loss = F.mse_loss(F.linear(x, params["linear.weight"], params["linear.bias"]).squeeze(-1), y) * scale
    loss.backward()
    return {k: p.grad for k, p in params.items()}


# Step 2 (GA=2, micro-batches m1 m2) runs forward calls 5-8. "exact": clean m1, clean m2, perturbed m1, perturbed m2.
# "micro": clean m1, perturbed m1, clean m2, perturbed m2.
FAILURES = [
    ("exact", "clean", 6),  # the second clean pass: the first micro-batch's clean gradient is accumulated
    ("exact", "perturbed", 7),  # the first perturbed pass, at w + e
    ("micro", "clean", 7),  # the second clean pass: m1's SAM gradient is set aside
    ("micro", "perturbed", 8),  # the last perturbed pass
]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("accumulation,failing_pass,call", FAILURES)
def test_failure_in_either_pass_restores_the_weights_and_leaves_consistent_gradients(
    tmp_path, accumulation, failing_pass, call, error
):
    model = Regression(fail_on_call=call, error=error)
    data = regression_dataset(n=16)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
        sam_rho=0.5,
        sam_accumulation=accumulation,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    snapshots = Snapshots(model)
    trainer.add_callback(snapshots)
    with pytest.raises(error, match="boom"):
        trainer.train()
    assert model.calls == call and sorted(snapshots.after_step) == [0, 1]
    # The weights are the ones after step 1, bit for bit: no perturbation is left behind.
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots.after_step[1][k]), k
    grads = {k: p.grad for k, p in model.named_parameters()}
    if failing_pass == "perturbed":
        # A half-accumulated SAM gradient must not reach an optimizer step: cleared.
        assert all(g is None for g in grads.values())
        return
    # A failing clean pass leaves what had been accumulated before it in the window, nothing else.
    w = snapshots.after_step[1]
    x1, y1 = micro_batches(data, 2)[2]  # step 2's first micro-batch
    g1 = grads_of(w, x1, y1, scale=0.5)  # the Trainer divides by the accumulation steps
    if accumulation == "exact":
        want = g1  # the clean gradient of m1
    else:  # m1's SAM gradient: its perturbed pass at w + rho g1 / ||g1||
        norm = torch.sqrt(sum((g**2).sum() for g in g1.values()))
        want = grads_of({k: w[k] + 0.5 * g1[k] / norm for k in w}, x1, y1, scale=0.5)
    for k, g in grads.items():
        torch.testing.assert_close(g, want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "accumulation,accumulation_steps",
    [
        ("exact", 1),  # OOM in the perturbed pass, with w + e in place and the stash full
        ("exact", 2),  # OOM in the second clean pass of the window, with the first micro-batch stashed
        ("micro", 1),  # OOM in the perturbed pass of "micro"
    ],
)
def test_auto_find_batch_size_retries_at_a_smaller_size(tmp_path, accumulation, accumulation_steps):
    # Even forward calls run out of memory above 4 examples: with one micro-batch per step they are the perturbed
    # passes; with two ("exact": clean m1, clean m2, perturbed m1, perturbed m2) the first one is m2's clean pass.
    # accelerate retries at 0.9x the size each time (8, 7, 6, 5, 4), each attempt from the start of training.
    data = regression_dataset(n=16)
    kwargs = sgd_args(tmp_path, gradient_accumulation_steps=accumulation_steps, max_steps=2)
    model = Regression(oom_above=(4, (0,)))
    args = SAMTrainingArguments(
        **kwargs, per_device_train_batch_size=8, auto_find_batch_size=True, sam_rho=0.5, sam_accumulation=accumulation
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer._train_batch_size == 4 and trainer.state.global_step == 2
    failed = model.batch_sizes.index(4)  # the last retry starts here
    assert min(model.batch_sizes[:failed]) > 4 and set(model.batch_sizes[failed:]) == {4}
    # The same training at size 4 from the start: the failed attempt left no perturbation and no stash behind.
    fresh = Regression()
    args = SAMTrainingArguments(**kwargs, per_device_train_batch_size=4, sam_rho=0.5, sam_accumulation=accumulation)
    SAMTrainer(model=fresh, args=args, train_dataset=data).train()
    assert fresh.batch_sizes == model.batch_sizes[failed:]
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses. The poison is added to the loss value only: gradients and weights are those of a clean run.


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("poisoned_pass", ["clean", "perturbed"])
def test_non_finite_loss_follows_logging_nan_inf_filter(tmp_path, poison, poisoned_pass):
    data = regression_dataset(n=16)
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=4)
    reference = Regression()
    reference_trainer = SAMTrainer(model=reference, args=SAMTrainingArguments(**kwargs), train_dataset=data)
    reference_trainer.train()
    per_step = [h for h in reference_trainer.state.log_history if "loss" in h]
    call = 3 if poisoned_pass == "clean" else 4  # step 2: calls 3 (clean) and 4 (perturbed)

    model = Regression(poison={call: torch.tensor(poison)})
    args = SAMTrainingArguments(**{**kwargs, "logging_steps": 4}, logging_nan_inf_filter=True)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for k, v in reference.state_dict().items():  # weights follow the gradients, which are finite
        assert torch.equal(model.state_dict()[k], v), k
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    kept = [h for i, h in enumerate(per_step) if i != 1]  # step 2 is left out of the SAM averages
    assert math.isfinite(log["loss"]) and math.isfinite(log["sam_perturbed_loss"])
    assert log["sam_perturbed_loss"] == pytest.approx(sum(h["sam_perturbed_loss"] for h in kept) / 3, rel=1e-5)
    assert log["sam_sharpness"] == pytest.approx(sum(h["sam_sharpness"] for h in kept) / 3, rel=1e-5, abs=1e-7)
    assert log["sam_skipped"] == 0.0

    # Without the filter, the window's averages carry the non-finite value, as the Trainer's `loss` does.
    unfiltered = Regression(poison={call: torch.tensor(poison)})
    args = SAMTrainingArguments(**{**kwargs, "logging_steps": 4}, logging_nan_inf_filter=False)
    trainer = SAMTrainer(model=unfiltered, args=args, train_dataset=data)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert not math.isfinite(log["sam_sharpness"])
    assert math.isfinite(log["sam_perturbed_loss"]) == (poisoned_pass == "clean")
    assert math.isfinite(log["loss"]) == (poisoned_pass == "perturbed")


class NaNGradient(nn.Module):
    """Regression plus a parameter whose gradient is NaN on one forward call (by default the first clean pass)."""

    def __init__(self, nan_on_call: int | None = 1):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.bad = nn.Parameter(torch.ones(()))
        self.nan_on_call, self.calls = nan_on_call, 0

    def forward(self, x, labels):
        self.calls += 1
        loss = F.mse_loss(self.linear(x).squeeze(-1), labels)
        scale = torch.tensor(float("nan")) if self.calls == self.nan_on_call else torch.tensor(0.0)
        return {"loss": loss + (self.bad * scale)}


def test_non_finite_gradient_skips_the_perturbation_and_is_counted(tmp_path):
    data = regression_dataset(n=8)
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=8, max_steps=1)
    sam = NaNGradient()
    trainer = SAMTrainer(model=sam, args=SAMTrainingArguments(**kwargs, sam_rho=0.5), train_dataset=data)
    trainer.train()
    assert sam.calls == 2
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["sam_skipped"] == 1.0 and math.isnan(log["sam_grad_norm"])
    # The global norm is NaN: e = 0 everywhere and w is restored exactly, so the step uses the perturbed pass's
    # (finite) gradient at w itself: the plain step of a run without the NaN, bit for bit.
    clean = NaNGradient(nan_on_call=None)
    Trainer(model=clean, args=TrainingArguments(**kwargs), train_dataset=data).train()
    for k, v in clean.state_dict().items():
        assert torch.equal(sam.state_dict()[k], v), k
