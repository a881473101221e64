"""Momentum-SAM (Becker, Altrock, Risse 2024, arXiv 2401.12033): perturb along the negative momentum, one pass.

With v the optimizer's momentum as it stands before this step's update (AdamW: its first moment `exp_avg`; SGD:
its `momentum_buffer`), each optimizer step takes its one forward-backward pass at

    w~ = w - rho v / ||v||                    ||.|| the global L2 norm over all parameters that have a momentum

and the optimizer applies that gradient at w (w is restored by copy before it steps). Every micro-batch of a
gradient-accumulation window runs at the same w~ (w and v do not change within a window): each moves to w~ before
its pass and back to w right after it, so the weights are at w whenever the Trainer has control (a callback, a stop
between micro-batches, a save). The scale rho / ||v|| is computed once per step. No extra pass: the cost is one
weight copy per micro-batch and one norm per step.

Pinned from the authors' code (MarlonBecker/MSAM, `optimizer/adamW_msam.py` and `optimizer/msam.py`) and the
paper's Algorithm 1: the sign is minus (`move_up_to_momentumAscent` does `p.sub_(exp_avg, alpha=rho/||exp_avg||)`);
the momentum is the one left by the previous step (after its update, the code moves to w_{t+1} - rho v_{t+1} /
||v_{t+1}|| for the next gradient); AdamW uses the raw `exp_avg` (no bias correction: the direction is normalised);
the first step, with no momentum yet (v_0 = 0, the code's norm factor 0), takes its gradient at w itself, as does a
parameter without optimizer state (it is neither moved nor counted in the norm). The code divides by
||v|| + 1e-12; here a zero or non-finite norm skips the perturbation instead. The paper's runs use rho = 3 (README).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.training_args import OptimizerNames

from ..perturbation import move_along_, restore_, scale_to
from ..preconditioned import ADAM_OPTIMIZERS
from ..validation import require
from .base import SAMVariant, StepContext, StepKind

__all__ = ["MomentumSAM", "momentum_of", "msam_refusal"]

CITATION = """@article{becker2024momentumsam,
    title   = {Momentum-SAM: Sharpness Aware Minimization without Computational Overhead},
    author  = {Marlon Becker and Frederick Altrock and Benjamin Risse},
    journal = {arXiv preprint arXiv:2401.12033},
    year    = {2024},
    url     = {https://arxiv.org/abs/2401.12033}
}"""

_MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # Adam's first moment, SGD's momentum


def _sgd_momentum(optim_args: str | None) -> float:
    for item in (optim_args or "").replace(" ", "").split(","):
        key, _, value = item.partition("=")
        if key == "momentum":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


def msam_refusal(optimizer: Any, optim: Any, optim_args: str | None) -> str | None:
    """Why the optimizer keeps no momentum to perturb along, or `None`.

    Args:
        optimizer: The built optimizer (possibly wrapped by Accelerate), or `None` before it is built.
        optim, optim_args: `TrainingArguments.optim` and `optim_args`, the optimizer that will be built.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the optimizer
    if inner is not None:
        sgd = isinstance(inner, torch.optim.SGD)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return None
        if sgd and all(group.get("momentum", 0) > 0 for group in inner.param_groups):
            return None
        what = f"the optimizer {type(inner).__name__}" + (" (momentum=0)" if sgd else "")
    else:
        name = getattr(optim, "value", optim)
        sgd = name == OptimizerNames.SGD.value
        if optim in ADAM_OPTIMIZERS or (sgd and _sgd_momentum(optim_args) > 0):
            return None
        what = f"`optim={name!r}`" + (" without `optim_args='momentum=...'`" if sgd else "")
    names = ", ".join(repr(o.value) for o in ADAM_OPTIMIZERS)
    return (
        "`method='msam'` (`--sam_method msam`) perturbs along the optimizer's momentum (Adam's `exp_avg`, SGD's "
        f"`momentum_buffer`), which {what} does not keep. Use `optim` in {names}, or `optim='sgd'` with "
        "`optim_args='momentum=0.9'` (or pass a `torch.optim.Adam`/`AdamW`, or a `torch.optim.SGD` with momentum > 0)."
    )


def momentum_of(optimizer: Any, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that have a momentum in the optimizer's state, and those momenta (not copied)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    kept, momenta = [], []
    if inner is None:
        return kept, momenta
    for p in params:
        state = inner.state.get(p)
        if not state:
            continue
        v = next((state[k] for k in _MOMENTUM_KEYS if isinstance(state.get(k), torch.Tensor)), None)
        if v is not None:
            kept.append(p)
            momenta.append(v)
    return kept, momenta


class MomentumSAM(SAMVariant):
    """One pass per step at w - rho v/||v||, v the optimizer's momentum; the gradient is applied at w."""

    name = "Momentum-SAM"
    summary = (
        "Momentum-SAM (Becker et al. 2024): one pass per step at w - rho v/||v||, v the optimizer's momentum (Adam's "
        "first moment or SGD's momentum buffer); needs an optimizer with momentum."
    )
    citation = CITATION
    fsdp_unsupported = "it reads the optimizer's momentum per whole parameter, and FSDP2 shards the optimizer state."

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._scale: torch.Tensor | None = None  # -rho / ||v|| of this step (0 when skipped), on the device

    @classmethod
    def validate(cls, config: Any) -> None:
        require(
            not config.adaptive and config.ascent_fraction == 1.0,
            "`method='msam'` (`--sam_method msam`) perturbs along the optimizer's momentum in one pass: it takes "
            f"no `adaptive` and no `ascent_fraction` < 1, got adaptive={config.adaptive}, "
            f"ascent_fraction={config.ascent_fraction}.",
        )

    def check_setup(self, ctx: StepContext) -> None:
        reason = msam_refusal(ctx.optimizer, ctx.optim, ctx.optim_args)
        if reason is not None:
            raise ValueError(reason)

    def step_kind(self, ctx: StepContext, sam_index: int) -> StepKind:
        return StepKind.ONE_PASS

    def begin_step(self, ctx: StepContext) -> None:
        self._scale = None  # v moved with the last step: a new norm

    def one_pass(self, ctx: StepContext, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        """The micro-batch's pass at w~ = w - rho v/||v||; back at w (by copy) when it returns or raises."""
        params, momenta = momentum_of(ctx.optimizer, ctx.trainable(model))
        if not params:  # the first step has no momentum yet: its pass runs at w
            return ctx.run_pass(model, inputs, num_items_in_batch)
        if self._scale is None:  # v and w are the same for every micro-batch of the step: one norm
            self._scale = scale_to(momenta, -rho)[0]
        backups = ctx.backup.buffers_for(params)
        move_along_(params, momenta, backups, self._scale)  # all or nothing
        try:
            return ctx.run_pass(model, inputs, num_items_in_batch)
        finally:
            restore_(params, backups)
