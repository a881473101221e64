"""Configuration of SAM: every setting declared once, and the two dataclasses generated from the declarations.

A setting is a `Setting` (default, help, valid values, check): the core ones below, each variant's own in its module
(`hf_sam/variants/`). From them come `SAMConfig`, the plain settings object the engine uses, and `SAMArguments`, the
same settings as `sam_`-prefixed fields, which `HfArgumentParser` turns into `--sam_rho 0.05 --sam_adaptive` flags
with their help and choices; mix it into any `TrainingArguments` subclass (TRL's `SFTConfig` included).
`SAMTrainingArguments` is that mix for the plain `Trainer`. Every check runs at construction time, before any weight
changes. `config.pyi` beside this file spells the generated fields out for IDEs and type checkers
(`scripts/config_stub.py` writes it; a test keeps it in step).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

from transformers import TrainingArguments

from .deepspeed_support import deepspeed_arguments_reason
from .validation import Setting, check_bool, check_fraction, check_int, check_number, require
from .variants import VARIANTS

__all__ = ["CORE_SETTINGS", "SAMArguments", "SAMConfig", "SAMTrainingArguments", "all_settings"]

PRECONDITIONED_METHODS = ("sam", "functional")  # the methods whose perturbation direction `preconditioner` changes


def _method_help() -> str:
    return "Which SAM variant; each is a module in `hf_sam/variants/`. " + " ".join(
        f"{method!r}: {cls.summary}" for method, cls in VARIANTS.items()
    )


CORE_SETTINGS: dict[str, Setting] = {
    "rho": Setting(
        0.05,
        "Radius of the neighbourhood in which SAM looks for the worst-case loss; choose it on validation data. "
        "Typical: 0.05 (SGD/AdamW training), 0.05-0.15 (full fine-tuning), up to ~1 on LoRA adapters (whose small "
        "space needs a larger ball), 0.5-2.0 with `adaptive` on full weights (~10 on LoRA adapters in the benefit "
        "study). Must be a finite number > 0.",
        lambda name, value: check_number(name, value, allow_zero=False),
    ),
    "adaptive": Setting(
        False,
        "Use ASAM (Kwon et al. 2021): scale the perturbation elementwise by T = |w| + eta, making it invariant to "
        "weight rescaling.",
        check_bool,
    ),
    "eta": Setting(
        0.01,
        "ASAM's offset in T = |w| + eta. Keeps zero-initialised weights (LoRA B matrices) perturbable. Must be a "
        "finite number >= 0.",
    ),
    "accumulation": Setting(
        "exact",
        "How SAM meets gradient accumulation. 'exact': one perturbation from the gradient of the whole accumulated "
        "batch, then the second pass re-runs every micro-batch at the perturbed weights, so GA=k x batch b equals "
        "GA=1 x batch k*b. 'micro': each micro-batch is perturbed with its own gradient (m-sharpness) and the "
        "perturbed gradients accumulate.",
        choices=("exact", "micro"),
    ),
    "sync": Setting(
        "global",
        "How SAM meets data parallelism. 'global': the perturbation uses the all-reduced gradient, so N processes "
        "give the result of one process on the same global batch. 'local': each process perturbs with its own "
        "gradient (the original paper's m-sharpness), and the first pass runs without gradient all-reduce.",
        choices=("global", "local"),
    ),
    "method": Setting("sam", _method_help(), choices=tuple(VARIANTS)),
    "start_fraction": Setting(
        0.0,
        "Run SAM only from this fraction of `max_steps` on (0.0: from the start; 0.85: the last 0.15 of training, "
        "late-phase SAM); earlier steps are plain one-pass steps. Must be in [0, 1).",
        lambda name, value: check_fraction(name, value, low_open=False),
    ),
    "interval": Setting(
        1,
        "Run SAM on every `interval`-th step only; the others are plain one-pass steps. Integer >= 1.",
        lambda name, value: check_int(name, value, 1),
    ),
    "ascent_fraction": Setting(
        1.0,
        "Compute the perturbation from this leading fraction of each micro-batch (Bahri et al. 2022); the perturbed "
        "pass always uses the whole micro-batch. The logged `loss` is then estimated on that fraction. Must be in "
        "(0, 1].",
        lambda name, value: check_fraction(name, value, low_open=True),
    ),
    "rho_schedule": Setting(
        "constant",
        "'constant': rho throughout. 'lr': rho follows the learning rate between `rho_min` and `rho` (GSAM). "
        "'cosine_ramp': rho rises from `rho_min` to `rho` along a half cosine over training (Flat-LoRA).",
        choices=("constant", "lr", "cosine_ramp"),
    ),
    "rho_min": Setting(0.0, "Lower end of the `rho_schedule`. Must be a finite number in [0, rho]."),
    "preconditioner": Setting(
        "none",
        "Direction of the perturbation. 'none': the gradient g (SAM). 'adam': Adam's preconditioned gradient "
        "g / (sqrt(v_hat) + eps), read from the optimizer's second-moment state (preconditioned SAM, Singh et al. "
        "2025); needs an Adam-family optimizer and `method` 'sam' or 'functional'. The first step, before any "
        "optimizer state, perturbs along g.",
        choices=("none", "adam"),
    ),
}


def all_settings() -> dict[str, Setting]:
    """Every setting by name: the core ones, then each registered variant's own, in registry order."""
    settings = dict(CORE_SETTINGS)
    for variant in VARIANTS.values():
        for name, setting in variant.settings.items():
            if name in settings:
                raise ValueError(f"The setting `{name}` of {variant.__name__} is declared twice.")
            settings[name] = setting
    return settings


