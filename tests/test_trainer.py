"""SAMTrainer against an independent SAM reference written from the formulas (`references.py`), and its guarantees
inside Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from references import reference_sam_sgd, windows_of
from testing_utils import (
    assert_updates_close,
    base_args,
    lm_dataset,
    regression_dataset,
    sgd_args,
    tiny_llama,
    trainable_state,
)
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments

# ---------------------------------------------------------------------------------------------------------------
# Against the reference: SAM / ASAM with plain SGD (references.reference_sam_sgd)


@pytest.mark.parametrize(
    "adaptive,accumulation,tied",
    [(False, "exact", False), (False, "micro", True), (True, "exact", True), (True, "micro", False)],
)
def test_update_matches_reference(tmp_path, adaptive, accumulation, tied):
    model = tiny_llama(tie_word_embeddings=tied).double()  # float64: rounding far below the tolerance
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=8)
    rho = 0.5 if adaptive else 0.05
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
        sam_rho=rho,
        sam_adaptive=adaptive,
        sam_accumulation=accumulation,
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    want = reference_sam_sgd(
        reference_model, windows_of(data, 2, 2, 3), lr=0.5, rho=rho, adaptive=adaptive, accumulation=accumulation
    )
    assert_updates_close(start, trainable_state(model), want)
    # The comparison can tell SAM from plain SGD (rho -> 0) on this problem.
    plain_sgd = reference_sam_sgd(reference_model, windows_of(data, 2, 2, 3), lr=0.5, rho=1e-12)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain_sgd, rtol=1e-3)


def test_clipping_applies_to_the_sam_gradient(tmp_path):
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=4)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, max_grad_norm=0.05), sam_rho=0.1
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    want = reference_sam_sgd(reference_model, windows_of(data, 4, 1, 2), lr=0.5, rho=0.1, clip=0.05)
    assert_updates_close(start, trainable_state(model), want)


def test_exact_accumulation_equals_the_large_batch(tmp_path):
    """GA=k x batch b gives the update of GA=1 x batch k*b, as a plain Trainer promises (AdamW, dropout off)."""
    data = lm_dataset(n=8)
    results = []
    for batch, accumulation_steps in [(8, 1), (2, 4)]:
        model = tiny_llama().double()  # AdamW divides by sqrt(v): float64 keeps rounding below the tolerance
        args = SAMTrainingArguments(
            **base_args(
                tmp_path,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation_steps,
                max_steps=3,
                learning_rate=1e-2,
            )
        )
        SAMTrainer(model=model, args=args, train_dataset=data).train()
        results.append(trainable_state(model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-8)


def test_micro_accumulation_differs_from_exact(tmp_path):
    data = lm_dataset(n=8)
    results = []
    for accumulation in ["exact", "micro"]:
        model = tiny_llama()
        args = SAMTrainingArguments(
            **sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2),
            sam_rho=0.2,
            sam_accumulation=accumulation,
        )
        SAMTrainer(model=model, args=args, train_dataset=data).train()
        results.append(trainable_state(model))
    assert any(not torch.allclose(results[0][k], results[1][k], rtol=1e-4, atol=1e-6) for k in results[0])


def test_tiny_rho_reproduces_the_plain_trainer(tmp_path):
    data = lm_dataset(n=8)
    plain, sam = tiny_llama(), tiny_llama()
    kwargs = base_args(tmp_path, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2)
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    SAMTrainer(model=sam, args=SAMTrainingArguments(**kwargs, sam_rho=1e-9), train_dataset=data).train()
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Exact restoration


@pytest.mark.parametrize(
    "precision",
    [
        {},
        {"bf16": True},  # bf16 autocast (fp32 master weights)
        {"param_dtype": torch.bfloat16},
        {"param_dtype": torch.float16},
    ],
    ids=["fp32", "bf16-autocast", "bf16-params", "fp16-params"],
)
@pytest.mark.parametrize("adaptive", [False, True])
def test_learning_rate_zero_never_changes_the_weights(tmp_path, precision, adaptive):
    precision = dict(precision)
    dtype = precision.pop("param_dtype", torch.float32)
    model = tiny_llama().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(
        **base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, **precision),
        learning_rate=0.0,
        optim="sgd",
        sam_rho=0.5,
        sam_adaptive=adaptive,
    )
    SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=8)).train()
    for k, v in model.state_dict().items():
        assert v.dtype == dtype
        assert torch.equal(v, before[k]), k


class Branchy(nn.Module):
    """Linear regression whose `extra` weight joins only on odd forward calls (the first SAM pass of step 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.extra = nn.Parameter(torch.ones(4))
        self.unused = nn.Parameter(torch.ones(3))  # never gets a gradient: never perturbed
        self.calls = 0

    def forward(self, x, labels):
        self.calls += 1
        y = self.linear(x).squeeze(-1)
        if self.calls % 2 == 1:
            y = y + x @ self.extra
        return {"loss": F.mse_loss(y, labels)}


def test_parameter_without_gradient_in_a_pass_is_left_exact(tmp_path):
    model = Branchy()
    extra, unused = model.extra.detach().clone(), model.unused.detach().clone()
    args = SAMTrainingArguments(**sgd_args(tmp_path, per_device_train_batch_size=8, max_steps=1), sam_rho=0.5)
    SAMTrainer(model=model, args=args, train_dataset=regression_dataset()).train()
    assert model.calls == 2
    # `extra` had a gradient in the first pass only: perturbed, then restored, and SGD got no gradient for it.
    assert torch.equal(model.extra.detach(), extra)
    assert torch.equal(model.unused.detach(), unused)


class FailingSecondPass(nn.Module):
    def __init__(self, fail_on_call: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.fail_on_call = fail_on_call
        self.calls = 0

    def forward(self, x, labels):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom in the perturbed pass")
        return {"loss": F.mse_loss(self.linear(x).squeeze(-1), labels)}


@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_exception_in_the_second_pass_restores_the_weights(tmp_path, accumulation):
    model = FailingSecondPass(fail_on_call=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=8, max_steps=1), sam_rho=0.5, sam_accumulation=accumulation
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=regression_dataset())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# What is perturbed


def test_lora_trains_adapters_only_and_matches_the_reference(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().double()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, config)
    # LoRA B starts at zero; give it values so that both factors get gradients from the first step.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference_model = copy.deepcopy(model)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    start = trainable_state(model)
    data = lm_dataset(n=4)
    args = SAMTrainingArguments(**sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3), sam_rho=0.05)
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k]), k
    want = reference_sam_sgd(reference_model, windows_of(data, 4, 1, 3), lr=0.5, rho=0.05)
    assert set(want) == set(start) and all("lora_" in k for k in want)
    assert_updates_close(start, trainable_state(model), want)


