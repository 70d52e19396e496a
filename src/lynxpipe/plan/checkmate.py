"""`checkmate`: optimal keep/drop under the budget minimising total recompute time, all on demand
(a Checkmate-style MILP on our layer model, solved per pipeline rank with HiGHS).

With every task on demand each backward of a rank grows by the same recompute time, and the step
is monotone in every action's duration, so least recompute per rank is least step time; the
memory rows are the simulator's own event accounting in count form (`ondemand.py`), so the plan
is exact, not a bound (tested against exhaustive search). Interleaved schedules (several stages per rank) fall back to a count knapsack with
a conservative memory bound, corrected by simulation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from lynxpipe.plan.finalize import base_order, make_plan
from lynxpipe.plan.knapsack import choose_counts
from lynxpipe.cost.memory import RankBudget, rank_budgets
from lynxpipe.plan.ondemand import count_options, solve_counts
from lynxpipe.plan.options import LayerOption, layer_options, pareto
from lynxpipe.plan.period import make_period
from lynxpipe.schedule.policy import FULL, LayerPolicy
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.simple import default_partition
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Window
from lynxpipe.sim.result import SimResult

MAX_TIGHTEN = 8

Solver = Callable[[RankBudget, int], tuple[dict[int, LayerPolicy], float]]
"""(rank budget, extra margin bytes) -> (policy per layer of the rank, MIP gap)."""
Placer = Callable[[tuple[LayerPolicy, ...]], dict[TaskKey, Window]]
"""Policies of all layers -> window of every recompute task that is not on demand."""


def assign(layers: tuple[int, ...], counts: tuple[int, ...],
           options: list[LayerOption]) -> dict[int, LayerPolicy]:
    """Give the lowest layers the options that keep least (their tensors live longest)."""
    ranked = sorted(range(len(options)), key=lambda o: options[o].kept_bytes)
    policies = [options[o].policy for o in ranked for _ in range(counts[o])]
    return dict(zip(layers, policies))


def tighten_loop(req: PlanRequest, partition: tuple[int, ...], name: str, solve: Solver,
                 start: float, notes: tuple[str, ...] = (), place: Placer | None = None,
                 relax: bool = True) -> tuple[Plan, SimResult]:
    """Solve every rank, simulate, and shrink the budget of ranks the simulator finds over it.

    `place` maps the chosen policies to recompute windows (None: everything on demand);
    `relax` hands the simulator's slack back to a conservative solver after its first fit.
    """
    order = base_order(req)
    budgets = rank_budgets(req.costs, partition, order, req.budget_bytes, req.reserve_bytes)
    margins = [0] * order.pp
    fit: list[int | None] = [None] * order.pp   # smallest margin seen to fit
    fail: list[int | None] = [None] * order.pp  # largest margin seen to overshoot
    best: tuple[Plan, SimResult] | None = None
    for _ in range(MAX_TIGHTEN):
        plan, sim = _solve_all(req, partition, name, solve, budgets, margins, start, notes, place)
        over = [peak - req.budget_bytes for peak in plan.predicted.peak_memory_bytes]
        if all(o <= 0 for o in over) and (
                best is None or plan.predicted.step_time_ms < best[0].predicted.step_time_ms):
            best = (plan, sim)
        nxt = [_next_margin(r, m, o, fit, fail, req.budget_bytes, relax)
               for r, (m, o) in enumerate(zip(margins, over))]
        if all(m is None for m in nxt):
            break
        margins = [m if m is not None else f for m, f in zip(nxt, _settled(fit, margins))]
    return best if best is not None else (plan, sim)


def _next_margin(rank: int, margin: int, over: int, fit: list, fail: list,
                 budget: int, relax: bool) -> int | None:
    """Bisect each rank's estimate margin between 'fits' and 'overshoots' (None: settled).

    The memory estimate is conservative (peaks of forward and backward do not coincide), so
    after the first fit the simulator's slack is handed back and the margin bisected.
    """
    first_fit = over <= 0 and fit[rank] is None
    if over > 0:
        fail[rank] = margin if fail[rank] is None else max(fail[rank], margin)
    else:
        fit[rank] = margin if fit[rank] is None else min(fit[rank], margin)
    if fit[rank] is None:
        return margin + over
    if fail[rank] is None:  # relax once; a second fit without any overshoot means settled
        return margin + over if relax and first_fit and over < -budget // 100 else None
    if fit[rank] - fail[rank] <= budget // 200:
        return None
    return (fit[rank] + fail[rank]) // 2


def _settled(fit: list, margins: list[int]) -> list[int]:
    """Margin to keep for a settled rank: the smallest one known to fit."""
    return [f if f is not None else m for f, m in zip(fit, margins)]


def _solve_all(req: PlanRequest, partition: tuple[int, ...], name: str, solve: Solver,
               budgets: list[RankBudget], margins: list[int], start: float,
               notes: tuple[str, ...], place: Placer | None) -> tuple[Plan, SimResult]:
    layers: dict[int, LayerPolicy] = {}
    gap = 0.0
    for rb in budgets:
        chosen, rank_gap = solve(rb, margins[rb.rank])
        layers.update(chosen)
        gap = max(gap, rank_gap)
    policy = tuple(layers[g] for g in range(req.model.num_layers))
    placement = place(policy) if place else None
    return make_plan(req, name, partition, policy, placement,
                     1e3 * (time.perf_counter() - start), gap, notes)


def checkmate_solver(req: PlanRequest, partition: tuple[int, ...]) -> Solver:
    """Per-rank MILP minimising total (on-demand) recompute time: exact memory rows where the
    period model applies (one stage per rank), the count knapsack otherwise."""
    if req.parallel.virtual_stages == 1:
        return exact_solver(req, partition)
    return knapsack_solver(req)


def exact_solver(req: PlanRequest, partition: tuple[int, ...]) -> Solver:
    """Counts per option with the simulator's memory at every event of the rank's period."""
    options = count_options(req.costs.layer)
    periods = {r: make_period(req, partition, r, windows=False) for r in range(req.parallel.pp)}

    def solve(rb: RankBudget, margin: int) -> tuple[dict[int, LayerPolicy], float]:
        found = solve_counts(options, periods[rb.rank], rb.activation_bytes + rb.extras_bytes
                             - margin, req.time_limit_s)
        if found is None:
            return {g: FULL for g in rb.layers}, 0.0
        policies, gap = found
        return dict(zip(sorted(rb.layers), policies)), gap

    return solve


def knapsack_solver(req: PlanRequest) -> Solver:
    """Per-rank count knapsack minimising total (on-demand) recompute time; its memory bound
    (in-flight x kept + one layer's regenerated bytes) is conservative."""
    options = pareto(layer_options(req.costs.layer), lambda o: o.total_ms)
    cost = np.array([[o.total_ms for o in options]])

    def solve(rb: RankBudget, margin: int) -> tuple[dict[int, LayerPolicy], float]:
        choice = choose_counts([len(rb.layers)], options, cost, rb.inflight,
                               rb.activation_bytes - margin, req.time_limit_s,
                               rb.transient_credit)
        if choice is None:
            return {g: FULL for g in rb.layers}, 0.0
        return assign(rb.layers, choice.counts[0], options), choice.mip_gap

    return solve


def checkmate_run(req: PlanRequest, partition: tuple[int, ...], name: str, start: float,
                  notes: tuple[str, ...] = ()) -> tuple[Plan, SimResult]:
    """Checkmate on a given partition, with the simulation of its plan."""
    conservative = req.parallel.virtual_stages > 1  # the knapsack: hand slack back once
    return tighten_loop(req, partition, name, checkmate_solver(req, partition), start, notes,
                        relax=conservative)


def plan_checkmate_on(req: PlanRequest, partition: tuple[int, ...], name: str) -> Plan:
    """Checkmate on a given partition."""
    return checkmate_run(req, partition, name, time.perf_counter())[0]


def plan_checkmate(req: PlanRequest) -> Plan:
    """Checkmate on the uniform (Megatron) partition."""
    return plan_checkmate_on(req, default_partition(req), "checkmate")


def plan_adapipe(req: PlanRequest) -> Plan:
    """AdaPipe-style: checkmate per stage on the recompute-aware balanced partition.

    If the balanced partition simulates slower than the uniform one, the uniform plan is kept
    (the partitioner's estimate ignores pipeline dependencies; the simulator does not).
    """
    start = time.perf_counter()
    partition = default_partition(req)
    if req.partition != "uniform":
        from lynxpipe.plan.partition import balanced_partition

        partition = balanced_partition(req, "ondemand")
    plan = plan_checkmate_on(req, partition, "adapipe")
    if partition != default_partition(req):
        uniform = plan_checkmate_on(req, default_partition(req), "adapipe")
        if uniform.predicted.fits_budget and (
                not plan.predicted.fits_budget
                or uniform.predicted.step_time_ms < plan.predicted.step_time_ms):
            plan = uniform
    return replace(plan, planner_ms=1e3 * (time.perf_counter() - start))
