"""Values derived from one LayerCost, memoised per cost object.

A planner run asks for the same derived data (compiled programs, layer options, on-demand
count options) of one LayerCost many times, across its candidates and partitions. LayerCost
holds dicts, so it is unhashable and keyed by identity; a weak reference drops the entry when
the cost dies, before its id can be reused. A new cost object (a new request's cost model)
starts cold, so timing a planner on a fresh cost table measures the whole work.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

_CACHE: dict[int, tuple[weakref.ref, dict[Hashable, Any]]] = {}


def per_cost(cost: object, key: Hashable, build: Callable[[], T]) -> T:
    """`build()` memoised per (cost object, key). The value is shared: callers must not mutate
    it, and the cost must not be mutated after its first use (LayerCost is frozen)."""
    ident = id(cost)
    entry = _CACHE.get(ident)
    if entry is None or entry[0]() is not cost:
        entry = (weakref.ref(cost, lambda ref: _forget(ident, ref)), {})
        _CACHE[ident] = entry
    values = entry[1]
    if key not in values:
        values[key] = build()
    return values[key]


def _forget(ident: int, ref: weakref.ref) -> None:
    """Weak-reference callback: drop the entry of a dead cost (only if it is still ours)."""
    entry = _CACHE.get(ident)
    if entry is not None and entry[0] is ref:
        del _CACHE[ident]
