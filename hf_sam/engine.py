"""The SAM step engine: one optimizer step of SAM, read like davda54/sam's `first_step` / `second_step`, and the
transaction rule.

The engine owns everything of one optimizer step: which micro-batch of the step this is and what the step runs (the
plan), the micro-batches whose clean pass has run (the stash), the weight backup, the list of perturbed parameters,
the metrics. It knows the Trainer only as a host: its public `args`, `state`, `accelerator`, `optimizer`,
`lr_scheduler` and `model`, and its own `training_step` (one forward-backward pass, `run_pass`), with which every
pass runs, so loss scaling, `num_items_in_batch`, mixed precision and `accelerator.backward` stay the Trainer's.
Variants see the step through a `StepContext`; gradient synchronisation is a `GradientSync` strategy (torch DDP/FSDP2
in `distributed.py`, DeepSpeed ZeRO-1/2 in `deepspeed_support.py`).

One optimizer step with gradient accumulation k:

- `accumulation="exact"`: micro-batches 1..k run the clean pass (their inputs, RNG states and buffers kept); at the
  last one the accumulated gradient gives one perturbation, all k micro-batches run again at w + e (each from the RNG
  states and buffers its clean pass started from), then w, the buffers and the Trainer's bookkeeping are restored.
- `accumulation="micro"`: each micro-batch runs clean pass, perturbation, perturbed pass, restore; the gradient
  accumulated so far is set aside during its clean pass and never wiped.

The transaction rule: the weights and every piece of variant state change only when a step completes. The weights
are at w whenever the engine hands control back to the Trainer (between micro-batches, on return, on an exception),
bit for bit. A variant stages what it updates and the engine commits it after the step's last micro-batch; a step
that raises, is stopped between micro-batches, or never reaches its last micro-batch is never committed, and the next
step begins from the state the last completed step left. A step whose perturbation is skipped (a gradient that is not
finite) is committed, but leaves the variant state as it was (decided on the device).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .config import SAMArguments, SAMConfig
from .distributed import GradientSync, unsupported_setup_reason
from .listing import ModelListing
from .metrics import SAMMetrics
from .perturbation import WeightBackup, perturb_, restore_
from .rng import capture_rng_state, restore_rng_state
from .schedules import leading_fraction, sam_step_index, scheduled_rho
from .setup_checks import fused_backward_optimizer_reason
from .side_effects import PassStart, left_alone
from .variants import VARIANTS, SAMVariant, StateError, StepContext, StepKind

logger = logging.get_logger(__name__)

__all__ = ["SAMEngine", "StepPlan"]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one optimizer step runs, fixed for all its micro-batches."""

    kind: StepKind
    rho: float = 0.0


