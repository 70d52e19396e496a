"""What a simulation leaves to be built when read: the memory timeline and window records.

A planner reads them for about one simulation in ten, so the simulator keeps each rank's
timeline as plain entries plus a `Replay` per action it ran on the short path (`sim.fast`), and
these views expand a Replay only when asked: the same clock additions in the same order as the
step-by-step walk, so the points and records are bit-for-bit those of walking.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from lynxpipe.schedule.actions import Action, Window
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL
from lynxpipe.sim.result import Timeline

if TYPE_CHECKING:
    from lynxpipe.sim.fast import Event, Summary


class Replay:
    """An action run on the short path: its summary and where it started (time, memory), all
    `points` and `records` need."""

    __slots__ = ("action", "rank", "summary", "t_ms", "mem_bytes")

    def __init__(self, action: Action, rank: int, summary: Summary, t_ms: float,
                 mem_bytes: int) -> None:
        self.action, self.rank, self.summary = action, rank, summary
        self.t_ms, self.mem_bytes = t_ms, mem_bytes


WindowKey = tuple[str, int, int, int, int, str]
"""A window's fields in order (kind, mb, stage, layer, step, recv). `Window` is a named tuple, so
a plain tuple of its fields hashes and compares equal to it: tables are keyed by the plan's
Window objects, and the hot loops probe them with plain tuples, ~13x cheaper to build."""


@lru_cache(maxsize=1 << 18)
def window_of(key: WindowKey) -> Window:
    """The Window of a probe tuple, for the records of opened windows; building a named tuple
    costs ~0.7 us and a step opens thousands of windows, so they are shared across runs."""
    return Window(*key)


def _timed(replay: Replay) -> Iterator[tuple[float, Event]]:
    """Each event of the action with the clock at it: the same additions, in the same order,
    as the step-by-step walk."""
    t, done, clock = replay.t_ms, 0, replay.summary.clock_ms
    for event in replay.summary.events:
        while done < event[0]:
            t += clock[done]
            done += 1
        yield t, event


def points(replay: Replay) -> list[tuple[float, int]]:
    """The (time, bytes held) points the step-by-step walk of the action adds."""
    out, mem = [], replay.mem_bytes
    for t, (_, kind, _, _, value, _) in _timed(replay):
        if not kind:
            mem += value
            out.append((t, mem))
    return out


def records(replay: Replay) -> list[tuple]:
    """The (rank, window, start, wait, used) records the step-by-step walk of the action
    makes."""
    mb, stage = replay.action.mb, replay.action.stage
    return [(replay.rank, window_of((kind, mb, stage, layer, step, "")), t, value, used)
            for t, (_, kind, layer, step, value, used) in _timed(replay) if kind]


def _kind(replay: Replay) -> str:
    """The kind of every window a short-path action opens: forward or backward collective."""
    return FWD_COLL if replay.action.kind == "F" else BWD_COLL


class Details:
    """What a simulation leaves to be built when read: each rank's timeline and the window
    records, as the simulator kept them (plain entries, and a Replay per short-path action).
    Planners read one of these for about one simulation in ten."""

    def __init__(self, timelines: list[list], windows: list) -> None:
        self.timelines, self.windows = timelines, windows

    def timeline(self) -> Timeline:
        """Per rank: (time_ms, bytes held) after every change."""
        return tuple(tuple(p for item in items for p in (
            points(item) if type(item) is Replay else (item,))) for items in self.timelines)

    def held(self, rank: int) -> list[int]:
        """The bytes column of a rank's timeline, without its clock: a Replay adds its
        summary's relative bytes to what it began with."""
        out: list[int] = []
        for item in self.timelines[rank]:
            if type(item) is Replay:
                out += [item.mem_bytes + b for b in item.summary.held_bytes]
            else:
                out.append(item[1])
        return out

    def records(self, kinds: frozenset[str]) -> list[tuple]:
        """(rank, window, start_ms, wait_ms, used_ms) of the windows of `kinds`, in order;
        Replays of the other kinds are not walked."""
        out: list[tuple] = []
        for item in self.windows:
            if type(item) is Replay:
                if _kind(item) in kinds:
                    out += records(item)
            elif item[1].kind in kinds:
                out.append(item)
        return out

    def waits(self, kinds: frozenset[str]) -> list[tuple[Window, float, float]]:
        """(window, wait_ms, used_ms) of the windows of `kinds`, in order; a short-path
        action's windows come off its summary without walking its clock."""
        out: list[tuple[Window, float, float]] = []
        for item in self.windows:
            if type(item) is Replay:
                if _kind(item) in kinds:
                    mb, stage = item.action.mb, item.action.stage
                    out += [(window_of((kind, mb, stage, layer, step, "")), value, used)
                            for _, kind, layer, step, value, used in item.summary.events
                            if kind]
            elif item[1].kind in kinds:
                out.append((item[1], item[3], item[4]))
        return out