class UnfreezeAtStep(TrainerCallback):
    """Freezes the embeddings when training starts (after the optimizer took them in) and unfreezes them later."""

    def __init__(self, model, step):
        self.weight, self.step = model.get_input_embeddings().weight, step

    def on_train_begin(self, args, state, control, **kwargs):
        self.weight.requires_grad_(False)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.weight.requires_grad_(True)


def test_layer_unfrozen_during_training_is_perturbed_from_then_on(tmp_path):
    # SAM lists the trainable parameters once per model; `requires_grad` must still be read at every step.
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    data = lm_dataset(n=6)
    args = SAMTrainingArguments(**sgd_args(tmp_path, per_device_train_batch_size=2, max_steps=3), sam_rho=0.05)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    start = trainable_state(model)
    trainer.add_callback(UnfreezeAtStep(model, step=1))
    trainer.train()
    windows = windows_of(data, 2, 1, 3)
    embeddings = reference_model.get_input_embeddings().weight
    embeddings.requires_grad_(False)
    after_first = reference_sam_sgd(reference_model, windows[:1], lr=0.5, rho=0.05)
    with torch.no_grad():
        for name, p in reference_model.named_parameters():
            if name in after_first:
                p.copy_(after_first[name])
    embeddings.requires_grad_(True)
    want = reference_sam_sgd(reference_model, windows[1:], lr=0.5, rho=0.05)
    assert_updates_close(start, trainable_state(model), want)


def test_parameter_listing_follows_registrations_and_requires_grad():
    from hf_sam.listing import ModelListing

    listing = ModelListing()
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    def ids(params):
        return [id(p) for p in params]

    assert ids(listing(model)) == ids(model.parameters())
    model[0].weight.requires_grad_(False)
    assert ids(listing(model)) == ids(p for p in model.parameters() if p.requires_grad)
    model.append(nn.Linear(2, 3))  # a new module (an adapter, a new head)
    model[1].weight = nn.Parameter(torch.ones(2, 2))  # a replaced parameter
    model[1].register_parameter("scale", nn.Parameter(torch.ones(())))
    assert ids(listing(model)) == ids(p for p in model.parameters() if p.requires_grad)
    other = nn.Linear(2, 2)  # another model: listed on its own
    assert ids(listing(other)) == ids(other.parameters())
    # Registrations outside the model leave the list alone: Llama's forward slices its ModuleList at every call.
    llama = tiny_llama()
    listed = listing(llama)
    llama(torch.tensor([[1, 2, 3]]))
    nn.Linear(2, 2)
    assert not listing._stale and ids(listing(llama)) == ids(listed)


class ConstantLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x, labels):
        return {"loss": (self.w * 0.0).sum() + 1.0}


def test_zero_gradient_skips_the_perturbation_and_is_logged(tmp_path):
    model = ConstantLoss()
    args = SAMTrainingArguments(**sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2), sam_rho=0.05)
    trainer = SAMTrainer(model=model, args=args, train_dataset=regression_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sam_skipped"] for h in logs] == [1.0, 1.0]
    assert torch.equal(model.w.detach(), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# Randomness


class MaskRecorder(nn.Module):
    """Dropout-like model that records each forward's random mask and its input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.masks, self.inputs = [], []

    def forward(self, x, labels):
        mask = (torch.rand(x.shape) > 0.5).float()
        self.masks.append(mask)
        self.inputs.append(x.clone())
        return {"loss": F.mse_loss(self.linear(x * mask).squeeze(-1), labels)}


@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_both_passes_see_the_same_masks_and_the_rng_stream_is_unchanged(tmp_path, accumulation):
    data = regression_dataset(n=16)
    kwargs = base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    plain = MaskRecorder()
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    sam = MaskRecorder()
    args = SAMTrainingArguments(**kwargs, sam_accumulation=accumulation)
    SAMTrainer(model=sam, args=args, train_dataset=data).train()
    assert len(sam.masks) == 2 * len(plain.masks) == 12
    # Clean passes of the SAM run, in order: the plain run's masks and inputs (data order and RNG as if one pass).
    per_step = 2  # micro-batches per optimizer step
    if accumulation == "exact":  # clean 1, clean 2, perturbed 1, perturbed 2
        order = [s * 2 * per_step + i for s in range(3) for i in range(per_step)]
        twins = [s * 2 * per_step + per_step + i for s in range(3) for i in range(per_step)]
    else:  # clean 1, perturbed 1, clean 2, perturbed 2
        order = list(range(0, 12, 2))
        twins = list(range(1, 12, 2))
    for k, (i, j) in enumerate(zip(order, twins)):
        assert torch.equal(sam.masks[i], plain.masks[k])
        assert torch.equal(sam.inputs[i], plain.inputs[k])
        assert torch.equal(sam.masks[j], sam.masks[i])  # the perturbed pass reuses the clean pass's mask


# ---------------------------------------------------------------------------------------------------------------
# Logging


def test_logs_clean_loss_and_sam_metrics(tmp_path):
    data = lm_dataset(n=8)
    kwargs = base_args(tmp_path, per_device_train_batch_size=4, max_steps=4, logging_steps=2, learning_rate=1e-2)
    plain = tiny_llama()
    plain_trainer = Trainer(model=plain, args=TrainingArguments(**{**kwargs, "max_steps": 1}), train_dataset=data)
    plain_trainer.train()
    trainer = SAMTrainer(model=tiny_llama(), args=SAMTrainingArguments(**kwargs), train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert {"sam_perturbed_loss", "sam_sharpness", "sam_grad_norm", "sam_skipped"} <= set(h)
        assert math.isclose(h["sam_sharpness"], h["sam_perturbed_loss"] - h["loss"], rel_tol=1e-4, abs_tol=1e-6)
        assert h["sam_sharpness"] > 0  # a random network: the ascent direction increases the loss
        assert h["sam_skipped"] == 0.0
    # The reported loss is the clean loss: the first step's equals the plain Trainer's (same weights, same batch).
    first_sam_loss = trainer.state.log_history[0]["loss"]
    assert "sam_sharpness" in trainer.state.log_history[0]
    assert plain_trainer.state.log_history[-1]["train_loss"] == pytest.approx(first_sam_loss, rel=0.2)


def test_first_step_loss_and_grad_norm_are_the_plain_trainers(tmp_path):
    data = lm_dataset(n=4)
    kwargs = base_args(tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2)
    plain = Trainer(model=tiny_llama(), args=TrainingArguments(**kwargs), train_dataset=data)
    plain.train()
    sam = SAMTrainer(model=tiny_llama(), args=SAMTrainingArguments(**kwargs), train_dataset=data)
    sam.train()
    p, s = plain.state.log_history[0], sam.state.log_history[0]
    assert s["loss"] == pytest.approx(p["loss"], rel=1e-6)
    assert s["sam_grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-5)  # first-pass gradient = plain gradient


def test_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = SAMTrainingArguments(
        **{**base_args(tmp_path, per_device_train_batch_size=4, max_steps=2), "report_to": ["tensorboard"]}
    )
    SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(n=8)).train()
    tags = set()
    for run in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(run.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/sam_sharpness", "train/sam_perturbed_loss", "train/sam_grad_norm", "train/loss"} <= tags


# ---------------------------------------------------------------------------------------------------------------
# Optimizers, schedules, clipping, checkpointing, mixed precision


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor", "adagrad", "rmsprop"])
def test_every_optimizer_trains(tmp_path, optim):
    model = tiny_llama()
    start = trainable_state(model)
    args = SAMTrainingArguments(
        **base_args(
            tmp_path,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            optim=optim,
            learning_rate=1e-2,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            weight_decay=0.01,
            max_grad_norm=1.0,
        ),
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=16))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["sam_sharpness"]) for h in logs)
    assert any(not torch.equal(v, start[k]) for k, v in trainable_state(model).items())


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    results = []
    for checkpointing in [False, True]:
        model = tiny_llama()
        args = SAMTrainingArguments(
            **base_args(
                tmp_path,
                per_device_train_batch_size=4,
                max_steps=2,
                learning_rate=1e-2,
                gradient_checkpointing=checkpointing,
            )
        )
        SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=8)).train()
        results.append(trainable_state(model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6)


def relative_update_error(start, got, want):
    num = sum(((got[k] - want[k]) ** 2).sum() for k in want)
    den = sum(((want[k] - start[k]) ** 2).sum() for k in want)
    return float((num / den).sqrt())


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    start = trainable_state(tiny_llama())
    results = []
    for bf16 in [False, True]:
        model = tiny_llama()
        args = SAMTrainingArguments(
            **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3, bf16=bf16), sam_rho=0.05
        )
        trainer = SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=8))
        trainer.train()
        results.append((trainable_state(model), trainer.state.log_history[-2]))
    (fp32, fp32_log), (bf16, bf16_log) = results
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert bf16_log["sam_sharpness"] == pytest.approx(fp32_log["sam_sharpness"], rel=0.1)
    assert relative_update_error(start, bf16, fp32) < 0.05


def fp16_trainer(tmp_path, init_scale, max_grad_norm=1.0, steps=3):
    """fp16 autocast with a torch.amp.GradScaler, as Accelerate sets it up on a GPU.

    On CPU Accelerate turns native fp16 AMP off and creates no scaler, so the test switches both on by hand.
    """
    model = tiny_llama()
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=steps, fp16=True, max_grad_norm=max_grad_norm)
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=8))
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    return trainer, model


def test_fp16_gradscaler_gives_the_unscaled_update(tmp_path):
    """The perturbation uses the scaled gradients (scale-invariant) and never unscales them itself.

    Clipping makes the Trainer unscale once; a second `unscale_` in the same step would raise inside GradScaler.
    """
    start = trainable_state(tiny_llama())
    scaled, scaled_model = fp16_trainer(tmp_path, init_scale=2.0**12)
    scaled.train()
    unit, unit_model = fp16_trainer(tmp_path, init_scale=1.0)
    unit.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0**12  # no overflow, no skipped step
    assert relative_update_error(start, trainable_state(scaled_model), trainable_state(unit_model)) < 1e-3
    s, u = scaled.state.log_history[0], unit.state.log_history[0]
    assert s["sam_grad_norm"] == pytest.approx(u["sam_grad_norm"], rel=1e-3)  # logged unscaled
    assert s["sam_skipped"] == 0.0 and s["sam_sharpness"] > 0


def test_fp16_overflow_skips_the_perturbation_and_the_step(tmp_path):
    trainer, model = fp16_trainer(tmp_path, init_scale=2.0**60, max_grad_norm=0.0, steps=1)
    before = trainable_state(model)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["sam_skipped"] == 1.0
    assert log["sam_perturbed_loss"] == log["loss"]  # the second pass ran at w itself
    assert trainer.accelerator.scaler.get_scale() == 2.0**59  # GradScaler saw the inf and backed off
    for k, v in trainable_state(model).items():
        assert torch.equal(v, before[k]), k  # step skipped, nothing perturbed left behind, no NaN


def test_sam_config_overrides_the_arguments(tmp_path):
    args = SAMTrainingArguments(**base_args(tmp_path, max_steps=1), sam_rho=0.05)
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(), sam_config=SAMConfig(rho=0.2))
    assert trainer.sam_config.rho == 0.2
    plain_args = TrainingArguments(**base_args(tmp_path, max_steps=1))
    assert SAMTrainer(model=tiny_llama(), args=plain_args, train_dataset=lm_dataset()).sam_config == SAMConfig()
