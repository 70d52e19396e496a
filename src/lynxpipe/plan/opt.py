"""`lynx-opt` (SPEC §5): one MILP over a steady-state period of every rank, timed exactly.

The period of a representative micro-batch j on a rank is what the rank runs after its previous
backward up to and including B(j) (1F1B, w = pp - r - 1: F(j + w) with its RECV/SEND, the
RECV_B wait of j, then B(j)). Every layer picks one keep/drop point per segment (or full
recompute) and every recompute task one window of that period, or on demand; the choice is
replicated to every micro-batch (in warm-up/cool-down a missing window falls back to the RECV_B
wait of the task's backward, else on demand). Memory is bounded at every allocation event of the
period as the simulator counts it. Instead of summing exposed recompute per rank (which misses
the pipeline's slack), the objective is the step time itself: a max-plus timeline of every
rank's actions in which a window adds its overflow, a RECV wait hides recompute up to
contention x the wait (the wait being a variable: arrival - reach), and a send arrives p2p after
the sender's comm stream frees; for a replicated placement this is what the simulator computes.
The objective is taken above the keep-everything step time (a lower bound), so the MIP gap
measures the recompute overhead. The simulator then verifies (tightening ranks over budget), and
the fastest fitting plan among this one, lynx-heu's, checkmate's and full's is returned; when one
of those already runs as fast as keeping everything, the MILP is skipped (it cannot do better).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from lynxpipe.plan.checkmate import plan_checkmate
from lynxpipe.plan.finalize import base_order, make_plan
from lynxpipe.plan.memory import static_bytes
from lynxpipe.plan.options import LayerOption, layer_options, option_for
from lynxpipe.plan.policy import FULL, KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.simple import default_partition, plan_full
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Action, Window
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.program import FULL_SEGMENT, compile_program
from lynxpipe.sim.result import SimResult

Key = tuple
"""A window of the period: ("F", mb offset, unit, fwd step) | (RECV kind, mb offset) |
("B", unit, bwd step); unit = global layer, -1 embedding, num_layers head."""
Expr = tuple[dict[int, float], float]
"""A linear expression: coefficients by variable, constant."""
F_REACH = 1   # forward windows of layers within this distance (all are alike for memory)
B_REACH = 2   # backward windows of up to this many layers above (longer = held across more)
TIE = 1e-6    # weight of recompute time: among equally fast plans, recompute least
MAX_TIGHTEN = 6
NEVER = 1 << 30


@dataclass(frozen=True)
class Point:
    """One keep/drop choice of a segment (or full recompute, segment -1)."""

    dropped: frozenset[str]
    ms: float
    regen: int
    kept: int
    need: int  # backward step of the layer before which the task must have run


@dataclass(frozen=True)
class LayerData:
    """The choices of one (repeated) layer and its backward memory profile."""

    points: dict[int, tuple[Point, ...]]
    full: Point | None
    pinned: int               # non-droppable bytes
    saved: int                # bytes of a layer that keeps everything
    freed: tuple[int, ...]    # freed[k]: bytes released by backward steps before step k
    options: tuple[dict[int, int], ...] | None  # allowed point per segment, if not a product


def _need(cost, policy: LayerPolicy, seg: int) -> int:
    """Step whose `needs` list the segment, exactly as the simulator's program does."""
    return next(s.step for s in compile_program(cost, policy).bwd if seg in s.needs)