class SAMEngine:
    """SAM's optimizer steps for one Trainer.

    Args:
        trainer: The Trainer it serves (read: `args`, `state`, `accelerator`, `optimizer`, `lr_scheduler`, `model`).
        run_pass (`Callable`): The Trainer's own `training_step(model, inputs, num_items_in_batch)`.
        explicit_config (`SAMConfig`, *optional*): Settings that win over the `sam_*` fields of `trainer.args`.
    """

    def __init__(self, trainer: Any, run_pass: Callable, explicit_config: SAMConfig | None = None) -> None:
        self.trainer = trainer
        self.explicit_config = explicit_config
        self.listing = ModelListing()  # the model's trainable parameters and buffers
        self.backup = WeightBackup()
        self.metrics = SAMMetrics()
        self.ctx = StepContext(trainer, run_pass, self.listing, self.backup)
        self.sync = GradientSync()
        self.config: SAMConfig = SAMConfig()
        self.variant: SAMVariant | None = None
        self._run_state: Any = None  # the `TrainerState` of the run the engine last saw: a new one is a new run
        self._step = -1  # the optimizer step whose micro-batches are running
        self._plan = StepPlan(StepKind.PLAIN)
        self._stash: list[PassStart] = []  # per micro-batch whose clean pass ran: what it started from
        self.refresh()

    # ---- settings and runs -------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the settings (without an explicit config, the live `args`: a search trial sets them) and check the
        setup, before any weight changes. The variant, and its state, is kept while the settings stay the same."""
        args = self.trainer.args
        if self.explicit_config is not None:
            config = self.explicit_config
        elif isinstance(args, SAMArguments):
            config = args.to_sam_config()  # validates: the same errors as at construction
        else:
            config = SAMConfig()
        self.config = config
        if self.variant is None or self.variant.config != config:
            self.variant = VARIANTS[config.method](config)
        for reason in (unsupported_setup_reason(self.trainer, config), fused_backward_optimizer_reason(args.optim)):
            if reason is not None:
                raise ValueError(reason)
        self.variant.check_setup(self.ctx)

    def begin_run(self) -> None:
        """Start of a training run (a `train()` call, an `auto_find_batch_size` retry, a search trial)."""
        self.refresh()
        self.metrics.reset()
        self.listing.clear()  # the Trainer may have wrapped or replaced the model
        self._run_state = self.trainer.state
        self._step = -1
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            from .deepspeed_support import deepspeed_sync_for

            # `train()` has just built the engine; it is checked here, before any weight changes.
            self.sync = deepspeed_sync_for(self.trainer)
        else:
            self.sync = GradientSync()

    def _begin_step(self) -> None:
        """First micro-batch of an optimizer step: whatever a step that never completed left is dropped."""
        self._step = self.trainer.state.global_step
        self._stash = []
        self._plan = self._plan_step()
        self.ctx.micro_index = -1
        self.ctx.kind = self._plan.kind
        self.sync.reset()
        self.metrics.begin_step()
        self.variant.begin_step(self.ctx)

    def _plan_step(self) -> StepPlan:
        cfg, state = self.config, self.trainer.state
        max_steps = max(state.max_steps, 1)
        index = sam_step_index(state.global_step, max_steps, cfg.start_fraction, cfg.interval)
        if index is None:
            return StepPlan(StepKind.PLAIN)
        base_lr = self.trainer.args.learning_rate
        scheduler = self.trainer.lr_scheduler
        learning_rate = scheduler.get_last_lr()[0] if scheduler is not None else base_lr
        progress = state.global_step / max_steps
        rho = scheduled_rho(cfg.rho_schedule, cfg.rho, cfg.rho_min, learning_rate, base_lr, progress)
        return StepPlan(self.variant.step_kind(self.ctx, index), rho)

    # ---- one micro-batch ---------------------------------------------------------------------------------------
    def micro_batch(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """One micro-batch of the current optimizer step; returns its clean (unperturbed) loss."""
        if self.trainer.state is not self._run_state:  # each run builds a new `TrainerState`
            self.begin_run()
        if self._step != self.trainer.state.global_step:
            self._begin_step()
        ctx, plan = self.ctx, self._plan
        ctx.micro_index += 1
        if plan.kind is StepKind.PLAIN:
            return ctx.run_pass(model, inputs, num_items_in_batch)
        if plan.kind is StepKind.ONE_PASS:
            loss = self.variant.one_pass(ctx, model, inputs, num_items_in_batch, plan.rho)
        else:
            loss = self._two_pass(model, inputs, num_items_in_batch)
        if ctx.is_last_micro_batch:
            self._commit()
        return loss

    def _two_pass(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """A micro-batch of a two-pass step: its clean pass, then, at the step's last micro-batch ("exact") or at each
        one ("micro"), the perturbation and the perturbed passes of the micro-batches kept so far."""
        micro, synchronise = self.config.accumulation == "micro", self.config.sync == "global"
        last = self.ctx.is_last_micro_batch
        perturb_now = micro or last
        trainable, owners = self.listing(model), self.listing.buffer_owners(model)
        self._stash.append(PassStart.capture(inputs, owners))
        set_aside = [p.grad for p in trainable] if micro else None  # the step's gradient so far: set aside, not wiped
        try:
            for p in trainable if micro else ():
                p.grad = None
            with self.sync.clean_pass(model, trainable, synchronise=synchronise and perturb_now) as clean_model:
                clean_loss = self._clean_pass(clean_model, inputs, num_items_in_batch)
            if perturb_now:
                self.sync.gradient_ready(all_reduce=synchronise)
        except BaseException:
            for p, g in zip(trainable, set_aside or ()):
                p.grad = g
            raise
        self.metrics.add_clean(clean_loss)
        if perturb_now:
            stash, self._stash = self._stash, []
            self._perturbed_passes(model, trainable, owners, stash, num_items_in_batch, set_aside)
            if last:
                self.sync.step()  # DeepSpeed: the engine's step, deferred past the restore
        return clean_loss

    def _clean_pass(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        fraction = self.config.ascent_fraction
        if fraction < 1.0:  # ascent on a leading fraction of the micro-batch (Bahri et al. 2022)
            inputs, kept = leading_fraction(inputs, fraction)
            if num_items_in_batch is not None:  # keep the subset's loss on the scale of the whole micro-batch
                num_items_in_batch = num_items_in_batch * kept
        return self.ctx.run_pass(model, inputs, num_items_in_batch)

    def _perturbed_passes(
        self,
        model: nn.Module,
        trainable: list[torch.Tensor],
        owners: list,
        stash: list[PassStart],
        num_items_in_batch: Any,
        set_aside: list[torch.Tensor | None] | None,
    ) -> None:
        """SAM's second half, as davda54/sam's `first_step` + `second_step`:

        e = rho g / ||g||                   (ASAM: rho T^2 g / ||T g||; the variant may change the direction g)
        w <- w + e                          (w kept in a backup, bit for bit)
        g_SAM = grad L(w + e)               (each micro-batch again, with its clean pass's RNG and buffers)
        w <- w                              (copied back; the optimizer then steps at w with g_SAM)

        Besides the weights, what the clean pass(es) left is put back afterwards: the model's buffers (BatchNorm
        statistics) and the Trainer subclass's own bookkeeping (TRL's token counts and metrics). `set_aside`
        ("micro"): the step's gradient of the earlier micro-batches, put back before the perturbed pass adds to it.
        """
        params = [p for p in trainable if p.grad is not None]  # no gradient in the clean pass: not perturbed
        rho, variant, ctx = self._plan.rho, self.variant, self.ctx
        after_clean_pass = capture_rng_state()
        backups = self.backup.buffers_for(params)
        e: list[torch.Tensor] = []
        skipped = torch.ones((), dtype=torch.bool)
        try:
            if params:
                variant.direction_(ctx, params)  # .grad <- the direction to perturb along (g for SAM)
                norm, skipped = perturb_(params, backups, rho, self.config.adaptive, self.config.eta)
                self.metrics.add_perturbation(self._unscaled(norm), skipped)  # .grad is now e
                e = [p.grad for p in params] if variant.keeps_perturbation else []
            for p in trainable:  # free e (kept only if the variant needs it) before the second pass allocates
                p.grad = None
            for p, g in zip(trainable, set_aside or ()):
                p.grad = g
            last, micro = ctx.is_last_micro_batch, set_aside is not None
            with left_alone(owners, self.trainer), self.sync.perturbed_passes():
                ctx.in_perturbed_pass = True
                for i, start in enumerate(stash):
                    start.replay()  # the clean pass's dropout masks and running statistics
                    with self.sync.perturbed_pass(model, last=last and i == len(stash) - 1, micro=micro):
                        self.metrics.add_perturbed(ctx.run_pass(model, start.inputs, num_items_in_batch))
            # The RNG now stands where one full pass over the micro-batches leaves it: as if SAM were off.
        except BaseException:
            self.sync.discard(model)  # a half-accumulated SAM gradient must not reach the optimizer
            restore_rng_state(after_clean_pass)
            raise
        finally:
            ctx.in_perturbed_pass = False
            restore_(params, backups)
        variant.after_perturbed_pass(ctx, params, e, rho, skipped)

    def _commit(self) -> None:
        """The step completed: what the variant staged becomes its state, the step's metrics are counted."""
        self.variant.commit(self.ctx)
        rho = self._plan.rho if self.config.rho_schedule != "constant" else None
        two_pass = self._plan.kind is StepKind.TWO_PASS
        self.metrics.end_step(self.trainer.args.logging_nan_inf_filter, two_pass, rho)

    def _unscaled(self, norm: torch.Tensor) -> torch.Tensor:
        # fp16: the gradients carry GradScaler's factor; the logged norm should not. `_scale` (private) rather than
        # `get_scale()`, which reads the scale back to the host.
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        return norm / scale.to(norm.device).reshape(()) if scale is not None else norm

    # ---- around the step ---------------------------------------------------------------------------------------
    def compute_loss(self, parent: Callable, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loss, through the variant (Functional-SAM changes what the perturbed pass differentiates)."""
        return self.variant.compute_loss(self.ctx, parent, model, inputs, *args, **kwargs)

    def logs(self) -> dict[str, float]:
        """The `sam_*` averages over the logging window (a collective: every process calls it)."""
        return self.metrics.pop(self.trainer.accelerator)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SAM's state for `sam_state.pt`: the settings and the variant's committed state."""
        names = {id(p): n for n, p in self.trainer.model.named_parameters()}
        return {"config": dataclasses.asdict(self.config), **self.variant.state_dict(names)}

    def load(self, path: str) -> None:
        """Load a `sam_state.pt`. A file that is not a SAM state raises, naming it; what no longer fits the model
        (another parameter name or shape) is started afresh, with a warning that names the file."""
        self.refresh()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, empty, not a torch file, foreign objects
            why = "it is empty" if os.path.getsize(path) == 0 else f"{type(err).__name__}: {err}"
            raise StateError(
                f"Cannot resume SAM from {path}: the file cannot be read as a SAM state ({why}). Delete it to start "
                "SAM's state afresh, or resume from another checkpoint."
            ) from err
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise StateError(
                f"Cannot resume SAM from {path}: not a SAM state (expected a dict with 'config' and the variant's "
                f"entries, got {got}). Delete it to start SAM's state afresh, or resume from another checkpoint."
            )
        if state["config"] != dataclasses.asdict(self.config):
            logger.warning(
                f"Resuming with SAM settings {dataclasses.asdict(self.config)} that differ from those in {path}: "
                f"{state['config']}."
            )
        params = dict(self.trainer.model.named_parameters())
        try:
            misfits = self.variant.load_state_dict(state, params)
        except StateError as err:
            raise StateError(f"Cannot resume SAM from {path}: {err}.") from err
        if misfits:
            logger.warning(f"SAM state in {path} does not fit the model; started afresh: " + "; ".join(misfits) + ".")
