"""The simulator's short path: an F or B action that hosts no recompute, summarised per stage.

Most F/B actions of a plan host no pinned recompute and find none of their tasks regenerated
early (every action of an on-demand plan, the forwards of a windowed one). Their effect on the
rank is then the same for every micro-batch: the same additions to its clock and counters, the
same memory changes. A `Summary` holds those additions in the order the step-by-step walk makes
them, so the clock and counters come out bit-for-bit the same, and the memory's net change and
highest point exactly (integers). What a summary does not build, the memory points and window
records, a `Replay` builds on demand by walking the action again the long way: a planner reads
them for one simulation in ~10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.windows import is_planned


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
    """Additions to the rank's exposed recompute (on-demand tasks), in order."""
    net_bytes: int
    """Activation bytes held after the action minus before."""
    high_bytes: int | None
    """Highest of the held bytes at each change, relative to before; None if nothing changes."""
    points: int
    """Memory-timeline points the action adds."""
    windows: int
    """Window records the action adds."""


class Replay:
    """An action run on the short path: enough to walk it again for its timeline points and
    window records (filled in by the simulator the first time anyone asks)."""

    __slots__ = ("action", "rank", "t_ms", "mem_bytes", "points", "records")

    def __init__(self, action: Action, rank: int, t_ms: float, mem_bytes: int) -> None:
        self.action, self.rank, self.t_ms, self.mem_bytes = action, rank, t_ms, mem_bytes
        self.points: list[tuple[float, int]] | None = None
        self.records: list[tuple] = []


def _summary(clock: list[float], compute: list[float], comm: list[float],
             recompute: list[float], changes: list[int], windows: int) -> Summary:
    mem, high = 0, None
    for nbytes in changes:
        mem += nbytes
        high = mem if high is None else max(high, mem)
    return Summary(tuple(clock), tuple(compute), tuple(comm), tuple(recompute), mem, high,
                   len(changes), windows)


def forward_summary(entries: list, sync_ms: float) -> Summary:
    """The additions `Simulator._forward_steps` makes over a stage's forward entries
    (layer, compute_ms, alloc_bytes, coll_ms, step), each window empty."""
    clock: list[float] = []
    compute: list[float] = []
    comm: list[float] = []
    changes: list[int] = []
    for _, ms, nbytes, coll_ms, _ in entries:
        clock.append(ms)
        compute.append(ms)
        if nbytes:
            changes.append(nbytes)
        if coll_ms >= 0:
            clock += [coll_ms, sync_ms]
            comm.append(coll_ms + sync_ms)
    return _summary(clock, compute, comm, [], changes, len(comm))


def backward_summary(entries: list, sync_ms: float, grad_buffer_bytes: int) -> Summary:
    """The additions `Simulator._backward_steps` makes over a stage's backward entries, each
    window empty and every needed task run on demand (once), then the gradient buffer freed
    (`grad_buffer_bytes`, 0 on the last stage)."""
    clock: list[float] = []
    compute: list[float] = []
    comm: list[float] = []
    recompute: list[float] = []
    changes: list[int] = []
    ran: set[tuple[int, int]] = set()
    windows = 0
    for layer, tasks, needs, ms, overlap_ms, overlap_wall_ms, wait_ms, coll_ms, nfree, _ \
            in entries:
        for seg in needs:
            if (layer, seg) in ran:
                continue
            ran.add((layer, seg))
            task = tasks[seg]
            clock.append(task.duration_ms)
            recompute.append(task.duration_ms)
            if task.alloc_bytes:
                changes.append(task.alloc_bytes)
        clock.append(ms)
        compute.append(ms)
        if coll_ms >= 0:
            clock += [overlap_wall_ms, wait_ms, sync_ms]
            compute.append(overlap_ms)
            comm += [overlap_wall_ms - overlap_ms, wait_ms + sync_ms]
            windows += 1
        if nfree:
            changes.append(-nfree)
    if grad_buffer_bytes:
        changes.append(-grad_buffer_bytes)
    return _summary(clock, compute, comm, recompute, changes, windows)


@dataclass(slots=True)
class RankState:
    """Mutable state of one simulated rank (slots: its fields are read in the hot loops)."""

    rank: int
    actions: tuple[Action, ...]
    idx: int = 0
    t: float = 0.0
    comm_free: float = 0.0
    mem: int = 0
    peak: int = 0
    compute_ms: float = 0.0
    comm_exposed_ms: float = 0.0
    idle_ms: float = 0.0
    recompute_hidden_ms: float = 0.0
    recompute_exposed_ms: float = 0.0
    pinned: dict[Window, list[Action]] = field(default_factory=dict)
    done: set[tuple[int, int, int]] = field(default_factory=set)
    timeline: list[tuple[float, int] | Replay] = field(default_factory=list)
    extra: int = 0
    """Timeline points held in Replays beyond the one list slot each (marks count them)."""
    marks: list[int] = field(default_factory=list)


def summaries(fwd: list[list], bwd: list[list], sync_ms: float, grad_buffer_bytes: int,
              ) -> dict[tuple[str, int], Summary]:
    """("F" | "B", stage) -> summary, from each stage's flattened forward and backward entries
    (every stage but the last frees the gradient buffer it received after its backward)."""
    last = len(fwd) - 1
    out = {("F", s): forward_summary(entries, sync_ms) for s, entries in enumerate(fwd)}
    out.update({("B", s): backward_summary(entries, sync_ms, grad_buffer_bytes if s < last
                                           else 0) for s, entries in enumerate(bwd)})
    return out


def apply(st: RankState, s: Summary, action: Action) -> Replay:
    """Add a summary to a simulated rank's state `st` (clock, counters, memory and peak), the
    same float additions in the same order as the walk; returns the action's Replay."""
    replay = Replay(action, st.rank, st.t, st.mem)
    t, compute, comm, exposed = st.t, st.compute_ms, st.comm_exposed_ms, st.recompute_exposed_ms
    for x in s.clock_ms:
        t += x
    for x in s.compute_ms:
        compute += x
    for x in s.comm_ms:
        comm += x
    for x in s.recompute_ms:
        exposed += x
    st.t, st.compute_ms, st.comm_exposed_ms, st.recompute_exposed_ms = t, compute, comm, exposed
    if s.high_bytes is not None and st.mem + s.high_bytes > st.peak:
        st.peak = st.mem + s.high_bytes
    st.mem += s.net_bytes
    return replay


def expand(items: list, walked: Callable[[Replay], list]) -> tuple:
    """A rank's timeline or the window records, each Replay in it replaced by what walking
    its action again gives (`walked`)."""
    out: list = []
    for item in items:
        if type(item) is Replay:
            out += walked(item)
        else:
            out.append(item)
    return tuple(out)


def pinned_hosts(order: PipelineOrder) -> tuple[set[tuple[str, int, int]], ...]:
    """Per rank, the F/B actions (kind, mb, stage) that may not take the short path: those
    hosting a pinned window, and every B of a micro-batch with a task pinned anywhere (its
    on-demand tasks may have run early)."""
    out = []
    for actions in order.ranks:
        hosts: set[tuple[str, int, int]] = set()
        for action in actions:
            w = action.window
            if action.kind != "R" or w is None or not is_planned(w.kind):
                continue
            host = w.host()
            if host is not None:
                hosts.add(host)
            hosts.update(("B", action.mb, s) for s in range(order.num_stages))
        out.append(hosts)
    return tuple(out)
