"""Trainer integration: `SAMMixin` turns any `transformers.Trainer` subclass into a SAM trainer.

`training_step` (public) runs SAM's passes, each one through the parent's own `training_step`, so loss scaling,
`num_items_in_batch`, mixed precision and `accelerator.backward` stay the Trainer's; `log` (public) adds the `sam_*`
metrics; `create_model_card` (public) names SAM. The Trainer then clips, steps the optimizer and schedules the
learning rate as usual, on the SAM gradient. Private hooks, each because no public one does the job (docs/concepts.md
lists them with the versions the tests cover):

- `Trainer._save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: SAM's own state (`sam_state.pt`) is
  saved and loaded with the optimizer's, in the same checkpoint folder, on every process that saves the optimizer.
- `GradScaler._scale`: the logged gradient norm is unscaled under fp16 without `get_scale()`, which reads the scale
  back to the host at every step.
- `nn.Module._buffers`: buffers are listed with their owning module and name, and one that a forward re-assigned is
  put back.
- A new `TrainerState` marks a new training run (every `train()`, `auto_find_batch_size` retry and search trial
  builds one): per-run state is reset there, without a callback in the Trainer's callback list.

One optimizer step with gradient accumulation k:

- `accumulation="exact"`: micro-batches 1..k run the clean pass (their inputs and RNG states are kept); at the last
  one the accumulated gradient gives one perturbation, all k micro-batches re-run at w + e (each from the RNG
  states and buffers its clean pass started from), then w, the buffers and the trainer's bookkeeping are restored.
- `accumulation="micro"`: each micro-batch runs clean pass, perturbation, perturbed pass, restore; the gradient
  accumulated so far is set aside during its clean pass and never wiped.

Under DeepSpeed ZeRO-1/2 (`deepspeed_support.DeepSpeedSAM`, set up at the start of each run) the clean pass runs on
the engine's module outside the engine, its gradient is all-reduced into `.grad` by SAM, the perturbed pass sets the
engine's accumulation boundary itself, and the engine's step (which Accelerate's backward would run at the boundary)
comes after the restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .config import SAMArguments, SAMConfig
from .deepspeed_support import DeepSpeedSAM, deepspeed_sam_for
from .distributed import defers_unsynchronised_gradients, gradient_sync, unsupported_setup_reason
from .listing import ModelListing
from .metrics import SAMMetrics
from .model_card import add_sam_to_model_card
from .perturbation import WeightBackup, perturb_, restore_
from .rng import RNGState, capture_rng_state, restore_rng_state
from .setup_checks import check_before_setup, fused_backward_optimizer_reason
from .side_effects import restore_bookkeeping, restore_buffers, save_buffers, snapshot_bookkeeping
from .variants import VARIANTS, SAMVariant, leading_fraction, sam_step_index, scheduled_rho

logger = logging.get_logger(__name__)

__all__ = ["SAM_STATE_NAME", "SAMMixin", "SAMTrainer", "enable_sam"]

SAM_STATE_NAME = "sam_state.pt"


@dataclasses.dataclass(frozen=True)
class _StepPlan:
    """What this optimizer step does; fixed for the whole accumulation window."""

    kind: str  # "plain", "sam" (SAMMixin's two passes) or "single" (the variant's own one-pass step)
    rho: float = 0.0


class SAMMixin:
    """Adds Sharpness-Aware Minimization to a `transformers.Trainer` subclass.

    Put it first among the bases: `class SAMSFTTrainer(SAMMixin, SFTTrainer): ...`.

    Args:
        *args: Passed to the Trainer.
        sam_config (`SAMConfig`, *optional*): The SAM settings. Defaults to the `sam_*` fields of `args` when it is
            a `SAMArguments` (e.g. `SAMTrainingArguments`), read again at the start of every training run, else to
            `SAMConfig()`.
        **kwargs: Passed to the Trainer.

    Raises:
        `ValueError`: when SAM cannot run with this setup (DeepSpeed outside ZeRO-1/2, FSDP1, an optimizer that steps
            inside `backward`, a trainer that generates inside `training_step`, a variant's own refusals).
    """

    def __init__(self, *args: Any, sam_config: SAMConfig | None = None, **kwargs: Any) -> None:
        # Before the parent's constructor: it may load models or start a generation server.
        check_before_setup(type(self), sam_config)
        super().__init__(*args, **kwargs)
        self._sam_setup(sam_config)

    def _sam_setup(self, sam_config: SAMConfig | None) -> None:
        """Everything SAM adds to a constructed Trainer; `enable_sam` calls it on a Trainer built elsewhere (both
        have run `check_before_setup`)."""
        self._sam_explicit_config = sam_config
        self._sam_variant: SAMVariant | None = None
        self._sam_refresh_config()
        self._sam_backup = WeightBackup()
        self._sam_listing = ModelListing()  # the model's trainable parameters and buffers
        self._sam_metrics = SAMMetrics()
        self._sam_in_perturbed_pass = False  # True while the second pass runs the parent's `training_step` at w + e
        self._sam_run_state: Any = None  # the `TrainerState` of the run SAM last saw: a new one is a new run
        self._sam_deepspeed: DeepSpeedSAM | None = None  # DeepSpeed ZeRO-1/2: SAM's passes on the engine
        self._sam_reset_window()

    def _sam_refresh_config(self) -> None:
        """Read the settings (without an explicit config, the live `args`: a search trial sets them) and check the
        setup, before any weight changes. The variant, and its state, is kept while the settings stay the same."""
        if self._sam_explicit_config is not None:
            config = self._sam_explicit_config
        elif isinstance(self.args, SAMArguments):
            config = self.args.to_sam_config()  # validates: the same errors as at construction
        else:
            config = SAMConfig()
        self.sam_config = config
        if self._sam_variant is None or self._sam_variant.config != config:
            self._sam_variant = VARIANTS[config.method](config)
        reason = unsupported_setup_reason(self)
        if reason is not None:
            raise ValueError(reason)
        reason = fused_backward_optimizer_reason(self.args.optim)
        if reason is not None:
            raise ValueError(reason)
        self._sam_variant.check_setup(self)

    def _sam_begin_run(self) -> None:
        """Start of a training run (a `train()` call, an `auto_find_batch_size` retry, a search trial)."""
        self._sam_refresh_config()
        self._sam_reset_window()
        self._sam_metrics.reset()
        self._sam_listing.clear()  # the Trainer may have wrapped or replaced the model
        self._sam_run_state = self.state
        # DeepSpeed: `train()` has just built the engine; it is checked here, before any weight changes.
        self._sam_deepspeed = deepspeed_sam_for(self) if getattr(self, "is_deepspeed_enabled", False) else None

    def _sam_parent_training_step(self, model, inputs, num_items_in_batch):
        """One forward-backward pass, the Trainer's own: what each of SAM's passes runs."""
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- the step ----------------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch of SAM; returns the clean (unperturbed) loss, as the Trainer reports it."""
        if self.state is not self._sam_run_state:  # each run builds a new `TrainerState`
            self._sam_begin_run()
        if self._sam_window_step != self.state.global_step:  # first micro-batch of an accumulation window
            self._sam_reset_window()
            self._sam_window_step = self.state.global_step
            self._sam_plan = self._sam_plan_step()
        plan = self._sam_plan
        self._sam_micro_index += 1
        if plan.kind == "plain":
            return super().training_step(model, inputs, num_items_in_batch)
        if plan.kind == "single":
            return self._sam_variant.single_pass(self, model, inputs, num_items_in_batch, plan.rho)
        if self.sam_config.accumulation == "micro":
            return self._sam_micro_step(model, inputs, num_items_in_batch, plan)
        return self._sam_exact_step(model, inputs, num_items_in_batch, plan)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        """The parent's loss, through the variant (Functional-SAM changes what the perturbed pass differentiates)."""
        return self._sam_variant.compute_loss(self, super().compute_loss, model, inputs, *args, **kwargs)

    def _sam_reset_window(self) -> None:
        # Per micro-batch of the window: its inputs, and the RNG states and buffers its clean pass started from.
        self._sam_stash: list[tuple[dict[str, Any], RNGState, list]] = []
        self._sam_window_step = -1
        self._sam_micro_index = -1
        self._sam_plan = _StepPlan("plain")
        if self._sam_deepspeed is not None:
            self._sam_deepspeed.reset()

    def _sam_plan_step(self) -> _StepPlan:
        cfg, step = self.sam_config, self.state.global_step
        max_steps = max(self.state.max_steps, 1)
        index = sam_step_index(step, max_steps, cfg.start_fraction, cfg.interval)
        if index is None:
            return _StepPlan("plain")
        base_lr = self.args.learning_rate
        learning_rate = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else base_lr
        rho = scheduled_rho(cfg.rho_schedule, cfg.rho, cfg.rho_min, learning_rate, base_lr, step / max_steps)
        if cfg.rho_schedule != "constant":
            self._sam_metrics.rho_sum += rho
            self._sam_metrics.rho_steps += 1
        return _StepPlan(self._sam_variant.step_kind(self, index), rho)

    def _sam_exact_step(self, model, inputs, num_items_in_batch, plan: _StepPlan):
        self._sam_stash.append((inputs, capture_rng_state(), save_buffers(self._sam_listing.buffer_owners(model))))
        last = self.accelerator.sync_gradients
        ds = self._sam_deepspeed
        if ds is not None:  # DeepSpeed: the clean pass outside the engine, its gradient in SAM's buffer
            with ds.first_pass(self._sam_listing(model)):
                clean_loss = self._sam_first_pass(ds.module, inputs, num_items_in_batch)
        else:
            # Micro-batches before the last are already inside the Trainer's `no_sync`.
            with gradient_sync(model, enabled=last and self.sam_config.sync == "global"):
                clean_loss = self._sam_first_pass(model, inputs, num_items_in_batch)
        self._sam_metrics.step_clean = self._sam_metrics.step_clean + clean_loss
        if not last:
            return clean_loss
        stash, self._sam_stash = self._sam_stash, []
        if ds is not None:  # the window's gradient into `.grad`, all-reduced with "global"
            ds.load_gradient(all_reduce=self.sam_config.sync == "global")
        self._sam_second_pass(model, stash, num_items_in_batch, plan, accumulated_grads=None)
        if ds is not None:
            ds.step()  # DeepSpeed: the engine's step, deferred past the restore
        self._sam_metrics.end_step(self.args.logging_nan_inf_filter)
        return clean_loss

    def _sam_micro_step(self, model, inputs, num_items_in_batch, plan: _StepPlan):
        trainable = self._sam_listing(model)
        accumulated = [p.grad for p in trainable]  # set aside, never wiped
        for p in trainable:
            p.grad = None
        rng, buffers = capture_rng_state(), save_buffers(self._sam_listing.buffer_owners(model))
        ds = self._sam_deepspeed
        try:
            if ds is not None:  # DeepSpeed: the clean pass outside the engine, then its gradient into `.grad`
                with ds.first_pass(trainable):
                    clean_loss = self._sam_first_pass(ds.module, inputs, num_items_in_batch)
                ds.load_gradient(all_reduce=self.sam_config.sync == "global")
            else:
                with gradient_sync(model, enabled=self.sam_config.sync == "global"):
                    clean_loss = self._sam_first_pass(model, inputs, num_items_in_batch)
        except BaseException:
            for p, g in zip(trainable, accumulated):
                p.grad = g
            raise
        self._sam_metrics.step_clean = self._sam_metrics.step_clean + clean_loss
        self._sam_second_pass(model, [(inputs, rng, buffers)], num_items_in_batch, plan, (trainable, accumulated))
        if self.accelerator.sync_gradients:
            if ds is not None:
                ds.step()  # DeepSpeed: the engine's step, deferred past the restore
            self._sam_metrics.end_step(self.args.logging_nan_inf_filter)
        return clean_loss

    def _sam_first_pass(self, model, inputs, num_items_in_batch):
        fraction = self.sam_config.ascent_fraction
        if fraction < 1.0:  # ascent on a leading fraction of the micro-batch (Bahri et al. 2022)
            inputs, kept = leading_fraction(inputs, fraction)
            if num_items_in_batch is not None:  # keep the subset's loss on the scale of the whole micro-batch
                num_items_in_batch = num_items_in_batch * kept
        return super().training_step(model, inputs, num_items_in_batch)

    def _sam_second_pass(self, model, stash, num_items_in_batch, plan: _StepPlan, accumulated_grads) -> None:
        """SAM's second half, as davda54/sam's `first_step` + `second_step`:

        e = rho g / ||g||                   (ASAM: rho T^2 g / ||T g||; the variant may change the direction g)
        w <- w + e                          (w kept in a backup, bit for bit)
        g_SAM = grad L(w + e)               (each micro-batch again, with its clean pass's RNG and buffers)
        w <- w                              (copied back; the optimizer then steps at w with g_SAM)
        """
        # "micro" has just listed them: the same list its set-aside gradients belong to.
        trainable = accumulated_grads[0] if accumulated_grads is not None else self._sam_listing(model)
        params = [p for p in trainable if p.grad is not None]  # no gradient in the first pass: not perturbed
        variant, after_first_pass = self._sam_variant, capture_rng_state()
        backups = self._sam_backup.buffers_for(params)
        e, saved, perturbed = [], None, False
        try:
            if params:
                variant.direction_(self, params)  # .grad <- the direction to perturb along (g for SAM)
                norm, skipped = perturb_(params, backups, plan.rho, self.sam_config.adaptive, self.sam_config.eta)
                self._sam_metrics.add_perturbation(self._sam_unscaled(norm), skipped)  # .grad is now e
                e = [p.grad for p in params] if variant.keeps_perturbation else []
            for p in trainable:  # free e (kept only if the variant needs it) before the second pass allocates
                p.grad = None
            if accumulated_grads is not None:
                for p, g in zip(*accumulated_grads):
                    p.grad = g
            last = self.accelerator.sync_gradients
            # FSDP2 keeps an unsynchronised gradient inside FSDP, where the next micro-batch's (synchronised) clean
            # pass would reduce it together with its own: in "micro" mode every perturbed pass synchronises there.
            last = last or (accumulated_grads is not None and defers_unsynchronised_gradients(model))
            # Besides the weights, put back afterwards what the clean pass(es) left: module buffers (BatchNorm
            # statistics) and the Trainer subclass's own bookkeeping (TRL's token counts and metrics).
            saved = save_buffers(self._sam_listing.buffer_owners(model)), snapshot_bookkeeping(self)
            self._sam_in_perturbed_pass = perturbed = True
            # DeepSpeed: the engine's accumulation boundary stands for the synchronisation, and its step is deferred.
            ds = self._sam_deepspeed
            sync = gradient_sync if ds is None else ds.accumulation_boundary
            with contextlib.nullcontext() if ds is None else ds.deferred_step():
                for i, (micro_inputs, rng, buffers) in enumerate(stash):
                    restore_rng_state(rng)  # same dropout masks as the clean pass
                    restore_buffers(buffers)  # same running statistics as the clean pass
                    with sync(model, enabled=last and i == len(stash) - 1):
                        perturbed_loss = super().training_step(model, micro_inputs, num_items_in_batch)
                    self._sam_metrics.step_perturbed = self._sam_metrics.step_perturbed + perturbed_loss
            # The RNG now stands where one full pass over the micro-batches leaves it: as if SAM were off.
        except BaseException:
            # A half-accumulated SAM gradient must not reach the optimizer.
            if self._sam_deepspeed is not None:
                self._sam_deepspeed.discard_gradients()
            else:
                model.zero_grad(set_to_none=True)
            restore_rng_state(after_first_pass)
            raise
        finally:
            if perturbed:
                restore_buffers(saved[0])
                restore_bookkeeping(self, saved[1])
            self._sam_in_perturbed_pass = False
            restore_(params, backups)
        variant.after_sam_step(self, params, e, plan.rho)

    def _sam_unscaled(self, norm: torch.Tensor) -> torch.Tensor:
        # fp16: the gradients carry GradScaler's factor; the logged norm should not. `_scale` (private) rather than
        # `get_scale()`, which reads the scale back to the host.
        scaler = getattr(self.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        return norm / scale.to(norm.device).reshape(()) if scale is not None else norm

    # ---- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the `sam_*` window averages to each training log (the ones that carry `loss`)."""
        if "loss" in logs:
            logs.update(self._sam_metrics.pop(self.accelerator))
        super().log(logs, *args, **kwargs)

    # ---- model card --------------------------------------------------------------------------------------------
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The parent's model card, naming SAM (or its variant), its settings and its paper."""
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = tags + [t for t in ("hf_sam", "sam") if t not in tags]
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                card = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(add_sam_to_model_card(card, self.sam_config))

    # ---- checkpoints (private hooks: SAM's state is saved and loaded with the optimizer's) ----------------------
    def _sam_state_file(self) -> str:
        # LookSAM's cache can differ between processes only in its rounding; each process keeps its own.
        if self.args.world_size > 1:
            return f"sam_state-rank{self.args.process_index}.pt"
        return SAM_STATE_NAME

    def _sam_state_dict(self) -> dict[str, Any]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {"config": dataclasses.asdict(self.sam_config), **self._sam_variant.state_dict(names)}

    def _sam_load_state_dict(self, state: dict[str, Any]) -> None:
        self._sam_refresh_config()
        if state.get("config") != dataclasses.asdict(self.sam_config):
            logger.warning(
                f"Resuming with SAM settings {dataclasses.asdict(self.sam_config)} that differ from the "
                f"checkpoint's {state.get('config')}."
            )
        self._sam_variant.load_state_dict(state, dict(self.model.named_parameters()))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Save SAM's state (`sam_state.pt`) beside the optimizer's, whose `optimizer.pt` stays untouched."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save or self.args.world_size > 1:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self._sam_state_dict(), os.path.join(output_dir, self._sam_state_file()))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._sam_state_file())
        if os.path.isfile(path):
            self._sam_load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning(f"No SAM state in {checkpoint} (a checkpoint from a plain Trainer?): starting it afresh.")


_SAM_CLASSES: dict[type, type] = {}


def enable_sam(trainer: Trainer, sam_config: SAMConfig | None = None) -> Trainer:
    """Make an already constructed Trainer train with SAM, in place, and return it.

    For Trainers built by a framework (Axolotl, LLaMA-Factory, a TRL script): the object becomes an instance of
    `SAMMixin` in front of its own class, with the same validation, refusals, metrics and checkpoint state as a
    class written `class MyTrainer(SAMMixin, TheirTrainer)`.

    Args:
        trainer (`transformers.Trainer`): A constructed Trainer of any subclass, before `train()`.
        sam_config (`SAMConfig`, *optional*): The SAM settings; by default the `sam_*` fields of `trainer.args` (a
            `SAMArguments`), else `SAMConfig()`.

    Returns:
        The same `trainer`.

    Raises:
        `ValueError`: as `SAMMixin` does (an unsupported setup or trainer), or when `trainer` already has SAM.
    """
    check_before_setup(type(trainer), sam_config)
    if isinstance(trainer, SAMMixin):
        raise ValueError(f"`{type(trainer).__name__}` already trains with SAM; `enable_sam` takes a plain Trainer.")
    if not isinstance(trainer, Trainer):
        raise TypeError(f"`enable_sam` takes a `transformers.Trainer`, got {type(trainer).__name__}.")
    cls = type(trainer)
    if cls not in _SAM_CLASSES:
        _SAM_CLASSES[cls] = type(f"SAM{cls.__name__}", (SAMMixin, cls), {"__module__": cls.__module__})
    trainer.__class__ = _SAM_CLASSES[cls]
    try:
        trainer._sam_setup(sam_config)
    except BaseException:
        trainer.__class__ = cls
        raise
    return trainer


class SAMTrainer(SAMMixin, Trainer):
    """A drop-in `transformers.Trainer` that trains with SAM or ASAM.

    Takes the Trainer's arguments plus `sam_config`; with `SAMTrainingArguments` the `sam_*` fields configure SAM.

    Example:
        ```python
        from hf_sam import SAMTrainer, SAMTrainingArguments

        args = SAMTrainingArguments(output_dir="out", sam_rho=0.05)
        trainer = SAMTrainer(model=model, args=args, train_dataset=train_dataset)
        trainer.train()
        ```
    """
