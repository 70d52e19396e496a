"""The value rules every input goes through: specs, artifacts, config files and CLI flags.

One place for "is this a usable integer / finite number / probability", so a NaN, an infinity,
a bool where a number belongs or an integer too large for the float arithmetic of the cost
model is refused with the same one-line message wherever it comes from:
`<what>=<value> must be <rule>`.
"""

from __future__ import annotations

import math
from typing import Any

from lynxpipe.errors import LynxError

MAX_INT = 2**53
"""Largest integer any spec field may hold: the cost model computes in floats, which hold
integers exactly up to 2**53 (and overflow on Python ints past ~1e308)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, what: str, lo: int = 1, hi: int = MAX_INT) -> int:
    """`value`, an int in [lo, hi] (JSON files may say 40e9: `artifact` converts those)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        rule = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        if hi < MAX_INT:
            rule = f"an integer in {lo}..{hi}"
        raise LynxError(f"{what}={_show(value)} must be {rule}")
    return value


def number(value: Any, what: str, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float within the given bounds (open or closed)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int past the float range (10**400 in a JSON file)
        ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = _bounds(lo, hi, lo_open, hi_open)
        kind = "a number" if lo is not None and hi is not None else "a finite number"
        raise LynxError(f"{what}={_show(value)} must be {kind}{bounds}")
    return float(value)


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi:g}"
    return ""


def probability(value: Any, what: str) -> float:
    """A dropout rate: a finite number in [0, 1)."""
    return number(value, what, 0.0, 1.0, hi_open=True)


def text(value: Any, what: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise LynxError(f"{what}={_show(value)} must be a non-empty string")
    return value
