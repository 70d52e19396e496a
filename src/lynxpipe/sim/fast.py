"""The simulator's short path: an F or B action summarised per stage.

Most F/B actions of a plan host no pinned recompute and find none of their tasks regenerated
early (every action of an on-demand plan, the forwards of a windowed one). Their effect on the
rank is then the same for every micro-batch: the same additions to its clock and counters, the
same memory changes. A `Summary` holds those additions in the order the step-by-step walk makes
them, so the clock and counters come out bit-for-bit the same, and the memory's net change and
highest point exactly (integers). A backward whose windows host recompute gets a summary of
the walk with those tasks (`windowed`): the micro-batches of a windowed plan mostly host the
same tasks, so a few such summaries serve a whole step. What the walk would have recorded on
the way (memory points, window records) is built only when read (`sim.details`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from operator import add
from typing import NamedTuple

from lynxpipe.cost.table import CostTable, overlapped_collective
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL
from lynxpipe.sim.details import Replay
from lynxpipe.sim.program import Program, Task

Event = tuple[int, str, int, int, float, float]
"""(clock additions made before it, window kind or "" for a memory change, layer, step,
the window's wait_ms or the change in bytes, the compute its tasks used (0 for a change))."""
Filled = tuple[int, int, int]
"""A task run in a window of a backward: (its micro-batch minus the backward's, layer,
segment)."""
FwdEntry = tuple[int, float, int, float, int]
"""(layer, compute_ms, alloc_bytes, coll_ms, step) of one forward step of a stage."""
BwdEntry = tuple[int, dict[int, Task], tuple[int, ...], float, float, float, float, float, int,
                 int]
"""(layer, tasks, needs, compute_ms, overlap_ms, its wall ms under the collective, window wait_ms,
coll_ms, free_bytes, step); see `cost.table.overlapped_collective`."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What one F or B action of a stage adds to its rank when nothing is pinned to it."""

    clock_ms: tuple[float, ...]
    """Additions to the rank's clock, in the order the step-by-step walk makes them."""
    compute_ms: tuple[float, ...]
    """Additions to the rank's compute time, in order."""
    comm_ms: tuple[float, ...]
    """Additions to the rank's exposed communication, in order."""
    recompute_ms: tuple[float, ...]
    """Additions to the rank's exposed recompute (on demand, or spilling out of a window), in
    order."""
    hidden_ms: tuple[float, ...]
    """Additions to the rank's recompute hidden in windows, in order."""
    filled: tuple[Filled, ...]
    """Tasks run in the action's windows (each is then done)."""
    net_bytes: int
    """Activation bytes held after the action minus before."""
    high_bytes: int | None
    """Highest of the held bytes at each change, relative to before; None if nothing changes."""
    points: int
    """Memory-timeline points the action adds."""
    windows: int
    """Window records the action adds."""
    events: tuple[Event, ...]
    """Memory changes and window openings, in order, each after its clock additions."""
    held_bytes: tuple[int, ...]
    """Bytes held after each memory change, relative to before the action."""


class _Walk:
    """Collects a summary while mirroring the step-by-step walk."""

    def __init__(self) -> None:
        self.clock: list[float] = []
        self.compute: list[float] = []
        self.comm: list[float] = []
        self.recompute: list[float] = []
        self.hidden: list[float] = []
        self.filled: list[Filled] = []
        self.events: list[Event] = []

    def change(self, nbytes: int) -> None:
        self.events.append((len(self.clock), "", 0, 0, nbytes, 0.0))

    def window(self, kind: str, layer: int, step: int, wait_ms: float, used_ms: float = 0.0,
               ) -> None:
        self.events.append((len(self.clock), kind, layer, step, wait_ms, used_ms))

    def summary(self) -> Summary:
        mem, held, windows = 0, [], 0
        for _, kind, _, _, value, _ in self.events:
            if kind:
                windows += 1
                continue
            mem += value
            held.append(mem)
        return Summary(tuple(self.clock), tuple(self.compute), tuple(self.comm),
                       tuple(self.recompute), tuple(self.hidden), tuple(self.filled), mem,
                       max(held, default=None), len(held), windows, tuple(self.events),
                       tuple(held))


class Stage(NamedTuple):
    """A stage's steps flattened once, and its summaries, kept per cost table and policies."""

    fwd: list[FwdEntry]
    """Forward steps, embedding to head."""
    bwd: list[BwdEntry]
    """Backward steps, head to embedding."""
    forward: Summary
    """A forward hosting no recompute."""
    backward: Summary
    """A backward hosting no recompute whose micro-batch ran no task early."""
    walk: tuple[float, int, float, float]
    """What its backward's walk reads besides the steps: (sync_ms, grad_buffer_bytes,
    extra_ms, contention), the leading arguments of `backward_summary`."""
    windowed: dict[tuple, Summary | None]
    """Backwards with windows filled, per (tasks in each window, tasks already run); filled
    in as the simulator meets them (None: the walk would reject them)."""


def stage_steps(costs: CostTable, units: list[tuple[int, Program]], grad_buffer_bytes: int,
                extra_ms: float) -> Stage:
    """A stage of (layer id, program) `units`, its backward freeing `grad_buffer_bytes` and
    running `extra_ms` on demand first."""
    c = costs.contention
    fwd = [(layer, s.compute_ms, s.alloc_bytes, s.coll_ms, s.step)
           for layer, prog in units for s in prog.fwd]
    bwd = [(layer, prog.tasks, s.needs, s.compute_ms, s.overlap_ms,
            *(overlapped_collective(s.overlap_ms, s.coll_ms, c) if s.coll_ms >= 0
              else (s.overlap_ms, 0.0)), s.coll_ms, s.free_bytes, s.step)
           for layer, prog in reversed(units) for s in prog.bwd]
    walk = (costs.tp_sync_ms, grad_buffer_bytes, extra_ms, c)
    return Stage(fwd, bwd, forward_summary(fwd, costs.tp_sync_ms),
                 backward_summary(bwd, *walk), walk, {})


def forward_summary(entries: list, sync_ms: float) -> Summary:
    """The additions `Simulator._forward` makes over a stage's forward entries
    (layer, compute_ms, alloc_bytes, coll_ms, step), each window empty."""
    w = _Walk()
    for layer, ms, nbytes, coll_ms, step in entries:
        w.clock.append(ms)
        w.compute.append(ms)
        if nbytes:
            w.change(nbytes)
        if coll_ms >= 0:
            w.window(FWD_COLL, layer, step, coll_ms)
            w.clock += [coll_ms, sync_ms]
            w.comm.append(coll_ms + sync_ms)
    return w.summary()


def backward_summary(entries: list, sync_ms: float, grad_buffer_bytes: int,
                     extra_ms: float = 0.0, contention: float = 1.0,
                     hosted: dict[tuple[int, int], tuple[Filled, ...]] | None = None,
                     done: frozenset[tuple[int, int]] = frozenset(),
                     tasks_of: Callable[[int], dict] | None = None) -> Summary | None:
    """The additions `Simulator._backward` makes over a stage's backward entries: `extra_ms`
    of on-demand recompute first (if any), each window filled with the tasks `hosted` there
    (by (layer, step), in pin order; `tasks_of(layer)` gives a layer's tasks), every needed
    task not in `done` (layer, segment) nor filled on demand (once), then the gradient buffer
    freed (`grad_buffer_bytes`, 0 on the last stage).

    None where the walk would raise or leave a hosted window unopened (a whole-layer or
    unknown task in a window, a task run twice): the simulator then walks step by step,
    which says what is wrong.
    """
    w = _Walk()
    if extra_ms:
        w.clock.append(extra_ms)
        w.recompute.append(extra_ms)
    hosted = hosted or {}
    ran, opened = set(done), 0
    for layer, tasks, needs, ms, overlap_ms, overlap_wall_ms, wait_ms, coll_ms, nfree, step \
            in entries:
        for seg in needs:
            if (layer, seg) in ran:
                continue
            ran.add((layer, seg))
            task = tasks[seg]
            w.clock.append(task.duration_ms)
            w.recompute.append(task.duration_ms)
            if task.alloc_bytes:
                w.change(task.alloc_bytes)
        w.clock.append(ms)
        w.compute.append(ms)
        if coll_ms >= 0:
            w.clock.append(overlap_wall_ms)
            w.compute.append(overlap_ms)
            w.comm.append(overlap_wall_ms - overlap_ms)
            filled = hosted.get((layer, step))
            if filled is None:
                w.window(BWD_COLL, layer, step, wait_ms)
                w.clock += [wait_ms, sync_ms]
                w.comm.append(wait_ms + sync_ms)
            elif not _fill(w, filled, ran, wait_ms, contention, tasks_of, layer, step, sync_ms):
                return None
            opened += filled is not None
        if nfree:
            w.change(-nfree)
    if grad_buffer_bytes:
        w.change(-grad_buffer_bytes)
    return w.summary() if opened == len(hosted) else None


def _fill(w: _Walk, filled: tuple[Filled, ...], ran: set[tuple[int, int]], wait_ms: float,
          contention: float, tasks_of: Callable[[int], dict], layer: int, step: int,
          sync_ms: float) -> bool:
    """A window of `wait_ms` running `filled`, as `Simulator._window` and `_fill` do: each
    task's bytes at the window's start, what does not fit in its capacity runs after it.
    False where the step-by-step walk would raise."""
    capacity, used = wait_ms * contention, 0.0
    for off, task_layer, seg in filled:
        task = tasks_of(task_layer).get(seg) if seg >= 0 else None
        if task is None or (off, task_layer, seg) in w.filled or (
                off == 0 and (task_layer, seg) in ran):
            return False
        if off == 0:
            ran.add((task_layer, seg))
        w.filled.append((off, task_layer, seg))
        dur = task.duration_ms
        hidden = max(0.0, min(dur, capacity - used))
        used += dur
        w.hidden.append(hidden)
        w.recompute.append(dur - hidden)
        if task.alloc_bytes:
            w.change(task.alloc_bytes)
    w.window(BWD_COLL, layer, step, wait_ms, used)
    w.clock += [wait_ms + max(0.0, used - capacity), sync_ms]
    w.comm += [max(0.0, wait_ms - used / contention), sync_ms]
    return True


@dataclass(slots=True)
class RankState:
    """Mutable state of one simulated rank (slots: its fields are read in the hot loops)."""

    rank: int
    """Pipeline rank."""
    actions: tuple[Action, ...]
    """Its order."""
    idx: int = 0
    """Next action to run."""
    t: float = 0.0
    """Compute stream clock (ms)."""
    comm_free: float = 0.0
    """When the p2p stream is free (ms)."""
    mem: int = 0
    """Activation bytes held now."""
    peak: int = 0
    """Most activation bytes held so far."""
    compute_ms: float = 0.0
    """Forward + backward compute so far."""
    comm_exposed_ms: float = 0.0
    """Compute stream blocked on TP collectives so far."""
    idle_ms: float = 0.0
    """Waiting for pipeline neighbours so far."""
    recompute_hidden_ms: float = 0.0
    """Recompute run inside windows so far."""
    recompute_exposed_ms: float = 0.0
    """Recompute on the critical path so far."""
    pinned: dict[Window, list[Action]] = field(default_factory=dict)
    """R actions waiting for their window."""
    done: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    """Per micro-batch, (layer, segment) of its tasks run in windows or on demand."""
    timeline: list[tuple[float, int] | Replay] = field(default_factory=list)
    """(time, bytes) after each memory change; a short-path action's changes as its Replay."""
    extra: int = 0
    """Timeline points held in Replays beyond the one list slot each (marks count them)."""
    marks: list[int] = field(default_factory=list)
    """Per action run: the timeline index where its memory changes begin."""


def apply(st: RankState, s: Summary, action: Action) -> Replay:
    """Add a summary to a simulated rank's state `st` (clock, counters, memory and peak), the
    same float additions in the same order as the walk (a left fold of `operator.add`: one
    IEEE addition per element, in order, not `sum`, which may compensate); returns the
    action's Replay."""
    replay = Replay(action, st.rank, s, st.t, st.mem)
    st.t = reduce(add, s.clock_ms, st.t)
    st.compute_ms = reduce(add, s.compute_ms, st.compute_ms)
    st.comm_exposed_ms = reduce(add, s.comm_ms, st.comm_exposed_ms)
    st.recompute_exposed_ms = reduce(add, s.recompute_ms, st.recompute_exposed_ms)
    if s.hidden_ms:
        st.recompute_hidden_ms = reduce(add, s.hidden_ms, st.recompute_hidden_ms)
    if s.high_bytes is not None and st.mem + s.high_bytes > st.peak:
        st.peak = st.mem + s.high_bytes
    st.mem += s.net_bytes
    return replay


class Hosted(NamedTuple):
    """The recompute pinned to the windows of one backward, read off the order once."""

    windows: tuple[Window, ...]
    """The windows, in pin order."""
    fills: tuple[tuple[tuple[int, int], tuple[Filled, ...]], ...] | None
    """Per window: its (layer, step) and tasks, in pin order; None where the walk would read
    beyond the stage (a task of another stage's layer) or the window is not a backward
    collective's (the simulator then walks step by step)."""


_UNKNOWN = object()


def windowed(st: RankState, action: Action, hosted: Hosted, inside: frozenset[int],
             stage: Stage, tasks_of: Callable[[int], dict]) -> Summary | None:
    """The summary of B `action` with the tasks `hosted` in its windows and those its
    micro-batch already ran, from `stage`'s table or walked now (`tasks_of(layer)`: a layer's
    tasks).

    Kept per what the walk reads: the tasks in each window (micro-batch relative to the
    action's) and the stage's tasks already run (`inside`: the stage's layers). None where
    the walk would raise or read beyond the stage: the simulator then walks step by step.
    The tasks are those of the whole order; one pinned only after its window has passed is
    left pinned either way, and the step is rejected for it at the end.
    """
    if hosted.fills is None:
        return None
    mb, ran = action.mb, st.done.get(action.mb)
    key = (hosted.fills, frozenset(t for t in ran if t[0] in inside) if ran else frozenset())
    s = stage.windowed.get(key, _UNKNOWN)
    if s is _UNKNOWN:
        s = stage.windowed[key] = backward_summary(stage.bwd, *stage.walk, dict(hosted.fills),
                                                   key[1], tasks_of)
    if s is None or any(off and (layer, seg) in st.done.get(mb + off, ())
                        for off, layer, seg in s.filled):
        return None  # a later micro-batch's task already ran: the walk says so
    return s


def mark_run(st: RankState, mb: int, s: Summary, hosted: Hosted) -> None:
    """After B of `mb` ran as summary `s`: its windows are consumed, their tasks done."""
    for w in hosted.windows:
        st.pinned.pop(w, None)
    for off, layer, seg in s.filled:
        st.done.setdefault(mb + off, set()).add((layer, seg))


def pinned_hosts(order: PipelineOrder, stage_sets: list[frozenset[int]],
                 ) -> tuple[tuple[set[tuple[str, int, int]], dict[tuple[int, int], Hosted]], ...]:
    """Per rank: the F/B actions (kind, mb, stage) that may not apply their stage's plain
    summary (those hosting a pinned window, and every B of a micro-batch with a task pinned
    anywhere: its on-demand tasks may have run early), and per B (mb, stage) among them what
    is pinned to its windows (`stage_sets`: each stage's layers)."""
    out = []
    for actions in order.ranks:
        hosts: set[tuple[str, int, int]] = set()
        early: set[int] = set()
        tasks: dict[tuple[int, int], dict[Window, list[Filled]]] = {}
        for a in actions:
            host = a.window.host() if a.kind == "R" and a.window is not None else None
            if host is None:  # not an R, or on demand: nothing pinned
                continue
            hosts.add(host)
            early.add(a.mb)
            if host[0] == "B":
                tasks.setdefault(host[1:], {}).setdefault(a.window, []).append(
                    (a.mb - host[1], a.layer, a.segment))
        hosts.update(("B", mb, s) for mb in early for s in range(order.num_stages))
        out.append((hosts, {(mb, stage): _hosted(per, stage_sets[stage])
                            for (mb, stage), per in tasks.items()}))
    return tuple(out)


def _hosted(per: dict[Window, list[Filled]], inside: frozenset[int]) -> Hosted:
    """What is pinned to one backward's windows (`per`: window -> its tasks), with the fills
    the walk reads unless a task belongs to another stage or a window is not a backward
    collective's."""
    windows = tuple(per)
    fills = []
    for w, ts in per.items():  # loops, not generators: asked for every backward hosting
        if w.kind != BWD_COLL or w.recv:  # tasks, by every simulation
            return Hosted(windows, None)
        for t in ts:
            if t[1] not in inside:
                return Hosted(windows, None)
        fills.append(((w.layer, w.step), tuple(ts)))
    return Hosted(windows, tuple(fills))


NOTHING_HOSTED = Hosted((), ())
"""A backward whose windows host nothing (its micro-batch ran tasks early)."""