def _validate(config: Any) -> None:
    """Each setting alone, then across settings: the same checks for `SAMConfig` and `SAMArguments`."""
    for name, setting in all_settings().items():
        setting.validate(name, getattr(config, name))
    require(
        config.rho_min <= config.rho,
        f"`rho_min` (`--sam_rho_min`) must be <= `rho` ({config.rho}), got {config.rho_min!r}.",
    )
    methods = [m for m in PRECONDITIONED_METHODS if m in VARIANTS]
    require(
        config.preconditioner == "none" or config.method in methods,
        f"`preconditioner={config.preconditioner!r}` (`--sam_preconditioner {config.preconditioner}`) works with "
        f"`method` in {', '.join(repr(m) for m in methods)}, got method={config.method!r}.",
    )
    VARIANTS[config.method].validate(config)


def _fields(prefix: str) -> list[tuple[str, Any, Any]]:
    """The settings as dataclass fields named `prefix` + name, typed by their default (or their choices)."""
    return [
        (prefix + name, s.annotation, field(default=s.default, metadata={"help": s.help}))
        for name, s in all_settings().items()
    ]


def _settings_doc() -> str:
    return "\n".join(f"        {name}: {s.help}" for name, s in all_settings().items())


def _config_post_init(self) -> None:
    _validate(self)


SAMConfig = make_dataclass(
    "SAMConfig",
    _fields(""),
    namespace={
        "__module__": __name__,
        "__post_init__": _config_post_init,
        "__doc__": f"""Settings of Sharpness-Aware Minimization: the core settings, then each variant's own.

    Args:
{_settings_doc()}

    Raises:
        `ValueError`: naming the field and its valid values, when a setting cannot work.
    """,
    },
)


class _ArgumentsBase:
    """What `SAMArguments` adds to its generated fields: validation when built, and the `SAMConfig` they describe."""

    def __post_init__(self) -> None:
        config = self.to_sam_config()  # validates every sam_* field before the base class does any work
        deepspeed, fp16 = self.__dict__.get("deepspeed"), bool(self.__dict__.get("fp16"))
        reason = deepspeed_arguments_reason(deepspeed, config, fp16=fp16)  # the trainer checks again, and the engine
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
    _fields("sam_"),
    bases=(_ArgumentsBase,),
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


assert all(f.default is not MISSING for f in fields(SAMConfig))  # every setting has a default: any order works
