"""Tiny argument validators shared by every layer.

Each raises ``ValueError`` / ``TypeError`` with one sentence naming the argument, the value and what is
allowed (the convention of ``DESIGN.md``).
"""

from __future__ import annotations

import enum
import math
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def as_enum(enum_cls: type[E], value: object, name: str) -> E:
    """Return ``value`` as a member of ``enum_cls``; accepts the member or its string value.

    >>> import enum
    >>> class Color(str, enum.Enum):
    ...     RED = "red"
    >>> as_enum(Color, "red", "color")
    <Color.RED: 'red'>
    """
    if isinstance(value, enum_cls):
        return value
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    if isinstance(value, str):
        for member in enum_cls:
            if member.value == value.lower():
                return member
    raise ValueError(f"{name}={value!r} is not valid; allowed: {allowed}.")


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not merely truthy), else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int > 0 (>= 0 with ``allow_zero``), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name}={value} is not allowed; it must be an integer {bound}.")
    return value


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it is finite and inside the given interval, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    v = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {interval}.")
    return v
