"""The variant protocol: the typed context a variant's hooks receive, the hooks, and SAM / ASAM as the default.

A variant is a class of hooks that the step engine (`hf_sam/engine.py`) calls at fixed points of one optimizer step;
the registry in `hf_sam/variants/__init__.py` is the one place that maps `sam_method` to a class. Each variant lives in
a module of its own with its formula and paper in the docstring, its settings, its validation, its state and its
hooks. Adding a variant is one new module and one registry line. A hook sees the training only through its
`StepContext`: no variant touches the Trainer.

SAM (Foret et al. 2021, arXiv 2010.01412): e = rho g / ||g||, step with grad L(w + e) at w. ASAM (Kwon et al. 2021,
arXiv 2102.11600, `sam_adaptive`): e = rho T^2 g / ||T g||, T = |w| + eta. The math is in `hf_sam/perturbation.py`.

The hooks, in the order of one optimizer step, each with its contract:

- `check_setup(ctx)`: raise `ValueError` for a setup the variant cannot run in (before any weight changes).
- `step_kind(ctx, sam_index) -> StepKind`: `TWO_PASS` (the engine's clean pass, perturbation, perturbed pass,
  restore) or `ONE_PASS` (the variant's own `one_pass`).
- `begin_step(ctx)`: a new optimizer step begins; forget whatever a step that never completed left behind.
- `one_pass(ctx, model, inputs, num_items_in_batch, rho) -> loss`: one micro-batch of a one-pass step; must return
  with the weights at w (bit for bit) and may only change the variant's state through `commit`.
- `compute_loss(ctx, parent, model, inputs, ...)`: wraps the Trainer's `compute_loss` in both passes.
- `direction_(ctx, params)`: turn each `p.grad` (the clean gradient g) into the direction to perturb along, in
  place; state it updates is staged, not committed.
- `after_perturbed_pass(ctx, params, e, rho, skipped)`: after the perturbed pass, with the SAM gradient in `.grad`;
  `e` holds the perturbation when `keeps_perturbation`, `skipped` (a 0-dim bool on the device) whether the
  perturbation was skipped. Stage, do not commit.
- `commit(ctx)`: the step completed; staged state becomes the state. Not called for a step that was interrupted,
  raised or never reached its last micro-batch: that step leaves no trace (the transaction rule, docs/concepts.md).
- `state_dict(names)` / `load_state_dict(state, params)`: what the variant adds to `sam_state.pt`; loading raises
  `StateError` for content that is not a saved state, and returns what does not fit the model (started afresh).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..preconditioned import adam_precondition_, adam_preconditioner_refusal
from ..validation import Setting

if TYPE_CHECKING:
    from ..perturbation import WeightBackup

__all__ = ["SAMVariant", "Setting", "StateError", "StepContext", "StepKind", "fitting_entries"]

SAM_CITATION = """@inproceedings{foret2021sharpnessaware,
    title     = {Sharpness-Aware Minimization for Efficiently Improving Generalization},
    author    = {Pierre Foret and Ariel Kleiner and Hossein Mobahi and Behnam Neyshabur},
    booktitle = {International Conference on Learning Representations},
    year      = {2021},
    url       = {https://arxiv.org/abs/2010.01412}
}"""


class StepKind(enum.StrEnum):
    """What one optimizer step runs."""

    PLAIN = "plain"  # the Trainer's own step (late-phase SAM before its start, `sam_interval`)
    TWO_PASS = "two_pass"  # clean pass, perturbation, perturbed pass, restore (the engine's)
    ONE_PASS = "one_pass"  # the variant's own one-pass step (`one_pass`)


class StateError(ValueError):
    """A saved SAM state that cannot be loaded (raised by `load_state_dict`; the engine names the file)."""


def fitting_entries(
    state: dict[str, Any], key: str, params: dict[str, torch.Tensor], what: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The entries of `state[key]` (parameter name -> tensor) that fit the model, and what does not fit.

    Args:
        state: A loaded `sam_state.pt`.
        key: The variant's entry, a mapping of parameter names to tensors (absent: nothing saved).
        params: name -> parameter of the model.
        what: How a message names an entry ("Friendly SAM's average").

    Returns:
        `tuple`: name -> (parameter, saved tensor) for the entries that fit, and one line per entry that does not (no
        such parameter, another shape).

    Raises:
        `StateError`: `state[key]` is not a mapping of names to tensors.
    """
    saved = state.get(key, {})
    if not isinstance(saved, dict):
        raise StateError(f"`{key}` is not a mapping of parameter names to tensors")
    fits, misfits = {}, []
    for name, tensor in saved.items():
        if not isinstance(tensor, torch.Tensor):
            raise StateError(f"`{key}[{name!r}]` is a {type(tensor).__name__}, not a tensor")
        p = params.get(name)
        if p is None:
            misfits.append(f"{what} of `{name}`: no such parameter in the model")
        elif tensor.shape != p.shape:
            misfits.append(f"{what} of `{name}`: shape {tuple(tensor.shape)}, the parameter's is {tuple(p.shape)}")
        else:
            fits[name] = (p, tensor)
    return fits, misfits


class StepContext:
    """What a variant may use of the training step, read from the engine and the Trainer it serves.

    Attributes:
        micro_index (`int`): The micro-batch's index within the optimizer step (0 for the first).
        kind (`StepKind`): What this optimizer step runs.
        in_perturbed_pass (`bool`): True while the perturbed pass runs at w + e.
        backup (`WeightBackup`): Persistent buffers for holding w while the weights are moved.
    """

    def __init__(self, trainer: Any, run_pass: Callable, trainable: Callable, backup: WeightBackup) -> None:
        self._trainer = trainer
        self._run_pass = run_pass
        self._trainable = trainable
        self.backup = backup
        self.micro_index = -1
        self.kind = StepKind.PLAIN
        self.in_perturbed_pass = False

    def run_pass(self, model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        """One forward-backward pass of the micro-batch, the Trainer's own (loss scaling, precision, backward)."""
        return self._run_pass(model, inputs, num_items_in_batch)

    def trainable(self, model: Any) -> list[torch.Tensor]:
        """The trainable parameters of `model`, the ones SAM perturbs (a tied weight once)."""
        return self._trainable(model)

    @property
    def is_last_micro_batch(self) -> bool:
        """True on the micro-batch after which the optimizer steps (gradients are synchronised there)."""
        return bool(self._trainer.accelerator.sync_gradients)

    @property
    def global_step(self) -> int:
        """Optimizer steps completed before this one."""
        return self._trainer.state.global_step

    @property
    def seed(self) -> int:
        """The run's seed (`TrainingArguments.seed`)."""
        return self._trainer.args.seed

    @property
    def optimizer(self) -> Any:
        """The optimizer (Accelerate's wrapper once training started), or `None` before it is built."""
        return getattr(self._trainer, "optimizer", None)

    @property
    def optim(self) -> Any:
        """`TrainingArguments.optim` and `optim_args`: the optimizer that will be built."""
        return self._trainer.args.optim

    @property
    def optim_args(self) -> str | None:
        return self._trainer.args.optim_args

    @property
    def model(self) -> Any:
        """The model being trained, as the Trainer holds it (`trainer.model`)."""
        return self._trainer.model

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (False during evaluation)."""
        return bool(self._trainer.model.training)

    @property
    def loss_scaled(self) -> bool:
        """Whether the gradients carry GradScaler's changing factor (fp16 mixed precision)."""
        return getattr(self._trainer.accelerator, "scaler", None) is not None

    def unwrap(self, model: Any) -> Any:
        """The model without its distributed or compiled wrappers."""
        return self._trainer.accelerator.unwrap_model(model)


class SAMVariant:
    """SAM, or ASAM with `adaptive=True`: two passes, the perturbation from the clean gradient."""

    name = "SAM"  # as the model card and the docs name it
    summary = "SAM (Foret et al. 2021), or ASAM with `adaptive`: two passes on every SAM step."
    citation = SAM_CITATION
    settings: dict[str, Setting] = {}  # its own settings: `SAMConfig` fields and `--sam_*` flags
    fsdp_unsupported: str | None = None  # why it cannot run under FSDP2, if it cannot
    keeps_perturbation = False  # whether `after_perturbed_pass` needs e

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- settings and setup ------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config: Any) -> None:
        """Checks across settings when this variant is selected; each setting alone is checked by its `Setting`."""

    def check_setup(self, ctx: StepContext) -> None:
        """Refuse a setup this variant cannot run in, before any weight changes (at construction and each run)."""
        if self.config.preconditioner == "adam":
            reason = adam_preconditioner_refusal(ctx.optimizer, ctx.optim)
            if reason is not None:
                raise ValueError(reason)

    # ---- the step ----------------------------------------------------------------------------------------------
    def step_kind(self, ctx: StepContext, sam_index: int) -> StepKind:
        """The kind of the `sam_index`-th SAM step."""
        return StepKind.TWO_PASS

    def begin_step(self, ctx: StepContext) -> None:
        """A new optimizer step begins: nothing is carried over from one that did not complete."""

    def one_pass(self, ctx: StepContext, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no one-pass step.")

    def compute_loss(self, ctx: StepContext, parent: Callable, model: Any, inputs: Any, *args: Any, **kwargs: Any):
        return parent(model, inputs, *args, **kwargs)

    def direction_(self, ctx: StepContext, params: list[torch.Tensor]) -> None:
        """SAM perturbs along the clean gradient itself, or along Adam's preconditioned gradient
        (`preconditioner="adam"`, `hf_sam/preconditioned.py`)."""
        if self.config.preconditioner == "adam" and ctx.optimizer is not None:
            adam_precondition_([p.grad for p in params], params, ctx.optimizer)

    def after_perturbed_pass(
        self, ctx: StepContext, params: list[torch.Tensor], e: list[torch.Tensor], rho: float, skipped: torch.Tensor
    ) -> None:
        """Nothing to do after the perturbed pass."""

    def commit(self, ctx: StepContext) -> None:
        """Nothing staged: SAM keeps no state across steps."""

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        """The variant's committed state for `sam_state.pt`, tensors keyed by parameter name (`names`: id -> name)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> list[str]:
        """Load what `state_dict` saved (`params`: name -> parameter).

        Returns:
            `list[str]`: what does not fit the model (an unknown parameter, another shape), left out and started
            afresh; the engine warns with the file's name.

        Raises:
            `StateError`: content that is not a state this variant saved (the engine names the file).
        """
        return []
