"""SAM's variants, each a class of hooks in a module of its own (`base.py` says what the hooks are).

`REGISTRY` below is the one dispatch point: `sam_method` -> the module and class that implement it. Adding a variant
is one new module beside this file and one line here; its settings become `SAMConfig` fields and `--sam_*` flags,
its validation runs in `SAMConfig`, and the step engine (`hf_sam/engine.py`) calls its hooks with a `StepContext`.
"""

from __future__ import annotations

import importlib

from .base import SAMVariant, Setting, StateError, StepContext, StepKind
from .flat_lora import NoisyLinearFunction, flat_lora_noise, flat_lora_seed
from .looksam import looksam_add_, looksam_orthogonal_

__all__ = [
    "REGISTRY",
    "VARIANTS",
    "NoisyLinearFunction",
    "SAMVariant",
    "Setting",
    "StateError",
    "StepContext",
    "StepKind",
    "flat_lora_noise",
    "flat_lora_seed",
    "looksam_add_",
    "looksam_orthogonal_",
]

REGISTRY = {  # sam_method: "module:Class" in this package
    "sam": "base:SAMVariant",
    "looksam": "looksam:LookSAM",
    "flat_lora": "flat_lora:FlatLoRA",
    "functional": "functional:FunctionalSAM",
    "msam": "msam:MomentumSAM",
    "friendly": "friendly:FriendlySAM",
}


def _load(path: str) -> type[SAMVariant]:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


VARIANTS: dict[str, type[SAMVariant]] = {method: _load(path) for method, path in REGISTRY.items()}
