"""`lynx-opt` (SPEC §5): one MILP over a steady-state period of every rank, timed exactly.

Every layer picks one keep/drop point per segment (or full recompute) and every recompute task
one window of its rank's period (`period.py`), or on demand; the choice is replicated to every
micro-batch. Memory is bounded at every allocation event of the period as the simulator counts
it (`milp.RankMilp`). Instead of summing exposed recompute per rank (which misses the pipeline's
slack), the objective is the step time itself: a max-plus timeline of every rank's actions in
which a window adds its overflow, a RECV wait hides recompute up to contention x the wait (the
wait being a variable: arrival - reach), and a send arrives p2p after the sender's comm stream
frees; for a replicated placement this is what the simulator computes. The objective is taken
above the keep-everything step time (a lower bound), so the MIP gap measures the recompute
overhead. The simulator then verifies (tightening ranks over budget), and the fastest fitting
plan among this one, lynx-heu's, checkmate's and full's is returned; when one of those already
runs as fast as keeping everything, the MILP is skipped (it cannot do better).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from lynxpipe.cost.memory import static_bytes
from lynxpipe.plan.checkmate import plan_checkmate
from lynxpipe.plan.finalize import base_order, make_plan
from lynxpipe.plan.heu import plan_lynx_heu
from lynxpipe.plan.milp import Lp, Placement, RankMilp
from lynxpipe.plan.options import LayerOption, layer_options
from lynxpipe.plan.partition import choose_partition
from lynxpipe.plan.period import Key, LayerData, Period, layer_data, make_period
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.simple import plan_full
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Action, Window
from lynxpipe.schedule.policy import FULL, KEEP_ALL
from lynxpipe.schedule.windows import BWD_COLL, RECV
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.result import SimResult

Expr = tuple[dict[int, float], float]
"""A linear expression: coefficients by variable, constant."""
TIE = 1e-6    # weight of recompute time: among equally fast plans, recompute least
MAX_TIGHTEN = 6


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
        self.ranks = [RankMilp(self.lp, data, p, req.model.num_layers, b).build()
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
                w = Window(RECV, a.mb, a.stage, recv=a.kind)
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
            w = (Window(BWD_COLL, j, period.stage, key[1], key[2]) if key[0] == "B"
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
    `windows=False` puts every task on demand: the step-time form of an exact checkmate, tested
    against exhaustive search beside `checkmate`'s own count model.

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


def _baselines(req: PlanRequest) -> list[tuple[str, Plan]]:
    return [("lynx-heu", plan_lynx_heu(req)), ("checkmate", plan_checkmate(req)),
            ("full", plan_full(req))]


def plan_lynx_opt(req: PlanRequest) -> Plan:
    """lynx-opt: the step-time MILP, verified by simulation; never slower than lynx-heu,
    checkmate or full on the same request (the fastest fitting of them is returned)."""
    start = time.perf_counter()
    partition = choose_partition(req, "lynx")
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
                   mip_gap=gap, notes=best.notes + (note,),
                   chosen_from=f"{best_name} ({best.chosen_from})" if best.chosen_from else best_name)
