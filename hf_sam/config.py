"""Configuration of SAM: one dataclass of settings, and the `sam_*` fields that carry it in `TrainingArguments`.

`SAMConfig` is the plain settings object used by the engine and the mixin. `SAMArguments` holds the same settings as
`sam_`-prefixed dataclass fields so that `HfArgumentParser` turns them into `--sam_rho 0.05 --sam_adaptive` flags; mix
it into any `TrainingArguments` subclass (TRL's `SFTConfig` included). `SAMTrainingArguments` is that mix for the
plain `Trainer`. Every check runs at construction time, before any weight changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Literal

from transformers import TrainingArguments

from .deepspeed_support import deepspeed_arguments_reason
from .validation import check_choice, check_fraction, check_int, check_number, require
from .variants import VARIANTS

ACCUMULATION_MODES = ("exact", "micro")
SYNC_MODES = ("global", "local")
METHODS = tuple(VARIANTS)
RHO_SCHEDULES = ("constant", "lr", "cosine_ramp")
PRECONDITIONERS = ("none", "adam")
PRECONDITIONED_METHODS = ("sam", "functional")
Method = Literal[METHODS]  # type: ignore[valid-type]

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
    "preconditioner": "Direction of the perturbation. 'none': the gradient g (SAM). 'adam': Adam's preconditioned "
    "gradient g / (sqrt(v_hat) + eps), read from the optimizer's second-moment state (preconditioned SAM, Singh et "
    "al. 2025); needs an Adam-family optimizer and `method` 'sam' or 'functional'. The first step, before any "
    "optimizer state, perturbs along g.",
    "sync": "How SAM meets data parallelism. 'global': the perturbation uses the all-reduced gradient, so N "
    "processes give the result of one process on the same global batch. 'local': each process perturbs with its "
    "own gradient (the original paper's m-sharpness), and the first pass runs without gradient all-reduce.",
}


def _method_help() -> str:
    return "Which SAM variant; each is a module in `hf_sam/variants/`. " + " ".join(
        f"{method!r}: {cls.summary}" for method, cls in VARIANTS.items()
    )


_HELP["method"] = _method_help()
_HELP.pop("looksam_interval")
_HELP.pop("looksam_alpha")


@dataclass
class _CoreSettings:
    rho: float = field(default=0.05, metadata={"help": _HELP["rho"]})
    adaptive: bool = field(default=False, metadata={"help": _HELP["adaptive"]})
    eta: float = field(default=0.01, metadata={"help": _HELP["eta"]})
    accumulation: Literal["exact", "micro"] = field(default="exact", metadata={"help": _HELP["accumulation"]})
    sync: Literal["global", "local"] = field(default="global", metadata={"help": _HELP["sync"]})
    method: Method = field(default="sam", metadata={"help": _HELP["method"]})
    start_fraction: float = field(default=0.0, metadata={"help": _HELP["start_fraction"]})
    interval: int = field(default=1, metadata={"help": _HELP["interval"]})
    ascent_fraction: float = field(default=1.0, metadata={"help": _HELP["ascent_fraction"]})
    rho_schedule: Literal["constant", "lr", "cosine_ramp"] = field(
        default="constant", metadata={"help": _HELP["rho_schedule"]}
    )
    rho_min: float = field(default=0.0, metadata={"help": _HELP["rho_min"]})
    preconditioner: Literal["none", "adam"] = field(default="none", metadata={"help": _HELP["preconditioner"]})

    def __post_init__(self) -> None:
        check_number("rho", self.rho, allow_zero=False)
        check_number("eta", self.eta, allow_zero=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"`adaptive` (`--sam_adaptive`) must be True or False, got {self.adaptive!r}.")
        check_choice("accumulation", self.accumulation, ACCUMULATION_MODES)
        check_choice("sync", self.sync, SYNC_MODES)
        check_choice("method", self.method, METHODS)
        for variant in VARIANTS.values():  # each variant's own settings, whichever method is selected
            for name, setting in variant.settings.items():
                setting.check(name, getattr(self, name))
        check_fraction("start_fraction", self.start_fraction, low_open=False)
        check_int("interval", self.interval, 1)
        check_fraction("ascent_fraction", self.ascent_fraction, low_open=True)
        check_choice("rho_schedule", self.rho_schedule, RHO_SCHEDULES)
        check_number("rho_min", self.rho_min, allow_zero=True)
        require(
            self.rho_min <= self.rho,
            f"`rho_min` (`--sam_rho_min`) must be <= `rho` ({self.rho}), got {self.rho_min!r}.",
        )
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        methods = [m for m in PRECONDITIONED_METHODS if m in METHODS]
        require(
            self.preconditioner == "none" or self.method in methods,
            f"`preconditioner={self.preconditioner!r}` (`--sam_preconditioner {self.preconditioner}`) works with "
            f"`method` in {', '.join(repr(m) for m in methods)}, got method={self.method!r}.",
        )
        VARIANTS[self.method].validate(self)


def _variant_fields(prefix: str = "") -> list[tuple[str, type, object]]:
    """Every variant's own settings, as dataclass fields (`prefix` + name)."""
    return [
        (prefix + name, type(setting.default), field(default=setting.default, metadata={"help": setting.help}))
        for variant in VARIANTS.values()
        for name, setting in variant.settings.items()
    ]


