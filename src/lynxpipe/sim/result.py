"""Simulation results: per-rank breakdown, memory timeline and trace events."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.windows import WINDOW_KINDS

if TYPE_CHECKING:  # sim.details builds on this module
    from lynxpipe.sim.details import Details


@dataclass(frozen=True)
class TraceEvent:
    """One interval on a rank's compute or communication stream."""

    rank: int
    """Pipeline rank."""
    stream: str
    """'compute' or 'comm'."""
    name: str
    """Label, e.g. F3 s1 or R mb2 L5 seg0."""
    cat: str
    """forward, backward, tp_comm, p2p, recompute_hidden, recompute_exposed, idle."""
    start_ms: float
    """Start time."""
    dur_ms: float
    """Duration."""


class WindowUse(NamedTuple):
    """One occurrence of a window on a rank: how long the compute stream could idle, how much
    recompute was put in it. A named tuple: a step opens thousands of windows, and a frozen
    dataclass's constructor took a third of `simulate`."""

    rank: int
    """Pipeline rank."""
    window: Window
    """The window (kind, micro-batch, stage, layer, step)."""
    start_ms: float
    """When the window opened."""
    wait_ms: float
    """Idle time available (collective remainder or RECV wait) before any recompute."""
    used_ms: float
    """Recompute placed in it (capacity is wait_ms * contention)."""


@dataclass(frozen=True)
class RankStats:
    """Where one pipeline rank's step time went (SPEC §6)."""

    rank: int
    """Pipeline rank."""
    compute_ms: float
    """Forward + backward compute (recompute excluded)."""
    comm_exposed_ms: float
    """Compute stream blocked on TP collectives and not filled with recompute."""
    idle_ms: float
    """Waiting for pipeline neighbours (bubbles), not filled with recompute, incl. end idle."""
    recompute_hidden_ms: float
    """Recompute that ran inside a window."""
    recompute_exposed_ms: float
    """Recompute on the critical path (on demand or window overflow)."""
    tail_ms: float
    """DP gradient all-reduce and optimizer step."""
    peak_activation_bytes: int
    """Peak of kept + regenerated activations (what the runtime's memory meter counts)."""
    static_bytes: int
    """Parameters, gradients and optimizer state."""

    @property
    def peak_memory_bytes(self) -> int:
        """Static + peak activation bytes."""
        return self.static_bytes + self.peak_activation_bytes


Timeline = tuple[tuple[tuple[float, int], ...], ...]
"""Per rank: (time_ms, activation bytes) after every change."""


@dataclass(frozen=True)
class SimResult:
    """Outcome of simulating one training step."""

    step_time_ms: float
    """Time of the slowest rank, DP sync and optimizer included."""
    ranks: tuple[RankStats, ...]
    """Per pipeline rank breakdown."""
    details: Details = field(repr=False, compare=False)
    """What is built when read: the memory timeline, the window records and views of them
    (planners read them for about one simulation in ten; building them every time was a fifth
    of a simulation's time)."""
    events: tuple[TraceEvent, ...] = ()
    """Trace events (empty unless requested)."""
    action_marks: tuple[tuple[int, ...], ...] = ()
    """Per rank: for each action of its order, the index in `memory_timeline` where the
    action's memory changes begin (the memory held during each action, for planners)."""

    @cached_property
    def memory_timeline(self) -> Timeline:
        """Per rank: (time_ms, activation bytes) after every change."""
        return self.details.timeline()

    @cached_property
    def windows(self) -> tuple[WindowUse, ...]:
        """Every window that opened, in simulation order."""
        return tuple(map(WindowUse._make, self.details.records(frozenset(WINDOW_KINDS))))

    def idle_of(self, kinds: frozenset[str]) -> list[tuple[Window, float, float]]:
        """(window, wait_ms, used_ms) of every window of `kinds`, in simulation order: what a
        planner moving tasks into idle windows reads, without building the records."""
        return self.details.waits(kinds)

    def action_peak_bytes(self, rank: int) -> list[int]:
        """Most activation bytes `rank` holds at any point of each of its actions: what it
        held when the action began, and every change the action makes."""
        marks = np.asarray(self.action_marks[rank], dtype=np.int64)
        if not len(marks):
            return []
        # held[i + 1] is the memory after the timeline's i-th change; held[0] = 0 before any
        held = np.array([0, *self.details.held(rank)], dtype=np.int64)
        # action i spans held[marks[i] : marks[i + 1] + 1]: from what it began with (the point
        # at its mark) through its last change (the one before the next action's mark)
        peak = np.maximum.reduceat(held, marks)
        peak[:-1] = np.maximum(peak[:-1], held[marks[1:]])
        return peak.tolist()

    @property
    def recompute_exposed_ms(self) -> float:
        """Largest per-rank exposed recompute (ms)."""
        return max((r.recompute_exposed_ms for r in self.ranks), default=0.0)

    @property
    def recompute_hidden_ms(self) -> float:
        """Largest per-rank hidden recompute (ms)."""
        return max((r.recompute_hidden_ms for r in self.ranks), default=0.0)
