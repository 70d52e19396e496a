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