def layer_data(cost, options: list[LayerOption]) -> LayerData:
    """Per-segment points of `options` (Pareto per segment when they come from layer_options)."""
    graph = cost.graph
    seg_of = {t.name: t.segment for t in graph.droppable()}
    size = {t.name: t.size_bytes for t in graph.tensors}
    sets: dict[int, set[frozenset[str]]] = {s: set() for s in set(seg_of.values())}
    partial = [o.policy.dropped for o in options if not o.policy.full]
    for dropped in partial:
        for s, found in sets.items():
            found.add(frozenset(n for n in dropped if seg_of[n] == s))
    points = {}
    for s, found in sets.items():
        total = sum(size[n] for n in seg_of if seg_of[n] == s)
        points[s] = tuple(Point(d, cost.recompute_ms(d, s), sum(size[n] for n in d),
                                total - sum(size[n] for n in d),
                                _need(cost, LayerPolicy(d), s) if d else NEVER)
                          for d in sorted(found, key=lambda d: (len(d), sorted(d))))
    full = None
    if any(o.policy.full for o in options):
        fo = option_for(cost, FULL)
        full = Point(frozenset(), fo.seg_ms[-1], fo.seg_bytes[-1], fo.kept_bytes,
                     _need(cost, FULL, FULL_SEGMENT))
    acc = [0]
    for step in compile_program(cost, KEEP_ALL).bwd:
        acc.append(acc[-1] + step.free_bytes)
    allowed = None
    if len(partial) != int(np.prod([len(p) for p in points.values()])):
        index = {s: {pt.dropped: i for i, pt in enumerate(pts)} for s, pts in points.items()}
        allowed = tuple({s: index[s][frozenset(n for n in d if seg_of[n] == s)] for s in points}
                        for d in partial)
    return LayerData(points, full, graph.saved_bytes(frozenset()), graph.saved_bytes(),
                     tuple(acc), allowed)


@dataclass(frozen=True)
class Period:
    """The representative period of one rank and how it maps onto every micro-batch."""

    stage: int
    layers: tuple[int, ...]
    inflight: int                 # micro-batches held at B (each period is bounded with it)
    pre: tuple[Key, ...]          # windows before B(j) (their tensors are held at the peak)
    bwd: dict[Key, float]         # windows inside B(j) -> capacity (contention applied)
    fwd_cap: dict[tuple[int, int], float]  # (unit, fwd step) -> capacity
    order: dict[int, int]         # unit -> position in the backward walk (head first)
    hosts: dict[int, dict[Key, Window | None]]  # per micro-batch: where each pre window runs
    extras: tuple[int, int]       # embedding and head saved bytes per micro-batch
    buffer: int                   # gradient receive buffer, held from RECV_B(j) through B(j)
    head_freed: tuple[int, ...]
    base_ms: tuple[float, float]  # forward and backward of the stage without recompute


def _units(req: PlanRequest, partition: tuple[int, ...], stage: int) -> list:
    c, num = req.costs, req.model.num_layers
    units = [(-1, compile_program(c.embed, KEEP_ALL))] if stage == 0 else []
    layer = compile_program(c.layer, KEEP_ALL)
    units += [(g, layer) for g in stage_layers(partition)[stage]]
    if stage == len(partition) - 1:
        units.append((num, compile_program(c.head, KEEP_ALL)))
    return units


def _spans(actions: tuple[Action, ...]) -> dict[int, tuple[int, int]]:
    """Per micro-batch j: (lo, b) with the period's pre-region actions[lo+1:b], b = B(j)."""
    spans, f_at, last_b = {}, {}, -1
    for i, a in enumerate(actions):
        if a.kind == "F":
            f_at[a.mb] = i
        elif a.kind == "B":
            spans[a.mb] = (max(last_b, f_at[a.mb]), i)
            last_b = i
    return spans


def _pre_keys(actions, span, j, fwd_caps) -> list[Key]:
    keys: list[Key] = []
    for a in actions[span[0] + 1:span[1]]:
        if a.kind == "F":
            keys += [("F", a.mb - j, u, s) for (u, s) in fwd_caps]
        elif a.kind in ("RECV_F", "RECV_B"):
            keys.append((a.kind, a.mb - j))
    return keys


def _resolve(key: Key, j: int, index: dict, span, stage: int) -> Window | None:
    idx = index.get((key[0], j + key[1], stage))
    if idx is None or not span[0] < idx < span[1]:
        return None
    if key[0] == "F":
        return Window("fwd_coll", j + key[1], stage, key[2], key[3])
    return Window("recv", j + key[1], stage, recv=key[0])


