"""The discrete-event simulator: one compute and one communication stream per pipeline rank.

TP ranks of a stage run identical programs, so one simulated rank stands for its TP group and
TP collectives are fixed-duration blocking steps. Ranks advance round-robin until each blocks on a
RECV whose SEND has not been simulated yet; no progress means deadlock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.plan.memory import rank_params, static_bytes
from lynxpipe.plan.policy import KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.sim.program import Program, Task, compile_program
from lynxpipe.sim.result import RankStats, SimResult, TraceEvent, WindowUse


@dataclass
class _Rank:
    """Mutable state of one simulated rank."""

    rank: int
    actions: tuple[Action, ...]
    idx: int = 0
    t: float = 0.0
    comm_free: float = 0.0
    mem: int = 0
    peak: int = 0
    stats: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    pinned: dict[Window, list[Action]] = field(default_factory=lambda: defaultdict(list))
    done: set[tuple[int, int, int]] = field(default_factory=set)
    timeline: list[tuple[float, int]] = field(default_factory=list)


class Simulator:
    """Simulates one training step of a plan; build once, `run()` once."""

    def __init__(self, costs: CostTable, partition: tuple[int, ...],
                 layers: tuple[LayerPolicy, ...], order: PipelineOrder, trace: bool = False):
        if len(partition) != order.num_stages:
            raise LynxError(f"partition has {len(partition)} stages, order has {order.num_stages}")
        if sum(partition) != len(layers):
            raise LynxError(f"partition covers {sum(partition)} layers, policy has {len(layers)}")
        self.costs, self.order, self.trace = costs, order, trace
        self.partition = partition
        self.stage_layers = stage_layers(partition)
        self.num_layers = len(layers)
        cache: dict[LayerPolicy, Program] = {}
        self.programs = [cache.setdefault(p, compile_program(costs.layer, p)) for p in layers]
        self.embed = compile_program(costs.embed, KEEP_ALL)
        self.head = compile_program(costs.head, KEEP_ALL)
        self.arrivals: dict[tuple[str, int, int], float] = {}
        self.events: list[TraceEvent] = []
        self.windows: list[WindowUse] = []

    # -- helpers -----------------------------------------------------------------------------
    def _units(self, stage: int) -> list[tuple[int, Program]]:
        """(layer id, program) of a virtual stage; embed is layer -1, head is layer L."""
        units = [(-1, self.embed)] if stage == 0 else []
        units += [(g, self.programs[g]) for g in self.stage_layers[stage]]
        if stage == self.order.num_stages - 1:
            units.append((self.num_layers, self.head))
        return units

    def _event(self, st: _Rank, stream: str, name: str, cat: str, start: float, dur: float) -> None:
        if self.trace and dur > 0:
            self.events.append(TraceEvent(st.rank, stream, name, cat, start, dur))

    def _alloc(self, st: _Rank, nbytes: int) -> None:
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

    def _window(self, st: _Rank, window: Window, wait_ms: float, label: str) -> None:
        """Idle for `wait_ms` on the compute stream, filled with the tasks pinned to `window`.

        Compute inside a window gets `contention` of it; what does not fit runs after it.
        """
        capacity = wait_ms * self.costs.contention
        used = 0.0
        for action in st.pinned.pop(window, []):
            key = (action.mb, action.layer, action.segment)
            if key in st.done:
                raise LynxError(f"rank {st.rank}: {action} recomputed twice")
            task = self._task(action)
            hidden = max(0.0, min(task.duration_ms, capacity - used))
            name = f"R mb{action.mb} L{action.layer} seg{action.segment}"
            self._event(st, "compute", name, "recompute_hidden", st.t + used, hidden)
            self._event(st, "compute", name, "recompute_exposed",
                        st.t + wait_ms + max(0.0, used - capacity), task.duration_ms - hidden)
            used += task.duration_ms
            st.stats["recompute_hidden_ms"] += hidden
            st.stats["recompute_exposed_ms"] += task.duration_ms - hidden
            st.done.add(key)
            self._alloc(st, task.alloc_bytes)
        self.windows.append(WindowUse(st.rank, window, st.t, wait_ms, used))
        idle = max(0.0, wait_ms - used / self.costs.contention)
        cat = "idle" if window.kind == "recv" else "tp_comm"
        self._event(st, "compute", label, cat, st.t + wait_ms - idle, idle)
        st.stats["idle_ms" if window.kind == "recv" else "comm_exposed_ms"] += idle
        st.t += wait_ms + max(0.0, used - capacity)

    def _on_demand(self, st: _Rank, mb: int, layer: int, segment: int) -> None:
        """Run a recompute right before the backward that needs it (exposed)."""
        key = (mb, layer, segment)
        if key in st.done:
            return
        task = self.programs[layer].tasks[segment]
        self._event(st, "compute", f"R mb{mb} L{layer} seg{segment}", "recompute_exposed",
                    st.t, task.duration_ms)
        st.t += task.duration_ms
        st.stats["recompute_exposed_ms"] += task.duration_ms
        st.done.add(key)
        self._alloc(st, task.alloc_bytes)

    # -- actions -----------------------------------------------------------------------------
    def _forward(self, st: _Rank, action: Action) -> None:
        start = st.t
        for layer, prog in self._units(action.stage):
            for step in prog.fwd:
                st.t += step.compute_ms
                st.stats["compute_ms"] += step.compute_ms
                self._alloc(st, step.alloc_bytes)
                if step.coll_ms >= 0:
                    window = Window("fwd_coll", action.mb, action.stage, layer, step.step)
                    self._window(st, window, step.coll_ms, f"TP L{layer}")
        self._event(st, "compute", f"F{action.mb} s{action.stage}", "forward", start, st.t - start)

    def _backward(self, st: _Rank, action: Action) -> None:
        start = st.t
        for layer, prog in reversed(self._units(action.stage)):
            for step in prog.bwd:
                for seg in step.needs:
                    self._on_demand(st, action.mb, layer, seg)
                st.t += step.compute_ms
                st.stats["compute_ms"] += step.compute_ms
                if step.coll_ms >= 0:
                    st.t += step.overlap_ms
                    st.stats["compute_ms"] += step.overlap_ms
                    window = Window("bwd_coll", action.mb, action.stage, layer, step.step)
                    self._window(st, window, max(0.0, step.coll_ms - step.overlap_ms),
                                 f"TP L{layer}")
                self._alloc(st, -step.free_bytes)
        if action.stage < self.order.num_stages - 1:
            self._alloc(st, -self.costs.grad_buffer_bytes)
        self._event(st, "compute", f"B{action.mb} s{action.stage}", "backward", start, st.t - start)

    def _send(self, st: _Rank, action: Action) -> None:
        direction, dest = ("F", action.stage + 1) if action.kind == "SEND_F" else ("B", action.stage - 1)
        begin = max(st.t, st.comm_free)
        st.comm_free = begin + self.costs.p2p_ms
        self.arrivals[(direction, action.mb, dest)] = st.comm_free
        self._event(st, "comm", f"{action.kind} mb{action.mb}", "p2p", begin, self.costs.p2p_ms)

    def _step(self, st: _Rank, action: Action) -> bool:
        """Execute one action; False when it is a RECV whose data is not yet known."""
        if action.kind in ("RECV_F", "RECV_B"):
            key = (action.kind[-1], action.mb, action.stage)
            if key not in self.arrivals:
                return False
            if action.kind == "RECV_B":  # the gradient lands in a buffer held through B
                self._alloc(st, self.costs.grad_buffer_bytes)
            window = Window("recv", action.mb, action.stage, recv=action.kind)
            self._window(st, window, max(0.0, self.arrivals[key] - st.t),
                         f"wait {action.kind} mb{action.mb}")
        elif action.kind in ("SEND_F", "SEND_B"):
            self._send(st, action)
        elif action.kind == "F":
            self._forward(st, action)
        elif action.kind == "B":
            self._backward(st, action)
        elif action.kind == "R":
            if action.window is None or action.window.kind == "on_demand":
                pass  # runs at its backward; the simulator inserts it there in any case
            else:
                st.pinned[action.window].append(action)
        return True

    def _tail_ms(self, rank: int) -> tuple[float, int]:
        """DP gradient all-reduce + optimizer time, and static bytes, of a rank."""
        c = self.costs
        params = rank_params(c, self.partition, self.order.pp, rank)
        dp = c.dp_alpha_ms + c.dp_ms_per_byte * 2 * params if c.dp_ms_per_byte else 0.0
        return (dp + c.optimizer_ms_per_param * params,
                static_bytes(c, self.partition, self.order.pp, rank))

    def run(self) -> SimResult:
        """Simulate the whole step."""
        states = [_Rank(r, acts) for r, acts in enumerate(self.order.ranks)]
        active = list(states)
        while active:
            progressed = False
            for st in active:
                while st.idx < len(st.actions) and self._step(st, st.actions[st.idx]):
                    st.idx += 1
                    progressed = True
            active = [st for st in active if st.idx < len(st.actions)]
            if active and not progressed:
                stuck = ", ".join(f"rank {st.rank} at {st.actions[st.idx]}" for st in active)
                raise LynxError(f"pipeline order deadlocks: {stuck}")
        return self._result(states)

    def _result(self, states: list[_Rank]) -> SimResult:
        tails = [self._tail_ms(st.rank) for st in states]
        end = max((st.t + tail for st, (tail, _) in zip(states, tails)), default=0.0)
        ranks = []
        for st, (tail, static) in zip(states, tails):
            leftover = [k for w in st.pinned.values() for k in w]
            if leftover:
                raise LynxError(f"rank {st.rank}: {leftover[0]} is pinned to a window that "
                                f"never occurs before its backward")
            self._event(st, "compute", "DP sync + optimizer", "tail", st.t, tail)
            idle = st.stats["idle_ms"] + (end - st.t - tail)
            ranks.append(RankStats(st.rank, st.stats["compute_ms"], st.stats["comm_exposed_ms"],
                                   idle, st.stats["recompute_hidden_ms"],
                                   st.stats["recompute_exposed_ms"], tail, st.peak, static))
        timeline = tuple(tuple(st.timeline) for st in states)
        return SimResult(end, tuple(ranks), timeline, tuple(self.events), tuple(self.windows))


def simulate(costs: CostTable, partition: tuple[int, ...], layers: tuple[LayerPolicy, ...],
             order: PipelineOrder, trace: bool = False) -> SimResult:
    """Simulate one step of `order` with per-layer `layers` policies over `partition`."""
    return Simulator(costs, partition, layers, order, trace).run()
