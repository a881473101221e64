"""Trainer integration: `SAMMixin` turns any `transformers.Trainer` subclass into a SAM trainer.

Only public extension points are used: `training_step` runs SAM's two passes (each one through the parent's own
`training_step`, so loss scaling, `num_items_in_batch`, mixed precision and `accelerator.backward` stay the
Trainer's), `log` adds the `sam_*` metrics, and a callback resets per-run state. The Trainer then clips, steps the
optimizer and schedules the learning rate as usual, on the SAM gradient.

One optimizer step with gradient accumulation k:

- `accumulation="exact"`: micro-batches 1..k run the clean pass (their inputs and RNG states are kept); at the last
  one the accumulated gradient gives one perturbation, all k micro-batches re-run at w + e, then w is restored.
- `accumulation="micro"`: each micro-batch runs clean pass, perturbation, perturbed pass, restore; the gradient
  accumulated so far is set aside during its clean pass and never wiped.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from .config import SAMArguments, SAMConfig
from .distributed import gradient_sync, unsupported_setup_reason
from .perturbation import WeightBackup, perturb_, restore_
from .rng import RNGState, capture_rng_state, restore_rng_state

logger = logging.get_logger(__name__)

__all__ = ["SAMMixin", "SAMTrainer"]

# Optimizers that update the weights inside `backward`: SAM's second pass would step at the perturbed weights.
_FUSED_BACKWARD_OPTIMIZERS = {OptimizerNames.LOMO, OptimizerNames.ADALOMO}


class _SAMMetrics:
    """Sums of the per-step SAM metrics, kept on the device and read back only when the Trainer logs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clean_loss: torch.Tensor | float = 0.0
        self.perturbed_loss: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float = 0.0
        self.skipped: torch.Tensor | float = 0.0
        self.steps = 0  # optimizer steps since the last log
        self.perturbations = 0  # one per step ("exact") or per micro-batch ("micro")

    def add_perturbation(self, norm: torch.Tensor, skipped: torch.Tensor) -> None:
        self.grad_norm = self.grad_norm + torch.where(skipped, torch.zeros_like(norm), norm)
        self.skipped = self.skipped + skipped.float()
        self.perturbations += 1

    def pop(self, accelerator) -> dict[str, float]:
        """Window averages, reduced across processes (a collective: every rank calls `log` with the loss)."""
        values = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(())
                for v in (self.clean_loss, self.perturbed_loss, self.grad_norm, self.skipped)
            ]
        )
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        clean, perturbed, norm, skipped = values.tolist()
        unskipped = self.perturbations - skipped
        logs = {
            "sam_perturbed_loss": perturbed / self.steps,
            "sam_sharpness": (perturbed - clean) / self.steps,
            "sam_grad_norm": norm / unskipped if unskipped > 0 else float("nan"),
            "sam_skipped": skipped / self.perturbations,
        }
        self.reset()
        return logs


class _SAMStateCallback(TrainerCallback):
    """Drops per-run SAM state at each (re)start of the training loop, e.g. `auto_find_batch_size` retries."""

    def __init__(self, trainer: SAMMixin) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._sam_stash.clear()
            trainer._sam_metrics.reset()