def _settings_doc() -> str:
    lines = [f"        {f.name}: {f.metadata['help']}" for f in fields(_CoreSettings)]
    lines += [f"        {name}: {meta.metadata['help']}" for name, _, meta in _variant_fields()]
    return "\n".join(lines)


SAMConfig = make_dataclass(
    "SAMConfig",
    _variant_fields(),
    bases=(_CoreSettings,),
    namespace={
        "__module__": __name__,
        "__doc__": f"""Settings of Sharpness-Aware Minimization: the core settings, then each variant's own.

    Args:
{_settings_doc()}

    Raises:
        `ValueError`: naming the field and its valid values, when a setting cannot work.
    """,
    },
)


@dataclass
class _CoreArguments:
    sam_rho: float = field(default=0.05, metadata={"help": _HELP["rho"]})
    sam_adaptive: bool = field(default=False, metadata={"help": _HELP["adaptive"]})
    sam_eta: float = field(default=0.01, metadata={"help": _HELP["eta"]})
    sam_accumulation: Literal["exact", "micro"] = field(default="exact", metadata={"help": _HELP["accumulation"]})
    sam_sync: Literal["global", "local"] = field(default="global", metadata={"help": _HELP["sync"]})
    sam_method: Method = field(default="sam", metadata={"help": _HELP["method"]})
    sam_start_fraction: float = field(default=0.0, metadata={"help": _HELP["start_fraction"]})
    sam_interval: int = field(default=1, metadata={"help": _HELP["interval"]})
    sam_ascent_fraction: float = field(default=1.0, metadata={"help": _HELP["ascent_fraction"]})
    sam_rho_schedule: Literal["constant", "lr", "cosine_ramp"] = field(
        default="constant", metadata={"help": _HELP["rho_schedule"]}
    )
    sam_rho_min: float = field(default=0.0, metadata={"help": _HELP["rho_min"]})
    sam_preconditioner: Literal["none", "adam"] = field(default="none", metadata={"help": _HELP["preconditioner"]})

    def __post_init__(self) -> None:
        self.to_sam_config()  # validates every sam_* field before the base class does any work
        deepspeed = self.__dict__.get("deepspeed")
        reason = deepspeed_arguments_reason(deepspeed, self.to_sam_config(), fp16=bool(self.__dict__.get("fp16")))
        if reason is not None:
            raise ValueError(reason)
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()

    def to_sam_config(self) -> SAMConfig:
        """Return the `SAMConfig` that these `sam_*` fields describe (validated)."""
        return SAMConfig(**{f.name: getattr(self, f"sam_{f.name}") for f in fields(SAMConfig)})


SAMArguments = make_dataclass(
    "SAMArguments",
    _variant_fields("sam_"),
    bases=(_CoreArguments,),
    namespace={
        "__module__": __name__,
        "__doc__": """The `SAMConfig` settings as `sam_`-prefixed fields, to mix into a `TrainingArguments` subclass.

    Example:
        ```python
        from dataclasses import dataclass
        from trl import SFTConfig
        from hf_sam import SAMArguments

        @dataclass
        class SAMSFTConfig(SAMArguments, SFTConfig):
            pass
        ```
    """,
    },
)


@dataclass
class SAMTrainingArguments(SAMArguments, TrainingArguments):
    """`TrainingArguments` with the SAM settings as `sam_*` fields (`--sam_rho 0.05`, `--sam_adaptive`, ...).

    Every `TrainingArguments` field keeps its meaning; see `SAMConfig` for the SAM settings.
    """
