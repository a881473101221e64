"""The Trainer adapter: `SAMMixin` turns any `transformers.Trainer` subclass into a SAM trainer.

The mixin only connects the Trainer to SAM's step engine (`engine.py`), held in one attribute, `_sam`; it overrides:

- `training_step` (public): one micro-batch through the engine, whose passes each run the parent's own
  `training_step`, so loss scaling, `num_items_in_batch`, mixed precision and `accelerator.backward` stay the
  Trainer's. The Trainer then clips, steps the optimizer and schedules the learning rate as usual, on the SAM gradient.
- `compute_loss` (public): the parent's, through the variant. `log` (public): adds the `sam_*` metrics.
  `create_model_card` (public): names SAM.
- `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler` (private, no public hook does the job;
  docs/concepts.md lists the private hooks with the versions the tests cover): SAM's own state (`sam_state.pt`) is
  saved and loaded with the optimizer's, in the same checkpoint folder, on every process that saves the optimizer.

A new `TrainerState` marks a new training run (every `train()`, `auto_find_batch_size` retry and search trial builds
one): the engine resets its per-run state there, without a callback in the Trainer's callback list.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .config import SAMConfig
from .engine import SAMEngine
from .model_card import add_sam_to_model_card
from .setup_checks import check_before_setup

logger = logging.get_logger(__name__)

__all__ = ["SAM_STATE_NAME", "SAMMixin", "SAMTrainer", "enable_sam"]

SAM_STATE_NAME = "sam_state.pt"


def _state_file(args: Any) -> str:
    # LookSAM's cache can differ between processes only in its rounding; each process keeps its own.
    return f"sam_state-rank{args.process_index}.pt" if args.world_size > 1 else SAM_STATE_NAME


def _attach_engine(trainer: Trainer, sam_config: SAMConfig | None) -> None:
    """Give a constructed Trainer its SAM engine (both constructors have run `check_before_setup`)."""

    def run_pass(model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        # Looked up at each call, as `super().training_step(...)` would be (a patched Trainer is seen).
        return super(SAMMixin, trainer).training_step(model, inputs, num_items_in_batch)

    trainer._sam = SAMEngine(trainer, run_pass, sam_config)


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

    _sam: SAMEngine

    def __init__(self, *args: Any, sam_config: SAMConfig | None = None, **kwargs: Any) -> None:
        # Before the parent's constructor: it may load models or start a generation server.
        check_before_setup(type(self), sam_config)
        super().__init__(*args, **kwargs)
        _attach_engine(self, sam_config)

    @property
    def sam_config(self) -> SAMConfig:
        """The SAM settings in use (those of the current run)."""
        return self._sam.config

    @property
    def sam_in_perturbed_pass(self) -> bool:
        """True while the perturbed pass runs at w + e: a subclass that records something of its own in
        `compute_loss` (instrumentation, say) can skip the perturbed pass's records."""
        return self._sam.ctx.in_perturbed_pass

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch of SAM; returns the clean (unperturbed) loss, as the Trainer reports it."""
        return self._sam.micro_batch(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        """The parent's loss, through the variant (Functional-SAM changes what the perturbed pass differentiates)."""
        return self._sam.compute_loss(super().compute_loss, model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the `sam_*` averages of the logging window to each training log (the ones that carry `loss`)."""
        if "loss" in logs:
            logs.update(self._sam.logs())
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
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Save SAM's state (`sam_state.pt`) beside the optimizer's, whose `optimizer.pt` stays untouched."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save or self.args.world_size > 1:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self._sam.state_dict(), os.path.join(output_dir, _state_file(self.args)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, _state_file(self.args))
        if os.path.isfile(path):
            self._sam.load(path)
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
        _attach_engine(trainer, sam_config)
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
