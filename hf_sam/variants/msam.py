"""Momentum-SAM (Becker, Altrock, Risse 2024, arXiv 2401.12033): perturb along the negative momentum, one pass.

With v the optimizer's momentum as it stands before this step's update (AdamW: its first moment `exp_avg`; SGD:
its `momentum_buffer`), each optimizer step takes its one forward-backward pass at

    w~ = w - rho v / ||v||                    ||.|| the global L2 norm over all parameters that have a momentum

and the optimizer applies that gradient at w (w is restored by copy before it steps). Every micro-batch of a
gradient-accumulation window runs at the same w~ (w and v do not change within a window). No extra pass: the cost
is one weight copy and one norm per step.

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

from ..perturbation import perturb_along_, restore_
from ..validation import require
from .base import SAMVariant
from .preconditioned import ADAM_OPTIMIZERS

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


def msam_refusal(trainer: Any) -> str | None:
    """Why the trainer's optimizer keeps no momentum to perturb along, or `None`."""
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the optimizer
    if inner is not None:
        sgd = isinstance(inner, torch.optim.SGD)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return None
        if sgd and all(group.get("momentum", 0) > 0 for group in inner.param_groups):
            return None
        what = f"the optimizer {type(inner).__name__}" + (" (momentum=0)" if sgd else "")
    else:
        optim = getattr(trainer.args.optim, "value", trainer.args.optim)
        sgd = optim == OptimizerNames.SGD.value
        if trainer.args.optim in ADAM_OPTIMIZERS or (sgd and _sgd_momentum(trainer.args.optim_args) > 0):
            return None
        what = f"`optim={optim!r}`" + (" without `optim_args='momentum=...'`" if sgd else "")
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
        self._held: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (params, backups) while at w~

    @classmethod
    def validate(cls, config: Any) -> None:
        require(
            not config.adaptive and config.ascent_fraction == 1.0,
            "`method='msam'` (`--sam_method msam`) perturbs along the optimizer's momentum in one pass: it takes "
            f"no `adaptive` and no `ascent_fraction` < 1, got adaptive={config.adaptive}, "
            f"ascent_fraction={config.ascent_fraction}.",
        )

    def check_setup(self, trainer: Any) -> None:
        reason = msam_refusal(trainer)
        if reason is not None:
            raise ValueError(reason)

    def step_kind(self, trainer: Any, sam_index: int) -> str:
        return "single"

    def single_pass(self, trainer: Any, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        """Move to w~ before the window's first micro-batch, back to w (by copy) after its last one or on an error."""
        restore = True
        try:
            if trainer._sam_micro_index == 0 or self._held is None:
                self._restore()  # a window left without its last micro-batch: never stack two perturbations
                params, momenta = momentum_of(trainer.optimizer, trainer._sam_listing(model))
                if params:  # the first step has no momentum yet: its pass runs at w
                    backups = trainer._sam_backup.buffers_for(params)
                    perturb_along_(params, momenta, backups, -rho)  # all or nothing
                    self._held = (params, backups)
            loss = trainer._sam_parent_training_step(model, inputs, num_items_in_batch)
            restore = trainer.accelerator.sync_gradients
            return loss
        finally:
            if restore:
                self._restore()

    def _restore(self) -> None:
        if self._held is not None:
            params, backups = self._held
            self._held = None
            restore_(params, backups)