def make_period(req: PlanRequest, partition: tuple[int, ...], rank: int,
                windows: bool = True) -> Period:
    """The period of `rank` (one stage per rank); without `windows` all recompute is on demand
    (then the MILP is an exact checkmate: least step time, memory as the simulator counts)."""
    c, actions = req.costs.contention, base_order(req).ranks[rank]
    units = _units(req, partition, rank)
    fwd_cap = {(u, s.step): s.coll_ms * c for u, p in units for s in p.fwd if s.coll_ms >= 0}
    bwd = {("B", u, s.step): max(0.0, s.coll_ms - s.overlap_ms) * c
           for u, p in reversed(units) for s in p.bwd if s.coll_ms >= 0}
    spans, index = _spans(actions), {(a.kind, a.mb, a.stage): i for i, a in enumerate(actions)}
    held, live = [], 0
    for a in actions:
        held.append(live)
        live += (a.kind == "F") - (a.kind == "B")

    def shape(j: int) -> tuple:
        return tuple((a.kind, a.mb - j) for a in actions[spans[j][0] + 1:spans[j][1]])

    # the steady state is the most common shape of the pre-region (1F1B: RECV_F, F(j + w),
    # SEND_F, RECV_B(j)); warm-up and cool-down are mapped onto it
    count: dict[tuple, int] = defaultdict(int)
    for j in spans:
        count[shape(j)] += 1
    top = max(count, key=lambda sh: (count[sh], len(sh)))
    steady = [j for j in sorted(spans) if shape(j) == top]
    rep = steady[len(steady) // 2]
    pre = [k for k in _pre_keys(actions, spans[rep], rep, fwd_cap)
           if windows and (k[0] != "F" or fwd_cap[k[2:]] > 0)]
    hosts = {j: {k: _resolve(k, j, index, span, rank)
                 or _resolve(("RECV_B", 0), j, index, span, rank) for k in pre}
             for j, span in spans.items()}
    head = compile_program(req.costs.head, KEEP_ALL)
    base = (sum(s.compute_ms + max(s.coll_ms, 0.0) for _, p in units for s in p.fwd),
            sum(s.compute_ms + (s.overlap_ms + max(0.0, s.coll_ms - s.overlap_ms)
                                if s.coll_ms >= 0 else 0.0) for _, p in units for s in p.bwd))
    # copies held at B: the most of any micro-batch (1F1B: w + 1; GPipe: m at B(0))
    return Period(rank, tuple(stage_layers(partition)[rank]),
                  max(held[b] for _, b in spans.values()),
                  tuple(pre), {k: v for k, v in bwd.items() if v > 0 and windows}, fwd_cap,
                  {u: i for i, (u, _) in enumerate(reversed(units))}, hosts,
                  (req.costs.embed.graph.saved_bytes() if rank == 0 else 0,
                   head.kept_bytes if rank == len(partition) - 1 else 0),
                  req.costs.grad_buffer_bytes if rank < len(partition) - 1 else 0,
                  tuple(np.cumsum([0] + [s.free_bytes for s in head.bwd]).tolist()), base)


class Lp:
    """A small sparse MILP builder on scipy.optimize.milp (HiGHS)."""

    def __init__(self) -> None:
        self.c: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.entries: list[tuple[int, int, float]] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def var(self, ub: float = 1.0, integer: bool = True, cost: float = 0.0) -> int:
        self.c.append(cost)
        self.ub.append(ub)
        self.integer.append(int(integer))
        return len(self.c) - 1

    def row(self, terms: dict[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        r = len(self.lo)
        self.entries += [(r, v, a) for v, a in terms.items() if a]
        self.lo.append(lo)
        self.hi.append(hi)

    def solve(self, time_limit: float) -> tuple[np.ndarray, float] | None:
        """Solution and the absolute gap to HiGHS's dual bound; None when infeasible."""
        rows, cols, vals = zip(*self.entries)
        a = coo_matrix((vals, (rows, cols)), shape=(len(self.lo), len(self.c))).tocsr()
        res = milp(np.array(self.c), constraints=LinearConstraint(a, self.lo, self.hi),
                   integrality=np.array(self.integer), bounds=Bounds(0.0, np.array(self.ub)),
                   options={"time_limit": time_limit, "disp": False})
        if res.x is None:
            return None
        bound = getattr(res, "mip_dual_bound", None)
        return res.x, max(0.0, res.fun - bound) if bound is not None and np.isfinite(bound) \
            else 0.0


Placement = dict[tuple[int, int], Key | None]
"""(layer, segment) -> window of the period (None: on demand)."""


class RankMilp:
    """The decisions and memory rows of one rank's period, inside a shared `Lp`.

    Variables: y[layer, segment, point] (the keep/drop point; u = full recompute) and, per
    point, x[.., window] (the task runs there if that point is chosen; None = on demand):
    per-point placement binaries keep durations and bytes linear without big-M.
    """

    def __init__(self, lp: Lp, data: LayerData, period: Period, num_layers: int,
                 budget: int) -> None:
        self.lp, self.data, self.p, self.num_layers, self.budget = lp, data, period, \
            num_layers, budget
        self.scale = float(max(1, period.inflight * (len(period.layers) * data.saved
                                                     + sum(period.extras))))
        self.y: dict[tuple[int, int], list[int]] = {}
        self.u: dict[int, int] = {}
        # (layer, seg) -> [(point, {window or None: x var})] for every point that recomputes
        self.x: dict[tuple[int, int], list[tuple[Point, dict[Key | None, int]]]] = {}
        self.tie: dict[int, float] = {}
        for layer in period.layers:
            self._choices(layer)
            for seg in self._segments():
                self._placements(layer, seg)
        self._memory()

    def load(self, keys: list[Key | None]) -> list[list[tuple[int, float]]]:
        """Per task, its (x var, duration) pairs in any of `keys` (one list per task)."""
        out = []
        for choices in self.x.values():
            task = [(xs[k], pt.ms) for pt, xs in choices for k in keys if k in xs]
            if task:
                out.append(task)
        return out

    def _segments(self) -> list[int]:
        return list(self.data.points) + ([FULL_SEGMENT] if self.data.full else [])

    def _pts(self, layer: int, seg: int) -> list[tuple[int, Point]]:
        if seg == FULL_SEGMENT:
            return [(self.u[layer], self.data.full)]
        return list(zip(self.y[(layer, seg)], self.data.points[seg]))

    def _choices(self, layer: int) -> None:
        lp, data = self.lp, self.data
        if data.full:
            self.u[layer] = lp.var()
            self.tie[self.u[layer]] = data.full.ms
        for seg, pts in data.points.items():
            self.y[(layer, seg)] = [lp.var() for _ in pts]
            self.tie.update(zip(self.y[(layer, seg)], (pt.ms for pt in pts)))
            lp.row({**{v: 1.0 for v in self.y[(layer, seg)]},
                    **({self.u[layer]: 1.0} if data.full else {})}, 1.0, 1.0)
        if data.options is None:
            return
        z = [lp.var() for _ in data.options]
        lp.row({**{v: 1.0 for v in z}, **({self.u[layer]: 1.0} if data.full else {})}, 1.0, 1.0)
        for seg in data.points:
            for i, v in enumerate(self.y[(layer, seg)]):
                lp.row({v: 1.0, **{zv: -1.0 for zv, o in zip(z, data.options) if o[seg] == i}},
                       0.0, 0.0)

    def _eligible(self, layer: int, need: int) -> list[Key]:
        near = [k for k in self.p.pre if k[0] != "F" or not 0 <= k[2] < self.num_layers
                or abs(k[2] - layer) <= F_REACH]
        return near + [k for k in self.p.bwd if (k[1] == layer and k[2] < need)
                       or layer < k[1] <= layer + B_REACH]

    def _placements(self, layer: int, seg: int) -> None:
        out = []
        for v, pt in self._pts(layer, seg):
            if pt.regen or pt.ms:
                xs = {k: self.lp.var() for k in self._eligible(layer, pt.need) + [None]}
                self.lp.row({**{x: 1.0 for x in xs.values()}, v: -1.0}, 0.0, 0.0)
                out.append((pt, xs))
        self.x[(layer, seg)] = out

    def _kept(self, layer: int, mult: float, terms: dict[int, float]) -> float:
        """Add `mult` x the layer's kept bytes (scaled) to `terms`; return the constant part."""
        data = self.data
        for seg, pts in data.points.items():
            for v, pt in zip(self.y[(layer, seg)], pts):
                terms[v] += mult * pt.kept / self.scale
        if data.full:
            terms[self.u[layer]] += mult * (data.full.kept - data.pinned) / self.scale
        return mult * data.pinned

    def _bound(self, mult: dict[int, float], live: set[int], pos: tuple[int, int, int],
               const: float, own: tuple[int, int] | None) -> None:
        """Memory at one event <= budget: kept of every held copy, tensors of the period's
        micro-batch regenerated so far whose layer is not yet backwarded (`live`), and the
        on-demand ones of the layer at `own` = (layer, step)."""
        terms: dict[int, float] = defaultdict(float)
        for layer, m in mult.items():
            const += self._kept(layer, m, terms)
        for (layer, _), choices in self.x.items():
            if layer not in live:
                continue
            for pt, xs in choices:
                for k, x in xs.items():
                    if k is None:
                        due = own is not None and own[0] == layer and pt.need <= own[1]
                    else:
                        due = k[0] != "B" or (self.p.order[k[1]], k[2], 1) <= pos
                    if due:
                        terms[x] += pt.regen / self.scale
        # a hair below the budget: HiGHS may overshoot a row by its feasibility tolerance
        self.lp.row(terms, hi=(self.budget - const) / self.scale - 1e-6)

    def _memory(self) -> None:
        p, n = self.p, self.p.inflight
        every, extras = set(p.layers), sum(p.extras)
        self._bound({g: n for g in every}, every, (-1, 0, 0), n * extras + p.buffer, None)
        steps: dict[int, set[int]] = defaultdict(set)
        for _, unit, k in p.bwd:
            steps[unit].add(k)
        for unit, idx in p.order.items():
            base = (n - 1) * extras + p.extras[0] + p.buffer
            if unit == self.num_layers:
                for k in sorted(steps[unit]):
                    self._bound({g: n for g in every}, every, (idx, k, 1),
                                base + p.extras[1] - p.head_freed[k], None)
            elif unit >= 0:
                held = {g: n - 1 + (g <= unit) for g in every}
                below = {g for g in every if g <= unit}
                for k, phase in self._events(unit, steps[unit]):
                    self._bound(held, below, (idx, k, phase), base - self.data.freed[k],
                                (unit, k))

    def _events(self, layer: int, windows: set[int]) -> list[tuple[int, int]]:
        """(step, 0) before a step some task may need; (step, 1) at a backward window."""
        needs = {pt.need for seg in self._segments() for _, pt in self._pts(layer, seg)
                 if pt.regen and pt.need < NEVER}
        return sorted([(k, 0) for k in needs] + [(k, 1) for k in windows])

    def extract(self, x: np.ndarray) -> tuple[dict[int, LayerPolicy], Placement]:
        """Policies of the rank's layers and the window of each task."""
        policies: dict[int, LayerPolicy] = {}
        placement: Placement = {}
        for layer in self.p.layers:
            full = self.data.full is not None and x[self.u[layer]] > 0.5
            dropped: set[str] = set()
            for seg in ([FULL_SEGMENT] if full else list(self.data.points)):
                for pt, xs in self.x.get((layer, seg), []):
                    chosen = [k for k, v in xs.items() if x[v] > 0.5]
                    if chosen:
                        dropped |= pt.dropped
                        placement[(layer, seg)] = chosen[0]
            policies[layer] = FULL if full else LayerPolicy(frozenset(dropped))
        return policies, placement


def _plus(*exprs: Expr, scale: float = 1.0) -> Expr:
    terms: dict[int, float] = defaultdict(float)
    for t, _ in exprs:
        for v, a in t.items():
            terms[v] += scale * a
    return terms, scale * sum(c for _, c in exprs)


class StepMilp:
    """Every rank's period model plus a max-plus timeline of the whole step (the objective)."""

    def __init__(self, req: PlanRequest, partition: tuple[int, ...], data: LayerData,
                 budgets: list[int], keep: SimResult, windows: bool = True) -> None:
        self.req, self.lp = req, Lp()
        self.periods = [make_period(req, partition, r, windows) for r in range(req.parallel.pp)]
        self.ranks = [RankMilp(self.lp, data, p, req.model.num_layers, b)
                      for p, b in zip(self.periods, budgets)]
        # objective: step time above the keep-everything step (a lower bound), so that the
        # relative MIP gap measures the recompute overhead, not the whole step
        self.span = self.lp.var(np.inf, False, 1.0)
        self.floor = floor = keep.step_time_ms * (1 - 1e-9)
        self.shared: dict[tuple, int] = {}
        arrivals: dict[tuple[str, int, int], int] = {}
        for r, actions in enumerate(base_order(req).ranks):
            self._at_least(({self.span: 1.0}, floor), self._rank(r, actions, arrivals),
                           keep.ranks[r].tail_ms)
        for model in self.ranks:
            for v, ms in model.tie.items():
                self.lp.c[v] += TIE * len(model.p.hosts) * ms

    def _at_least(self, big: Expr, small: Expr, gap: float = 0.0) -> None:
        """big >= small + gap."""
        diff: dict[int, float] = defaultdict(float, big[0])
        for v, a in small[0].items():
            diff[v] -= a
        self.lp.row(diff, lo=small[1] + gap - big[1])

    def _overflow(self, model: RankMilp, keys: tuple[Key, ...], cap: float) -> Expr:
        """Overflow of a window hosting `keys` (one variable per distinct load and capacity)."""
        tasks = model.load(list(keys))
        if not tasks:
            return {}, 0.0
        key = (id(model), keys, cap)
        if key not in self.shared:
            e = self.shared[key] = self.lp.var(np.inf, False)
            self.lp.row({**{x: ms for t in tasks for x, ms in t}, e: -1.0}, hi=cap)
            for t in tasks:  # a task alone overflows what it exceeds (tightens the LP)
                if any(ms > cap for _, ms in t):
                    self.lp.row({**{x: ms - cap for x, ms in t if ms > cap}, e: -1.0}, hi=0.0)
        return {self.shared[key]: 1.0}, 0.0

    def _hosted(self, r: int, a: Action) -> dict[Window, list[Key]]:
        """Pre windows of micro-batches whose placement lands in action `a`'s windows."""
        out: dict[Window, list[Key]] = defaultdict(list)
        for hosts in self.periods[r].hosts.values():
            for k, w in hosts.items():
                if w is not None and w.mb == a.mb and (w.recv or "F") == a.kind:
                    out[w].append(k)
        return out

    def _compute(self, r: int, a: Action) -> Expr:
        """Duration of F(i) or B(j): base + window overflow (+ on-demand recompute in B)."""
        model, p = self.ranks[r], self.periods[r]
        if a.kind == "F":
            parts = [self._overflow(model, tuple(keys), p.fwd_cap[(w.layer, w.step)])
                     for w, keys in self._hosted(r, a).items()]
            return _plus(({}, p.base_ms[0]), *parts)
        parts = [self._overflow(model, (k,), cap) for k, cap in p.bwd.items()]
        missing = [k for k, w in p.hosts.get(a.mb, {}).items() if w is None] + [None]
        demand = {x: ms for t in model.load(missing) for x, ms in t}
        return _plus(({}, p.base_ms[1]), (demand, 0.0), *parts)

    def _rank(self, r: int, actions: tuple[Action, ...], arrivals: dict) -> Expr:
        """Chain the rank's actions; returns the expression of its end time."""
        lp, c = self.lp, self.req.costs.contention
        now: Expr = ({}, 0.0)
        comm: Expr = ({}, 0.0)
        for a in actions:
            if a.kind in ("F", "B"):
                now = _plus(now, self._compute(r, a))
            elif a.kind in ("SEND_F", "SEND_B"):
                begin = lp.var(np.inf, False)
                self._at_least(({begin: 1.0}, 0.0), now)
                self._at_least(({begin: 1.0}, 0.0), comm)
                comm = ({begin: 1.0}, self.req.costs.p2p_ms)
                dest = a.stage + 1 if a.kind == "SEND_F" else a.stage - 1
                arrive = arrivals.setdefault((a.kind[-1], a.mb, dest), lp.var(np.inf, False))
                self._at_least(({arrive: 1.0}, 0.0), comm)
            elif a.kind in ("RECV_F", "RECV_B"):
                arrive = arrivals.setdefault((a.kind[-1], a.mb, a.stage), lp.var(np.inf, False))
                w = Window("recv", a.mb, a.stage, recv=a.kind)
                used = {x: ms for t in self.ranks[r].load(self._hosted(r, a).get(w, []))
                        for x, ms in t}
                done = lp.var(np.inf, False)
                # wait = max(0, arrive - now); compute beyond contention x wait delays the rank
                self._at_least(({done: 1.0}, 0.0), _plus(now, (used, 0.0)))
                self._at_least(({done: 1.0}, 0.0), ({arrive: 1.0}, 0.0))
                self._at_least(({done: 1.0}, 0.0), _plus((used, 0.0), ({arrive: 1 - c}, 0.0),
                                                         _plus(now, scale=c)))
                now = ({done: 1.0}, 0.0)
        return now

    def solve(self, time_limit: float) -> tuple[list, float] | None:
        """Per rank (policies, placement), and the MIP gap relative to the step time (the
        planned step is within it of the best this model can reach); None: nothing fits."""
        out = self.lp.solve(time_limit)
        if out is None:
            return None
        x, gap = out
        step = self.floor + float(np.dot(self.lp.c, x))
        return [model.extract(x) for model in self.ranks], gap / step


def translate(period: Period, placement: Placement) -> dict[TaskKey, Window]:
    """The period's placement applied to every micro-batch (missing hosts: on demand)."""
    out: dict[TaskKey, Window] = {}
    for j, hosts in period.hosts.items():
        for (layer, seg), key in placement.items():
            if key is None:
                continue
            w = (Window("bwd_coll", j, period.stage, key[1], key[2]) if key[0] == "B"
                 else hosts[key])
            if w is not None:
                out[(j, layer, seg)] = w
    return out


def _better(a: Plan, b: Plan | None) -> bool:
    if b is None:
        return True
    pa, pb = a.predicted, b.predicted
    if pa.fits_budget != pb.fits_budget:
        return pa.fits_budget
    if not pa.fits_budget:
        return max(pa.peak_memory_bytes) < max(pb.peak_memory_bytes)
    return pa.step_time_ms < pb.step_time_ms * (1 - 1e-12)


def solve_lynx_opt(req: PlanRequest, partition: tuple[int, ...],
                   options: list[LayerOption] | None = None, windows: bool = True,
                   name: str = "lynx-opt") -> tuple[Plan, SimResult]:
    """The MILP plan alone (no competing candidates), on a given partition (v = 1 only);
    `windows=False` puts every task on demand (an exact checkmate).

    The memory rows follow the simulator's accounting, so the loop that shrinks the budget of
    a rank the simulator finds over it (checkmate's pattern) rarely runs twice.
    """
    start = time.perf_counter()
    data = layer_data(req.costs.layer, options or layer_options(req.costs.layer))
    order = base_order(req)
    keep = simulate(req.costs, partition, (KEEP_ALL,) * req.model.num_layers, order)
    budgets = [req.budget_bytes - req.reserve_bytes
               - static_bytes(req.costs, partition, req.parallel.pp, r)
               for r in range(req.parallel.pp)]
    margins = [0] * len(budgets)
    best: tuple[Plan, SimResult] | None = None
    for _ in range(MAX_TIGHTEN):
        model = StepMilp(req, partition, data, [b - m for b, m in zip(budgets, margins)], keep,
                         windows)
        out = model.solve(max(1.0, req.time_limit_s - (time.perf_counter() - start)))
        if out is None:
            policies = [({g: FULL for g in p.layers}, {}) for p in model.periods]
            gap = 0.0
        else:
            policies, gap = out
        layers = {g: pol for chosen, _ in policies for g, pol in chosen.items()}
        placement = {k: w for p, (_, pl) in zip(model.periods, policies)
                     for k, w in translate(p, pl).items()}
        plan, sim = make_plan(req, name, partition,
                              tuple(layers[g] for g in range(req.model.num_layers)), placement,
                              1e3 * (time.perf_counter() - start), gap,
                              ("step-time MILP over one period per rank",))
        over = [peak - req.budget_bytes for peak in plan.predicted.peak_memory_bytes]
        if _better(plan, best[0] if best else None):
            best = (plan, sim)
        if out is None or all(o <= 0 for o in over) or \
                time.perf_counter() - start > req.time_limit_s:
            break
        margins = [m + max(o, 0) for m, o in zip(margins, over)]
    assert best is not None
    return best


def _partition(req: PlanRequest) -> tuple[int, ...]:
    if req.partition == "uniform":
        return default_partition(req)
    try:
        from lynxpipe.plan.partition import balanced_partition
    except ImportError:
        return default_partition(req)
    return balanced_partition(req, "lynx")


def _baselines(req: PlanRequest) -> list[tuple[str, Plan]]:
    found = [("checkmate", plan_checkmate(req)), ("full", plan_full(req))]
    try:
        from lynxpipe.plan.heu import plan_lynx_heu
    except ImportError:
        return found
    return [("lynx-heu", plan_lynx_heu(req))] + found


def plan_lynx_opt(req: PlanRequest) -> Plan:
    """lynx-opt: the step-time MILP, verified by simulation; never slower than lynx-heu,
    checkmate or full on the same request (the fastest fitting of them is returned)."""
    start = time.perf_counter()
    partition = _partition(req)
    found = _baselines(req)
    floor = simulate(req.costs, partition, (KEEP_ALL,) * req.model.num_layers,
                     base_order(req)).step_time_ms
    gap, skip = None, ""
    if any(p.predicted.fits_budget and p.predicted.step_time_ms <= floor * (1 + 1e-9)
           for _, p in found):  # nothing beats the step without any recompute
        gap, skip = 0.0, "; MILP skipped: a candidate already runs as fast as keeping everything"
    elif req.parallel.virtual_stages == 1:
        plan, _ = solve_lynx_opt(req, partition)
        found.insert(0, ("MILP", plan))
        gap = plan.mip_gap
    else:
        skip = " (the period MILP models one stage per rank; interleaved uses the candidates)"
    best_name, best = found[0]
    for name, plan in found[1:]:
        if _better(plan, best):
            best_name, best = name, plan
    times = ", ".join(f"{n} {p.predicted.step_time_ms:.3f} ms"
                      + ("" if p.predicted.fits_budget else " (over budget)") for n, p in found)
    note = f"lynx-opt candidates: {times}; kept the {best_name} plan{skip}"
    return replace(best, policy="lynx-opt", planner_ms=1e3 * (time.perf_counter() - start),
                   mip_gap=gap, notes=best.notes + (note,))
