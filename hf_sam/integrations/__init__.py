"""SAM in LLM fine-tuning frameworks that build the Trainer themselves (Axolotl, LLaMA-Factory).

Each framework module imports its framework; this package imports none, so `import hf_sam` never does. Both read the
SAM settings as the `sam_*` keys of the framework's own YAML, named as `SAMArguments`' fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from ..config import SAMConfig

SAM_KEYS = tuple(f"sam_{f.name}" for f in fields(SAMConfig))
# Where a user finds the valid keys, for the error message (which lists them too).
KEYS_DOCUMENTED = "the fields of `hf_sam.SAMArguments`, described in the README's Settings and in docs/api.md"


def _normalized(key: str) -> str:
    return key.replace("-", "_").lower()


def unknown_sam_keys(keys: Iterable[Any]) -> dict[str, str | None]:
    """The keys that look like SAM settings but are none, each with the closest valid key (or `None`).

    A key looks like a SAM setting when, with `-` read as `_` and in lower case, it starts with `sam_`: `sam_rhoo`,
    `sam-rho` and `SAM_RHO` do, `sample_packing` does not.
    """
    unknown = {}
    for key in keys:
        if isinstance(key, str) and key not in SAM_KEYS and _normalized(key).startswith("sam_"):
            close = difflib.get_close_matches(_normalized(key), SAM_KEYS, n=1)
            unknown[key] = close[0] if close else None
    return dict(sorted(unknown.items()))


def check_sam_keys(keys: Iterable[Any], source: str) -> None:
    """Refuse a key that looks like a SAM setting but is none (a typo would otherwise be ignored silently).

    Args:
        keys: The keys of the config.
        source (`str`): Where the keys come from, for the message (e.g. `"the Axolotl config"`).

    Raises:
        `ValueError`: naming each unknown key with the closest valid key, and the valid keys.
    """
    unknown = unknown_sam_keys(keys)
    if unknown:
        named = ", ".join(
            f"`{key}` (did you mean `{close}`?)" if close else f"`{key}`" for key, close in unknown.items()
        )
        raise ValueError(
            f"Unknown SAM setting{'s' if len(unknown) > 1 else ''} in {source}: {named}. Valid keys "
            f"({KEYS_DOCUMENTED}): {', '.join(SAM_KEYS)}."
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
