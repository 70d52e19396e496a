"""The registry of window kinds: where a recompute task can run (SPEC §4).

One row per kind holds everything the rest of the code asks about a kind: its label and short
name for reports, its display order, and which action *hosts* it (the action whose execution
contains the window; a task pinned there is inserted right before that action). The simulator,
the runtime, the validator, the planners and the reports read these rows instead of comparing
string literals, so a new kind is a new row plus the code that opens the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lynxpipe.errors import LynxError

WindowKind = Literal["fwd_coll", "bwd_coll", "recv", "on_demand"]

FWD_COLL: WindowKind = "fwd_coll"
BWD_COLL: WindowKind = "bwd_coll"
RECV: WindowKind = "recv"
ON_DEMAND: WindowKind = "on_demand"


@dataclass(frozen=True)
class WindowKindInfo:
    """What one kind of window is and where it lives."""

    name: WindowKind
    """The kind as stored in plans and traces."""
    label: str
    """Human description, for reports."""
    short: str
    """One-letter name for dense per-rank listings."""
    order: int
    """Display order: earliest in a step first, exposed (on demand) last."""
    host: Literal["F", "B", "RECV", ""]
    """Action kind hosting the window: a forward, a backward, the receive named by the window's
    `recv` field, or "" for on demand (it runs right before the backward needing it)."""
    in_layer: bool
    """The window is a collective inside a layer's program: `layer` and `step` name it."""
    hidden: bool
    """Recompute there overlaps idle time; False for on demand (on the critical path)."""


WINDOW_KINDS: dict[str, WindowKindInfo] = {
    FWD_COLL: WindowKindInfo(FWD_COLL, "forward TP collective", "F", 0, "F", True, True),
    RECV: WindowKindInfo(RECV, "pipeline receive wait", "R", 1, "RECV", False, True),
    BWD_COLL: WindowKindInfo(BWD_COLL, "backward TP collective remainder", "B", 2, "B", True,
                             True),
    ON_DEMAND: WindowKindInfo(ON_DEMAND, "on demand (exposed)", "D", 3, "", False, False),
}
"""Every window kind, in display order."""

_PLANNED = frozenset(name for name, info in WINDOW_KINDS.items() if info.host)


def window_kind(name: str) -> WindowKindInfo:
    """The registry row of `name`; an unknown kind is an error naming the known ones."""
    info = WINDOW_KINDS.get(name)
    if info is None:
        raise LynxError(f"unknown window kind {name!r}; known: {', '.join(WINDOW_KINDS)}")
    return info


def display_order(name: str) -> int:
    """Sort key of a kind in reports (unknown kinds last)."""
    info = WINDOW_KINDS.get(name)
    return info.order if info is not None else len(WINDOW_KINDS)


def is_planned(name: str) -> bool:
    """Whether a task of this kind is pinned to a window (not left for on-demand insertion)."""
    if name in _PLANNED:  # asked once per task by every simulation: skip the registry row
        return True
    return window_kind(name).host != ""  # raises for an unknown kind