class SAMMixin:
    """Adds Sharpness-Aware Minimization to a `transformers.Trainer` subclass.

    Put it first among the bases: `class SAMSFTTrainer(SAMMixin, SFTTrainer): ...`.

    Args:
        *args: Passed to the Trainer.
        sam_config (`SAMConfig`, *optional*): The SAM settings. Defaults to the `sam_*` fields of `args` when it is
            a `SAMArguments` (e.g. `SAMTrainingArguments`), else to `SAMConfig()`.
        **kwargs: Passed to the Trainer.

    Raises:
        `ValueError`: when SAM cannot run with this setup (DeepSpeed, an optimizer that steps inside `backward`).
    """

    def __init__(self, *args: Any, sam_config: SAMConfig | None = None, **kwargs: Any) -> None:
        if sam_config is not None and not isinstance(sam_config, SAMConfig):
            raise TypeError(f"`sam_config` must be a `SAMConfig`, got {type(sam_config).__name__}.")
        super().__init__(*args, **kwargs)
        if sam_config is None:
            if isinstance(self.args, SAMArguments):
                sam_config = self.args.to_sam_config()
            else:
                sam_config = SAMConfig()
                logger.info(f"No `sam_config` and no `sam_*` fields in the arguments: using {sam_config}.")
        self.sam_config = sam_config
        reason = unsupported_setup_reason(self)
        if reason is not None:
            raise ValueError(reason)
        if self.args.optim in _FUSED_BACKWARD_OPTIMIZERS:
            raise ValueError(
                f"`optim={self.args.optim.value!r}` updates the weights inside `backward`, so SAM's second pass would "
                "step at the perturbed weights. Use an optimizer that steps after `backward`, e.g. `adamw_torch`, "
                "`sgd` or `adafactor`."
            )
        self._sam_backup = WeightBackup()
        self._sam_stash: list[tuple[dict[str, Any], RNGState]] = []
        self._sam_stash_step = -1
        self._sam_metrics = _SAMMetrics()
        # True while the second pass runs the parent's `training_step` at w + e: subclasses that record their own
        # metrics in `compute_loss` (TRL's trainers) read it to keep the perturbed pass out of them.
        self._sam_in_perturbed_pass = False
        self.add_callback(_SAMStateCallback(self))

    # ------------------------------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch of SAM; returns the clean (unperturbed) loss, as the Trainer reports it."""
        if self.sam_config.accumulation == "micro":
            return self._sam_micro_step(model, inputs, num_items_in_batch)
        return self._sam_exact_step(model, inputs, num_items_in_batch)

    def _sam_exact_step(self, model, inputs, num_items_in_batch):
        if self._sam_stash_step != self.state.global_step:  # a new accumulation window
            self._sam_stash.clear()
            self._sam_stash_step = self.state.global_step
        self._sam_stash.append((inputs, capture_rng_state()))
        last = self.accelerator.sync_gradients
        # Micro-batches before the last are already inside the Trainer's `no_sync`.
        with gradient_sync(model, enabled=last and self.sam_config.sync == "global"):
            clean_loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_metrics.clean_loss = self._sam_metrics.clean_loss + clean_loss
        if not last:
            return clean_loss
        stash, self._sam_stash = self._sam_stash, []
        self._sam_second_pass(model, stash, num_items_in_batch, accumulated_grads=None)
        self._sam_metrics.steps += 1
        return clean_loss

    def _sam_micro_step(self, model, inputs, num_items_in_batch):
        trainable = self._sam_trainable_parameters(model)
        accumulated = [p.grad for p in trainable]  # set aside, never wiped
        for p in trainable:
            p.grad = None
        rng = capture_rng_state()
        try:
            with gradient_sync(model, enabled=self.sam_config.sync == "global"):
                clean_loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            for p, g in zip(trainable, accumulated):
                p.grad = g
            raise
        self._sam_metrics.clean_loss = self._sam_metrics.clean_loss + clean_loss
        self._sam_second_pass(model, [(inputs, rng)], num_items_in_batch, accumulated_grads=(trainable, accumulated))
        if self.accelerator.sync_gradients:
            self._sam_metrics.steps += 1
        return clean_loss

    def _sam_second_pass(self, model, stash, num_items_in_batch, accumulated_grads) -> None:
        """Perturb with the current gradients, re-run `stash` at w + e (same RNG), restore w exactly."""
        trainable = self._sam_trainable_parameters(model)
        params = [p for p in trainable if p.grad is not None]  # no gradient in the first pass: not perturbed
        after_first_pass = capture_rng_state()
        backups = self._sam_backup.buffers_for(params)
        try:
            if params:
                norm, skipped = perturb_(
                    params, backups, self.sam_config.rho, self.sam_config.adaptive, self.sam_config.eta
                )
                self._sam_metrics.add_perturbation(self._sam_unscaled(norm), skipped)
            for p in trainable:  # e lived in .grad; free it before the second pass allocates its own
                p.grad = None
            if accumulated_grads is not None:
                for p, g in zip(*accumulated_grads):
                    p.grad = g
            last = self.accelerator.sync_gradients
            self._sam_in_perturbed_pass = True
            for i, (micro_inputs, rng) in enumerate(stash):
                restore_rng_state(rng)  # same dropout masks as the clean pass
                with gradient_sync(model, enabled=last and i == len(stash) - 1):
                    perturbed_loss = super().training_step(model, micro_inputs, num_items_in_batch)
                self._sam_metrics.perturbed_loss = self._sam_metrics.perturbed_loss + perturbed_loss
        except BaseException:
            model.zero_grad(set_to_none=True)  # a half-accumulated SAM gradient must not reach the optimizer
            raise
        finally:
            self._sam_in_perturbed_pass = False
            restore_(params, backups)
            restore_rng_state(after_first_pass)  # later randomness as if one pass ran

    @staticmethod
    def _sam_trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
        # `parameters()` yields a tied weight once, so it is perturbed once.
        return [p for p in model.parameters() if p.requires_grad]

    def _sam_unscaled(self, norm: torch.Tensor) -> torch.Tensor:
        # fp16: the gradients carry GradScaler's factor; the logged norm should not.
        scaler = getattr(self.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        return norm / scale.to(norm.device).reshape(()) if scale is not None else norm

    # ------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the `sam_*` window averages to each training log (the ones that carry `loss`)."""
        if "loss" in logs and self._sam_metrics.steps > 0:
            logs.update(self._sam_metrics.pop(self.accelerator))
        super().log(logs, *args, **kwargs)


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
