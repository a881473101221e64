"""SAM in LLM fine-tuning frameworks that build the Trainer themselves (Axolotl, LLaMA-Factory).

Each framework module imports its framework; this package imports none, so `import hf_sam` never does. Both read the
SAM settings as the `sam_*` keys of the framework's own YAML, named as `SAMArguments`' fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ..config import SAMConfig

SAM_KEYS = tuple(f"sam_{f.name}" for f in fields(SAMConfig))


def check_sam_keys(keys: Any, source: str) -> None:
    """Refuse a `sam_`-prefixed key that is no SAM setting (a typo would otherwise be ignored silently).

    Args:
        keys: The keys of the config.
        source (`str`): Where the keys come from, for the message (e.g. `"the Axolotl config"`).

    Raises:
        `ValueError`: naming the unknown keys and the valid ones.
    """
    unknown = sorted(k for k in keys if isinstance(k, str) and k.startswith("sam_") and k not in SAM_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown SAM setting(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(SAM_KEYS)}."
        )


def sam_config_from_keys(config: Mapping[str, Any], source: str) -> SAMConfig:
    """Build the `SAMConfig` that the `sam_*` keys of a framework config describe; missing or `None` keys keep
    `SAMConfig`'s defaults.

    Args:
        config (`Mapping`): The framework config (other keys are ignored).
        source (`str`): Where the keys come from, for the error message.

    Raises:
        `ValueError`: for an unknown `sam_*` key, or `SAMConfig`'s error naming the field and its valid values.
    """
    check_sam_keys(config.keys(), source)
    values = {k[len("sam_") :]: config[k] for k in SAM_KEYS if config.get(k) is not None}
    try:
        return SAMConfig(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
