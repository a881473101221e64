"""Configuration of SAM: one dataclass of settings, and the `sam_*` fields that carry it in `TrainingArguments`.

`SAMConfig` is the plain settings object used by the engine and the mixin. `SAMArguments` holds the same settings as
`sam_`-prefixed dataclass fields so that `HfArgumentParser` turns them into `--sam_rho 0.05 --sam_adaptive` flags; mix
it into any `TrainingArguments` subclass (TRL's `SFTConfig` included). `SAMTrainingArguments` is that mix for the
plain `Trainer`. Every check runs at construction time, before any weight changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from transformers import TrainingArguments

from .distributed import DEEPSPEED_UNSUPPORTED

ACCUMULATION_MODES = ("exact", "micro")
SYNC_MODES = ("global", "local")

# One help text per setting, shared by `SAMConfig` and the `sam_*` argument fields.
_HELP = {
    "rho": "Radius of the neighbourhood in which SAM looks for the worst-case loss. Typical: 0.05 (SGD/AdamW "
    "training), 0.1-0.15 (fine-tuning), 0.5-2.0 with `adaptive`. Must be a finite number > 0.",
    "adaptive": "Use ASAM (Kwon et al. 2021): scale the perturbation elementwise by T = |w| + eta, making it "
    "invariant to weight rescaling.",
    "eta": "ASAM's offset in T = |w| + eta. Keeps zero-initialised weights (LoRA B matrices) perturbable. "
    "Must be a finite number >= 0.",
    "accumulation": "How SAM meets gradient accumulation. 'exact': one perturbation from the gradient of the whole "
    "accumulated batch, then the second pass re-runs every micro-batch at the perturbed weights, so GA=k x batch b "
    "equals GA=1 x batch k*b. 'micro': each micro-batch is perturbed with its own gradient (m-sharpness) and the "
    "perturbed gradients accumulate.",
    "sync": "How SAM meets data parallelism. 'global': the perturbation uses the all-reduced gradient, so N "
    "processes give the result of one process on the same global batch. 'local': each process perturbs with its "
    "own gradient (the original paper's m-sharpness), and the first pass runs without gradient all-reduce.",
}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"`{name}` (`--sam_{name}`) must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )


def _check_number(name: str, value: float, *, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` (`--sam_{name}`) must be a finite number {bound}, got {value!r}.")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` (`--sam_{name}`) must be a finite number {bound}, got {value!r}.")


@dataclass
class SAMConfig:
    """Settings of Sharpness-Aware Minimization.

    Args:
        rho (`float`, defaults to `0.05`): Neighbourhood radius; must be finite and > 0.
        adaptive (`bool`, defaults to `False`): Use ASAM's elementwise scaling T = |w| + `eta`.
        eta (`float`, defaults to `0.01`): ASAM's offset; must be finite and >= 0.
        accumulation (`str`, defaults to `"exact"`): `"exact"` or `"micro"`; see the concepts page of the docs.
        sync (`str`, defaults to `"global"`): `"global"` or `"local"`; see the concepts page of the docs.

    Raises:
        `ValueError`: naming the field and its valid values, when a setting cannot work.
    """

    rho: float = field(default=0.05, metadata={"help": _HELP["rho"]})
    adaptive: bool = field(default=False, metadata={"help": _HELP["adaptive"]})
    eta: float = field(default=0.01, metadata={"help": _HELP["eta"]})
    accumulation: Literal["exact", "micro"] = field(default="exact", metadata={"help": _HELP["accumulation"]})
    sync: Literal["global", "local"] = field(default="global", metadata={"help": _HELP["sync"]})

    def __post_init__(self) -> None:
        _check_number("rho", self.rho, allow_zero=False)
        _check_number("eta", self.eta, allow_zero=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"`adaptive` (`--sam_adaptive`) must be True or False, got {self.adaptive!r}.")
        _check_choice("accumulation", self.accumulation, ACCUMULATION_MODES)
        _check_choice("sync", self.sync, SYNC_MODES)


@dataclass
class SAMArguments:
    """The `SAMConfig` settings as `sam_`-prefixed fields, to mix into a `TrainingArguments` subclass.

    Example:
        ```python
        from dataclasses import dataclass
        from trl import SFTConfig
        from hf_sam import SAMArguments

        @dataclass
        class SAMSFTConfig(SAMArguments, SFTConfig):
            pass
        ```
    """

    sam_rho: float = field(default=0.05, metadata={"help": _HELP["rho"]})
    sam_adaptive: bool = field(default=False, metadata={"help": _HELP["adaptive"]})
    sam_eta: float = field(default=0.01, metadata={"help": _HELP["eta"]})
    sam_accumulation: Literal["exact", "micro"] = field(default="exact", metadata={"help": _HELP["accumulation"]})
    sam_sync: Literal["global", "local"] = field(default="global", metadata={"help": _HELP["sync"]})

    def __post_init__(self) -> None:
        self.to_sam_config()  # validates every sam_* field before the base class does any work
        if self.__dict__.get("deepspeed"):
            raise ValueError(DEEPSPEED_UNSUPPORTED)
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()

    def to_sam_config(self) -> SAMConfig:
        """Return the `SAMConfig` that these `sam_*` fields describe (validated)."""
        return SAMConfig(**{f.name: getattr(self, f"sam_{f.name}") for f in fields(SAMConfig)})


@dataclass
class SAMTrainingArguments(SAMArguments, TrainingArguments):
    """`TrainingArguments` with the SAM settings as `sam_*` fields (`--sam_rho 0.05`, `--sam_adaptive`, ...).

    Every `TrainingArguments` field keeps its meaning; see `SAMConfig` for the SAM settings.
    """
