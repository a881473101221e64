"""Checks of single settings, shared by `SAMConfig` and the variants: each error names the field, its `--sam_*` flag
and the valid values."""

from __future__ import annotations

import math
from typing import Any


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"`{name}` (`--sam_{name}`) must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )


def check_number(name: str, value: Any, *, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` (`--sam_{name}`) must be a finite number {bound}, got {value!r}.")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` (`--sam_{name}`) must be an integer >= {minimum}, got {value!r}.")


def check_fraction(name: str, value: Any, *, low_open: bool) -> None:
    """A number in (0, 1] (`low_open`) or in [0, 1)."""
    interval = "(0, 1]" if low_open else "[0, 1)"
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and ((0 < value <= 1) if low_open else (0 <= value < 1))
    if not inside:
        raise ValueError(f"`{name}` (`--sam_{name}`) must be a number in {interval}, got {value!r}.")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
