"""Ranges of numeric settings, written as data: `{"lr": "(0, 1]"}`, one error per key.

Why: YAML's `.nan` and `.inf` are valid floats, and so is a learning rate of
1e30; a run with either trains on garbage. The loader refuses non-finite floats
for every field; the recipes' hyperparameter sections also give each number the
interval it makes sense in, and `check_bounds` names the first key outside it.

Limitations:
1. The upper limits (a learning rate above 1, a temperature above 10) are
   judgement, not mathematics: they refuse values no real run uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from rlsync.errors import ConfigError

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def check_bounds(section: str, obj: Any, bounds: Mapping[str, str]) -> None:
    """`ConfigError` naming `section.key` for the first field of `obj` outside its interval (None is skipped)."""
    for key, interval in bounds.items():
        value = getattr(obj, key)
        if value is not None and not in_interval(value, interval):
            raise ConfigError(f"{section}.{key} must be {describe(interval)}, got {value!r}")


def in_interval(value: float, interval: str) -> bool:
    """True if `value` is a finite number inside `interval` (`"[0, 1)"`, `"(0, inf)"`, ...)."""
    low_open, low, high, high_open = _parse(interval)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def describe(interval: str) -> str:
    """`"(0, inf)"` -> `"> 0"`, `"[1, inf)"` -> `">= 1"`, `"(0, 1]"` -> `"in (0, 1]"` (always finite)."""
    low_open, low, high, _ = _parse(interval)
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {_number(low)} (and finite)"
    return f"in {interval}"


def _parse(interval: str) -> tuple[bool, float, float, bool]:
    match = _INTERVAL.match(interval)
    if not match:
        raise ValueError(f"{interval!r} is not an interval like '(0, 1]'")
    low, high = float(match.group(2)), float(match.group(3))
    return match.group(1) == "(", low, high, match.group(4) == ")"


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
