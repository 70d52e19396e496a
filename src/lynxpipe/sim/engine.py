"""The discrete-event simulator: one compute and one communication stream per pipeline rank.

TP ranks of a stage run identical programs, so one simulated rank stands for its TP group and
TP collectives are fixed-duration blocking steps. Ranks advance round-robin until each blocks on a
RECV whose SEND has not been simulated yet; no progress means deadlock.

Planners call `simulate` ~30 times per run, so it is written for speed: an F or B that hosts no
recompute (every one of an on-demand plan) applies its stage's summary (`sim.fast`), a B that
does applies a summary of its walk with those tasks (kept per stage and tasks), and both leave
their memory points and window records to be built if anyone reads them (`sim.details`);
elsewhere each stage's steps are flattened once into tuples, the rank's clock and counters live
in locals, and a window that hosts no recompute takes a short path; the cyclic GC is paused
during a run. Every float is still accumulated in the same order as the straightforward
interpreter, so results are bit-for-bit unchanged (tested against `short_path=False`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import ClassVar

from lynxpipe.cost.memo import per_cost
from lynxpipe.cost.memory import rank_params, static_bytes
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.policy import KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL, RECV, is_planned
from lynxpipe.sim import fast
from lynxpipe.sim.details import Details, WindowKey, window_of
from lynxpipe.sim.fast import RankState
from lynxpipe.sim.program import Program, Task, compile_program
from lynxpipe.sim.result import RankStats, SimResult, TraceEvent


class Simulator:
    """Simulates one training step of a plan; build once, `run()` once."""

    def __init__(self, costs: CostTable, partition: tuple[int, ...],
                 layers: tuple[LayerPolicy, ...], order: PipelineOrder, trace: bool = False,
                 short_path: bool = True, extra_backward_ms: tuple[float, ...] = ()):
        """`short_path=False` walks every F/B step by step: the reference the short path
        (`sim.fast`) is tested against; results are bit-for-bit the same either way.

        `extra_backward_ms[s]` is on-demand recompute every backward of stage s runs first,
        beyond the plan's own: with it, a keep-everything plan is the step of any on-demand
        plan whose backwards recompute that long (a planner's bound, `checkmate.least_step_ms`).
        """
        if len(partition) != order.num_stages:
            raise LynxError(f"partition has {len(partition)} stages, order has {order.num_stages}")
        if extra_backward_ms and len(extra_backward_ms) != order.num_stages:
            raise LynxError(f"extra backward time is given for {len(extra_backward_ms)} "
                            f"stage(s), the order has {order.num_stages}")
        self.extra_backward_ms = extra_backward_ms or (0.0,) * order.num_stages
        if sum(partition) != len(layers):
            raise LynxError(f"partition covers {sum(partition)} layers, policy has {len(layers)}")
        self.costs, self.order, self.trace = costs, order, trace
        self.partition = partition
        self.stage_layers = stage_layers(partition)
        self.num_layers = len(layers)
        self.programs = [compile_program(costs.layer, p) for p in layers]
        self.embed = compile_program(costs.embed, KEEP_ALL)
        self.head = compile_program(costs.head, KEEP_ALL)
        self.arrivals: dict[tuple[str, int, int], float] = {}
        self.events: list[TraceEvent] = []
        self.windows: list[tuple[int, Window, float, float, float]] = []
        """WindowUse fields of every window opened, in order (built in bulk at the end)."""
        # An empty window's outcome reduces exactly to "idle for wait_ms" only when capacity
        # (wait_ms * contention) is >= 0 and used / contention is defined; otherwise (and when
        # tracing) every window takes the general path.
        self._inline = costs.contention > 0 and not trace
        # a planner simulates many plans whose stages mostly repeat: a stage's flattened steps
        # and summaries are kept per cost table, keyed by its layers and their policies
        last = order.num_stages - 1
        stages = [per_cost(costs, ("sim-stage", s == 0, s == last, self.num_layers,
                                   tuple((g, layers[g]) for g in self.stage_layers[s]),
                                   self.extra_backward_ms[s]),
                           lambda s=s: self._stage(s)) for s in range(last + 1)]
        self._stages = stages
        self._stage_sets = [frozenset(layers) for layers in self.stage_layers]
        # the short path (`sim.fast`) stands for the inline window path only
        self._hosts = fast.pinned_hosts(order, self._stage_sets) \
            if self._inline and short_path else ()

    # -- set-up ------------------------------------------------------------------------------
    def _units(self, stage: int) -> list[tuple[int, Program]]:
        """(layer id, program) of a virtual stage; embed is layer -1, head is layer L."""
        units = [(-1, self.embed)] if stage == 0 else []
        units += [(g, self.programs[g]) for g in self.stage_layers[stage]]
        if stage == self.order.num_stages - 1:
            units.append((self.num_layers, self.head))
        return units

    def _stage(self, stage: int) -> fast.Stage:
        return fast.stage_steps(self.costs, self._units(stage), self._grad_buffer(stage),
                                self.extra_backward_ms[stage])

    def _tasks_of(self, layer: int) -> dict[int, Task]:
        """The recompute tasks of a layer of the plan, by segment."""
        return self.programs[layer].tasks

    def _grad_buffer(self, stage: int) -> int:
        """Bytes of the gradient buffer a backward of `stage` frees (none on the last)."""
        return self.costs.grad_buffer_bytes if stage < self.order.num_stages - 1 else 0

    # -- helpers -----------------------------------------------------------------------------
    def _event(self, st: RankState, stream: str, name: str, cat: str, start: float, dur: float) -> None:
        if self.trace and dur > 0:
            self.events.append(TraceEvent(st.rank, stream, name, cat, start, dur))

    def _alloc(self, st: RankState, nbytes: int) -> None:
        if not nbytes:
            return
        st.mem += nbytes
        st.peak = max(st.peak, st.mem)
        st.timeline.append((st.t, st.mem))

    def _task(self, action: Action) -> Task:
        tasks = self.programs[action.layer].tasks if 0 <= action.layer < self.num_layers else {}
        if action.segment not in tasks:
            raise LynxError(f"{action}: layer {action.layer} drops nothing in segment "
                            f"{action.segment}, so there is nothing to recompute")
        return tasks[action.segment]

    def _window(self, st: RankState, key: WindowKey, wait_ms: float, label: str) -> None:
        """Idle for `wait_ms` on the compute stream, filled with the tasks pinned to `key`.

        Compute inside a window gets `contention` of it; what does not fit runs after it.
        """
        contention = self.costs.contention
        capacity = wait_ms * contention
        pinned = st.pinned.pop(key, None)
        used = self._fill(st, pinned, wait_ms, capacity) if pinned else 0.0
        self.windows.append((st.rank, window_of(key), st.t, wait_ms, used))
        idle = max(0.0, wait_ms - used / contention)
        recv = key[0] == RECV
        if self.trace:
            self._event(st, "compute", label, "idle" if recv else "tp_comm",
                        st.t + wait_ms - idle, idle)
        if recv:
            st.idle_ms += idle
        else:
            st.comm_exposed_ms += idle
        st.t += wait_ms + max(0.0, used - capacity)

    def _through(self, st: RankState, key: WindowKey, wait_ms: float, t: float, mem: int,
                 peak: int) -> tuple[float, int, int]:
        """Pass a collective's window opening at `t`; the caller keeps clock, memory and peak in
        locals, so they go in and come back out."""
        sync = self.costs.tp_sync_ms  # the wait for the last TP rank: no window, just late
        if self._inline and key not in st.pinned:
            # an empty window: idle = wait_ms, the clock advances by exactly wait_ms
            self.windows.append((st.rank, window_of(key), t, wait_ms, 0.0))
            st.comm_exposed_ms += wait_ms + sync
            return t + wait_ms + sync, mem, peak
        st.t, st.mem, st.peak = t, mem, peak
        self._window(st, key, wait_ms, f"TP L{key[3]}")
        st.comm_exposed_ms += sync
        return st.t + sync, st.mem, st.peak

    def _fill(self, st: RankState, pinned: list[Action], wait_ms: float, capacity: float) -> float:
        """Run the recompute `pinned` to a window opening at st.t; returns the compute used.

        The clock stays at the window start meanwhile, so allocations are stamped st.t.
        """
        t, mem, peak, timeline, done = st.t, st.mem, st.peak, st.timeline, st.done
        hidden_ms, exposed_ms, used = st.recompute_hidden_ms, st.recompute_exposed_ms, 0.0
        programs, num_layers = self.programs, self.num_layers
        for action in pinned:
            layer = action.layer
            key = (layer, action.segment)
            if action.segment < 0:
                raise LynxError(f"rank {st.rank}: {action} is a whole-layer recompute, which "
                                "replays the layer's forward collectives: it runs on demand, "
                                "not inside a communication window")
            ran = done.setdefault(action.mb, set())
            if key in ran:
                raise LynxError(f"rank {st.rank}: {action} recomputed twice")
            task = programs[layer].tasks.get(action.segment) if 0 <= layer < num_layers else None
            if task is None:
                task = self._task(action)  # raises: nothing to recompute there
            dur = task.duration_ms
            hidden = max(0.0, min(dur, capacity - used))
            if self.trace:
                name = f"R mb{action.mb} L{action.layer} seg{action.segment}"
                self._event(st, "compute", name, "recompute_hidden", t + used, hidden)
                self._event(st, "compute", name, "recompute_exposed",
                            t + wait_ms + max(0.0, used - capacity), dur - hidden)
            used += dur
            hidden_ms += hidden
            exposed_ms += dur - hidden
            ran.add(key)
            if task.alloc_bytes:
                mem += task.alloc_bytes
                if mem > peak:  # noqa: PLR1730 -- max(peak, mem) exactly, minus a call
                    peak = mem
                timeline.append((t, mem))
        st.mem, st.peak = mem, peak
        st.recompute_hidden_ms, st.recompute_exposed_ms = hidden_ms, exposed_ms
        return used

    # -- actions -----------------------------------------------------------------------------
    def _compute(self, st: RankState, action: Action) -> None:
        """An F or B: its stage's summary when nothing is pinned to it, a B's summary with
        its windows filled where that applies, else step by step."""
        if self._hosts:
            hosts, hosted = self._hosts[st.rank]
            if (action.kind, action.mb, action.stage) not in hosts:
                stage = self._stages[action.stage]
                self._short(st, action, stage.forward if action.kind == "F" else stage.backward)
                return
            if action.kind == "B" and self._windowed(
                    st, action, hosted.get((action.mb, action.stage), fast.NOTHING_HOSTED)):
                return
        if action.kind == "F":
            self._forward(st, action)
        else:
            self._backward(st, action)

    def _windowed(self, st: RankState, action: Action, hosted: fast.Hosted) -> bool:
        """A B hosting recompute in its windows, or whose micro-batch ran tasks early, as the
        summary of its walk with those tasks (`fast.windowed`); False: step by step."""
        s = fast.windowed(st, action, hosted, self._stage_sets[action.stage],
                          self._stages[action.stage], self._tasks_of)
        if s is None:
            return False
        self._short(st, action, s)
        fast.mark_run(st, action.mb, s, hosted)
        return True

    def _short(self, st: RankState, action: Action, s: fast.Summary) -> None:
        replay = fast.apply(st, s, action)
        if s.points:
            st.timeline.append(replay)
            st.extra += s.points - 1
        if s.windows:
            self.windows.append(replay)

    def _forward(self, st: RankState, action: Action) -> None:
        mb, stage = action.mb, action.stage
        start = t = st.t
        compute, mem, peak, timeline = st.compute_ms, st.mem, st.peak, st.timeline
        for layer, ms, nbytes, coll_ms, step in self._stages[stage].fwd:
            t += ms
            compute += ms
            if nbytes:
                mem += nbytes
                if mem > peak:  # noqa: PLR1730 -- max(peak, mem) exactly, minus a call
                    peak = mem
                timeline.append((t, mem))
            if coll_ms >= 0:
                t, mem, peak = self._through(st, (FWD_COLL, mb, stage, layer, step, ""),
                                             coll_ms, t, mem, peak)
        st.t, st.compute_ms, st.mem, st.peak = t, compute, mem, peak
        if self.trace:
            self._event(st, "compute", f"F{mb} s{stage}", "forward", start, t - start)

    def _backward(self, st: RankState, action: Action) -> None:
        mb, stage = action.mb, action.stage
        start = t = st.t
        extra = self.extra_backward_ms[stage]
        if extra:
            t += extra
            st.recompute_exposed_ms += extra
        compute, mem, peak, timeline = st.compute_ms, st.mem, st.peak, st.timeline
        for layer, tasks, needs, ms, overlap_ms, overlap_wall_ms, wait_ms, coll_ms, nfree, step \
                in self._stages[stage].bwd:
            if needs:
                st.t, st.mem, st.peak = t, mem, peak
                for seg in needs:
                    self._on_demand(st, mb, layer, seg, tasks)
                t, mem, peak = st.t, st.mem, st.peak
            t += ms
            compute += ms
            if coll_ms >= 0:
                t += overlap_wall_ms
                compute += overlap_ms
                st.comm_exposed_ms += overlap_wall_ms - overlap_ms  # the GEMM slowed by the coll
                t, mem, peak = self._through(st, (BWD_COLL, mb, stage, layer, step, ""),
                                             wait_ms, t, mem, peak)
            if nfree:
                mem -= nfree  # == mem + (-nfree), what a negative allocation adds
                if mem > peak:  # noqa: PLR1730 -- max(peak, mem) exactly, minus a call
                    peak = mem
                timeline.append((t, mem))
        st.t, st.compute_ms, st.mem, st.peak = t, compute, mem, peak
        if stage < self.order.num_stages - 1:
            self._alloc(st, -self.costs.grad_buffer_bytes)
        if self.trace:
            self._event(st, "compute", f"B{mb} s{stage}", "backward", start, st.t - start)

    def _on_demand(self, st: RankState, mb: int, layer: int, segment: int,
                   tasks: dict[int, Task]) -> None:
        """Run a recompute right before the backward that needs it (exposed)."""
        key, ran = (layer, segment), st.done.setdefault(mb, set())
        if key in ran:
            return
        task = tasks[segment]
        if self.trace:
            self._event(st, "compute", f"R mb{mb} L{layer} seg{segment}", "recompute_exposed",
                        st.t, task.duration_ms)
        st.t += task.duration_ms
        st.recompute_exposed_ms += task.duration_ms
        ran.add(key)
        self._alloc(st, task.alloc_bytes)

    def _send(self, st: RankState, action: Action) -> None:
        direction, dest = ("F", action.stage + 1) if action.kind == "SEND_F" else ("B", action.stage - 1)
        begin = max(st.t, st.comm_free)
        st.comm_free = begin + self.costs.p2p_ms
        self.arrivals[(direction, action.mb, dest)] = st.comm_free
        if self.trace:
            self._event(st, "comm", f"{action.kind} mb{action.mb}", "p2p", begin,
                        self.costs.p2p_ms)

    def _recv(self, st: RankState, action: Action) -> bool:
        arrival = self.arrivals.get((action.kind[-1], action.mb, action.stage))
        if arrival is None:
            return False
        if action.kind == "RECV_B":  # the gradient lands in a buffer held through B
            self._alloc(st, self.costs.grad_buffer_bytes)
        wait_ms = max(0.0, arrival - st.t)
        key = (RECV, action.mb, action.stage, -1, -1, action.kind)
        if self._inline and key not in st.pinned:
            self.windows.append((st.rank, window_of(key), st.t, wait_ms, 0.0))
            st.idle_ms += wait_ms
            st.t += wait_ms
        else:
            self._window(st, key, wait_ms, f"wait {action.kind} mb{action.mb}")
        return True

    def _pin(self, st: RankState, action: Action) -> None:
        """An R action: hold it for its window (on demand ones run at their backward anyway)."""
        w = action.window
        if w is not None and is_planned(w.kind):
            st.pinned.setdefault(w, []).append(action)

    _HANDLERS: ClassVar[dict[str, Callable[[Simulator, RankState, Action], None]]] = {
        "F": _compute, "B": _compute, "SEND_F": _send, "SEND_B": _send, "R": _pin}
    """Actions other than RECV (which may block), as plain functions: bound methods stored on
    the instance would make it a reference cycle, which `run` leaves to the collector."""

    def _advance(self, st: RankState) -> bool:
        """Execute `st`'s actions until the end or a RECV whose data is not yet known; returns
        whether any action ran. Unknown kinds are skipped as no-ops."""
        handlers = self._HANDLERS
        actions, first = st.actions, st.idx
        idx, end = first, len(actions)
        marks = st.marks
        while idx < end:
            action = actions[idx]
            kind = action.kind
            marks.append(len(st.timeline) + st.extra)
            if kind == "RECV_F" or kind == "RECV_B":
                if not self._recv(st, action):
                    marks.pop()  # not run yet: retried once its data is known
                    break
            else:
                handler = handlers.get(kind)
                if handler is not None:
                    handler(self, st, action)
            idx += 1
            st.idx = idx  # kept current: error messages and trace read it
        return idx > first

    def _tail_ms(self, rank: int) -> tuple[float, int]:
        """DP gradient all-reduce + optimizer time, and static bytes, of a rank."""
        c = self.costs
        params = rank_params(c, self.partition, self.order.pp, rank)
        dp = c.dp_alpha_ms + c.dp_ms_per_byte * 2 * params if c.dp_ms_per_byte else 0.0
        return (dp + c.optimizer_ms_per_param * params,
                static_bytes(c, self.partition, self.order.pp, rank))

    def run(self) -> SimResult:
        """Simulate the whole step."""
        # The simulation creates no reference cycles but tens of thousands of small tuples,
        # which trigger collections of the caller's (large) heap; pause the collector.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if gc_was_enabled:
                gc.enable()

    def _run(self) -> SimResult:
        states = [RankState(r, acts) for r, acts in enumerate(self.order.ranks)]
        active = list(states)
        while active:
            progressed = False
            for st in active:
                progressed |= self._advance(st)
            active = [st for st in active if st.idx < len(st.actions)]
            if active and not progressed:
                stuck = ", ".join(f"rank {st.rank} at {st.actions[st.idx]}" for st in active)
                raise LynxError(f"pipeline order deadlocks: {stuck}")
        return self._result(states)

    def _result(self, states: list[RankState]) -> SimResult:
        tails = [self._tail_ms(st.rank) for st in states]
        end = max((st.t + tail for st, (tail, _) in zip(states, tails)), default=0.0)
        ranks = []
        for st, (tail, static) in zip(states, tails):
            leftover = [k for w in st.pinned.values() for k in w]
            if leftover:
                raise LynxError(f"rank {st.rank}: {leftover[0]} is pinned to a window that "
                                f"never occurs before its backward")
            self._event(st, "compute", "DP sync + optimizer", "tail", st.t, tail)
            idle = st.idle_ms + (end - st.t - tail)
            ranks.append(RankStats(st.rank, st.compute_ms, st.comm_exposed_ms, idle,
                                   st.recompute_hidden_ms, st.recompute_exposed_ms, tail,
                                   st.peak, static))
        return SimResult(end, tuple(ranks), Details([st.timeline for st in states],
                                                         self.windows),
                         tuple(self.events), tuple(tuple(st.marks) for st in states))

def simulate(costs: CostTable, partition: tuple[int, ...], layers: tuple[LayerPolicy, ...],
             order: PipelineOrder, trace: bool = False,
             extra_backward_ms: tuple[float, ...] = ()) -> SimResult:
    """Simulate one step of `order` with per-layer `layers` policies over `partition`
    (`extra_backward_ms`: see `Simulator`)."""
    return Simulator(costs, partition, layers, order, trace,
                     extra_backward_ms=extra_backward_ms).run()
