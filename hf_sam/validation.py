"""A setting (`Setting`: default, help, valid values) and the checks of single settings, shared by the core settings
and the variants' own: each error names the field, its `--sam_*` flag and the valid values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Setting", "check_bool", "check_choice", "check_fraction", "check_int", "check_number", "require"]


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


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` (`--sam_{name}`) must be True or False, got {value!r}.")


@dataclass(frozen=True)
class Setting:
    """One SAM setting, declared once: it becomes the `SAMConfig.<name>` field and the `--sam_<name>` flag.

    Args:
        default: The default value (its type is the field's type, unless `choices` are given).
        help: The help text of the field and of the flag.
        check: Validates a value, raising `ValueError` naming the field. Default: a finite number >= 0.
        choices: The valid values; the field's type is then `Literal[choices]` (argparse lists them).
    """

    default: Any
    help: str
    check: Callable[[str, Any], None] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def annotation(self) -> Any:
        """The field's type."""
        return Literal[self.choices] if self.choices else type(self.default)

    def validate(self, name: str, value: Any) -> None:
        """Raise `ValueError` naming `name`, its flag and the valid values when `value` cannot work."""
        if self.choices:
            check_choice(name, value, self.choices)
        elif self.check is not None:
            self.check(name, value)
        else:
            check_number(name, value, allow_zero=True)
