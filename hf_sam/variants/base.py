"""The variant protocol, and SAM / ASAM itself as its default implementation.

A variant is a class of hooks that `SAMMixin` calls at fixed points of its step (`hf_sam/trainer.py`); the registry
in `hf_sam/variants/__init__.py` is the one place that maps `sam_method` to a class. Each variant lives in a module of
its own with its formula and paper in the docstring, its settings, its validation, its state and its hooks. Adding a
variant is one new module and one registry line.

SAM (Foret et al. 2021, arXiv 2010.01412): e = rho g / ||g||, step with grad L(w + e) at w. ASAM (Kwon et al. 2021,
arXiv 2102.11600, `sam_adaptive`): e = rho T^2 g / ||T g||, T = |w| + eta. The math is in `hf_sam/perturbation.py`.

The hooks, in the order of one optimizer step:

- `step_kind(trainer, sam_index)`: `"sam"` (clean pass, perturbation, perturbed pass, restore: SAMMixin's step) or
  `"single"` (the variant's own one-pass step, `single_pass`).
- `compute_loss(trainer, parent, ...)`: wraps the Trainer's `compute_loss` in both passes of a SAM step (Functional-SAM
  changes what the perturbed pass differentiates).
- `direction_(trainer, params)`: turns each `p.grad` (the clean gradient g) into the direction to perturb along, in
  place, before `perturb_` normalises it to rho (Friendly SAM's g - sigma m, the Adam preconditioner).
- `after_sam_step(trainer, params, e, rho)`: after the perturbed pass, with the SAM gradient in `.grad` (LookSAM's
  cache); `e` holds the perturbation when `keeps_perturbation` is True.
- `state_dict(names)` / `load_state_dict(state, params)`: what the variant adds to `sam_state.pt`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import check_number
from .preconditioned import adam_precondition_, adam_preconditioner_refusal

__all__ = ["SAMVariant", "Setting"]

SAM_CITATION = """@inproceedings{foret2021sharpnessaware,
    title     = {Sharpness-Aware Minimization for Efficiently Improving Generalization},
    author    = {Pierre Foret and Ariel Kleiner and Hossein Mobahi and Behnam Neyshabur},
    booktitle = {International Conference on Learning Representations},
    year      = {2021},
    url       = {https://arxiv.org/abs/2010.01412}
}"""


@dataclass(frozen=True)
class Setting:
    """A variant's own setting: becomes `SAMConfig.<name>` and the `--sam_<name>` flag.

    Args:
        default: The default value (its type is the field's type).
        help: The help text of the field and the flag.
        check: Validates a value, raising `ValueError` naming the field (`hf_sam.validation`).
    """

    default: Any
    help: str
    check: Callable[[str, Any], None] = lambda name, value: check_number(name, value, allow_zero=True)


class SAMVariant:
    """SAM, or ASAM with `adaptive=True`: two passes, the perturbation from the clean gradient."""

    name = "SAM"  # as the model card and the docs name it
    summary = "SAM (Foret et al. 2021), or ASAM with `adaptive`: two passes on every SAM step."
    citation = SAM_CITATION
    settings: dict[str, Setting] = {}  # its own `SAMConfig` fields
    fsdp_unsupported: str | None = None  # why it cannot run under FSDP2, if it cannot
    keeps_perturbation = False  # whether `after_sam_step` needs e

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- settings and setup ------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config: Any) -> None:
        """Checks across settings when this variant is selected; each setting alone is checked by its `Setting`."""

    def check_setup(self, trainer: Any) -> None:
        """Refuse a setup this variant cannot run in, before any weight changes (at construction and each run)."""
        if self.config.preconditioner == "adam":
            reason = adam_preconditioner_refusal(trainer)
            if reason is not None:
                raise ValueError(reason)

    # ---- the step ----------------------------------------------------------------------------------------------
    def step_kind(self, trainer: Any, sam_index: int) -> str:
        """`"sam"` for SAMMixin's two-pass step, `"single"` for `single_pass`."""
        return "sam"

    def single_pass(self, trainer: Any, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no one-pass step.")

    def compute_loss(self, trainer: Any, parent: Callable, model: Any, inputs: Any, **kwargs: Any) -> Any:
        return parent(model, inputs, **kwargs)

    def direction_(self, trainer: Any, params: list[torch.Tensor]) -> None:
        """SAM perturbs along the clean gradient itself, or along Adam's preconditioned gradient
        (`preconditioner="adam"`, `preconditioned.py`)."""
        if self.config.preconditioner == "adam" and trainer.optimizer is not None:
            adam_precondition_([p.grad for p in params], params, trainer.optimizer)

    def after_sam_step(self, trainer: Any, params: list[torch.Tensor], e: list[torch.Tensor], rho: float) -> None:
        """Nothing to do after a SAM step."""

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        """The variant's state for `sam_state.pt`, tensors keyed by parameter name (`names`: id -> name)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        """Load what `state_dict` saved; `params`: name -> parameter of the model."""
