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
METHODS = ("sam", "looksam", "flat_lora")
RHO_SCHEDULES = ("constant", "lr", "cosine_ramp")

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
    "method": "'sam': SAM (or ASAM with `adaptive`) on every SAM step, two passes. 'looksam': LookSAM (Liu et al. "
    "2022): full SAM every `looksam_interval` steps, one pass in between that reuses the cached component of the SAM "
    "gradient orthogonal to the gradient. 'flat_lora': Flat-LoRA-style random perturbation of the frozen full weights "
    "under LoRA adapters (one pass, noise regenerated from a seed, `rho` is the noise scale sigma).",
    "looksam_interval": "LookSAM: steps between full SAM steps (k). Must be an integer >= 1.",
    "looksam_alpha": "LookSAM: weight of the reused orthogonal component. Must be a finite number >= 0.",
    "start_fraction": "Run SAM only from this fraction of `max_steps` on (0.0: from the start; 0.85: the last 0.15 "
    "of training, late-phase SAM); earlier steps are plain one-pass steps. Must be in [0, 1).",
    "interval": "Run SAM on every `interval`-th step only; the others are plain one-pass steps. Integer >= 1.",
    "ascent_fraction": "Compute the perturbation from this leading fraction of each micro-batch (Bahri et al. 2022); "
    "the perturbed pass always uses the whole micro-batch. The logged `loss` is then estimated on that fraction. "
    "Must be in (0, 1].",
    "rho_schedule": "'constant': rho throughout. 'lr': rho follows the learning rate between `rho_min` and `rho` "
    "(GSAM). 'cosine_ramp': rho rises from `rho_min` to `rho` along a half cosine over training (Flat-LoRA).",
    "rho_min": "Lower end of the `rho_schedule`. Must be a finite number in [0, rho].",
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


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` (`--sam_{name}`) must be an integer >= {minimum}, got {value!r}.")


def _check_fraction(name: str, value: float, *, low_open: bool) -> None:
    interval = "(0, 1]" if low_open else "[0, 1)"
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and ((0 < value <= 1) if low_open else (0 <= value < 1))
    if not inside:
        raise ValueError(f"`{name}` (`--sam_{name}`) must be a number in {interval}, got {value!r}.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class SAMConfig:
    """Settings of Sharpness-Aware Minimization.

    Args:
        rho (`float`, defaults to `0.05`): Neighbourhood radius; must be finite and > 0.
        adaptive (`bool`, defaults to `False`): Use ASAM's elementwise scaling T = |w| + `eta`.
        eta (`float`, defaults to `0.01`): ASAM's offset; must be finite and >= 0.
        accumulation (`str`, defaults to `"exact"`): `"exact"` or `"micro"`; see the concepts page of the docs.
        sync (`str`, defaults to `"global"`): `"global"` or `"local"`; see the concepts page of the docs.
        method (`str`, defaults to `"sam"`): `"sam"`, `"looksam"` or `"flat_lora"`.
        looksam_interval (`int`, defaults to `5`): LookSAM's k.
        looksam_alpha (`float`, defaults to `0.7`): LookSAM's alpha.
        start_fraction (`float`, defaults to `0.0`): SAM from this fraction of `max_steps` on.
        interval (`int`, defaults to `1`): SAM on every `interval`-th step.
        ascent_fraction (`float`, defaults to `1.0`): fraction of each micro-batch for the first pass.
        rho_schedule (`str`, defaults to `"constant"`): `"constant"`, `"lr"` or `"cosine_ramp"`.
        rho_min (`float`, defaults to `0.0`): lower end of the rho schedule.

    Raises:
        `ValueError`: naming the field and its valid values, when a setting cannot work.
    """

    rho: float = field(default=0.05, metadata={"help": _HELP["rho"]})
    adaptive: bool = field(default=False, metadata={"help": _HELP["adaptive"]})
    eta: float = field(default=0.01, metadata={"help": _HELP["eta"]})
    accumulation: Literal["exact", "micro"] = field(default="exact", metadata={"help": _HELP["accumulation"]})
    sync: Literal["global", "local"] = field(default="global", metadata={"help": _HELP["sync"]})
    method: Literal["sam", "looksam", "flat_lora"] = field(default="sam", metadata={"help": _HELP["method"]})
    looksam_interval: int = field(default=5, metadata={"help": _HELP["looksam_interval"]})
    looksam_alpha: float = field(default=0.7, metadata={"help": _HELP["looksam_alpha"]})
    start_fraction: float = field(default=0.0, metadata={"help": _HELP["start_fraction"]})
    interval: int = field(default=1, metadata={"help": _HELP["interval"]})
    ascent_fraction: float = field(default=1.0, metadata={"help": _HELP["ascent_fraction"]})
    rho_schedule: Literal["constant", "lr", "cosine_ramp"] = field(
        default="constant", metadata={"help": _HELP["rho_schedule"]}
    )
    rho_min: float = field(default=0.0, metadata={"help": _HELP["rho_min"]})

    def __post_init__(self) -> None:
        _check_number("rho", self.rho, allow_zero=False)
        _check_number("eta", self.eta, allow_zero=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"`adaptive` (`--sam_adaptive`) must be True or False, got {self.adaptive!r}.")
        _check_choice("accumulation", self.accumulation, ACCUMULATION_MODES)
        _check_choice("sync", self.sync, SYNC_MODES)
        _check_choice("method", self.method, METHODS)
        _check_int("looksam_interval", self.looksam_interval, 1)
        _check_number("looksam_alpha", self.looksam_alpha, allow_zero=True)
        _check_fraction("start_fraction", self.start_fraction, low_open=False)
        _check_int("interval", self.interval, 1)
        _check_fraction("ascent_fraction", self.ascent_fraction, low_open=True)
        _check_choice("rho_schedule", self.rho_schedule, RHO_SCHEDULES)
        _check_number("rho_min", self.rho_min, allow_zero=True)
        _require(
            self.rho_min <= self.rho,
            f"`rho_min` (`--sam_rho_min`) must be <= `rho` ({self.rho}), got {self.rho_min!r}.",
        )
        if self.method == "looksam":
            # The cached component lives on every process and is added to the synchronised gradient: it must be
            # the same everywhere, and it is defined for the plain SAM direction of the whole batch.
            _require(
                not self.adaptive and self.accumulation == "exact" and self.sync == "global" and self.interval == 1,
                "`method='looksam'` (`--sam_method looksam`) needs `adaptive=False`, `accumulation='exact'`, "
                f"`sync='global'` and `interval=1`, got adaptive={self.adaptive}, "
                f"accumulation={self.accumulation!r}, sync={self.sync!r}, interval={self.interval}.",
            )
        if self.method == "flat_lora":
            _require(
                not self.adaptive and self.ascent_fraction == 1.0,
                "`method='flat_lora'` (`--sam_method flat_lora`) draws a random perturbation in one pass: it takes "
                f"no `adaptive` and no `ascent_fraction` < 1, got adaptive={self.adaptive}, "
                f"ascent_fraction={self.ascent_fraction}.",
            )


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
    sam_method: Literal["sam", "looksam", "flat_lora"] = field(default="sam", metadata={"help": _HELP["method"]})
    sam_looksam_interval: int = field(default=5, metadata={"help": _HELP["looksam_interval"]})
    sam_looksam_alpha: float = field(default=0.7, metadata={"help": _HELP["looksam_alpha"]})
    sam_start_fraction: float = field(default=0.0, metadata={"help": _HELP["start_fraction"]})
    sam_interval: int = field(default=1, metadata={"help": _HELP["interval"]})
    sam_ascent_fraction: float = field(default=1.0, metadata={"help": _HELP["ascent_fraction"]})
    sam_rho_schedule: Literal["constant", "lr", "cosine_ramp"] = field(
        default="constant", metadata={"help": _HELP["rho_schedule"]}
    )
    sam_rho_min: float = field(default=0.0, metadata={"help": _HELP["rho_min"]})

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
