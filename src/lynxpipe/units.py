"""Parsing and printing of byte sizes (budgets are given as `40GiB`, `4e10`, `512MB`)."""

from __future__ import annotations

import math
import re

from lynxpipe.errors import LynxError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MAX_BYTES = 2**60
"""Largest size accepted (1 EiB): far above any device, and small enough that every byte count
stays exact in the float arithmetic of the cost model."""
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "budget") -> int:
    """Return the number of bytes in `text` (an int, or a string such as `40GiB` or `1.5e9`)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _PATTERN.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise LynxError(
                f"{what}={text!r} is not a size; write bytes or a number with a unit "
                f"(B, KB, MB, GB, KiB, MiB, GiB, e.g. 40GiB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    scaled = value * _UNITS[unit]
    if not math.isfinite(scaled) or scaled > MAX_BYTES:  # 1e400 parses as inf
        raise LynxError(f"{what}={text!r} is too large; sizes go up to 1 EiB (2**60 bytes)")
    size = int(scaled)
    if size <= 0:
        raise LynxError(f"{what}={text!r} must be positive")
    return size


def format_bytes(size: float) -> str:
    """Human-readable binary size, e.g. `12.3 GiB`."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


_SCALES = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def size_unit(nbytes: float) -> tuple[str, int]:
    """The largest binary unit in which `nbytes` is at least 1 (`B` below 1 KiB): a table of
    tiny-model figures reads in MiB, never as a column of `0.0 GiB`."""
    for unit, scale in _SCALES:
        if abs(nbytes) >= scale:
            return unit, scale
    return "B", 1


def in_unit(nbytes: float, unit: str) -> str:
    """`nbytes` in `unit` (from `size_unit`) with one decimal, bytes as a whole number."""
    scale = dict(_SCALES).get(unit, 1)
    return f"{nbytes / scale:,.1f}" if scale > 1 else f"{nbytes:,.0f}"


def format_size(nbytes: float) -> str:
    """`nbytes` in its own unit with one decimal, e.g. `4.0 MiB`, `33.2 GiB`."""
    unit = size_unit(nbytes)[0]
    return f"{in_unit(nbytes, unit)} {unit}"


def format_ms(ms: float) -> str:
    """A duration in ms: one decimal from 100 ms up (`3,070.9`), else three significant
    digits (`0.0734`), so sub-millisecond steps of tiny models do not read as `0.1`."""
    return f"{ms:,.1f}" if abs(ms) >= 100 else f"{ms:.3g}"
