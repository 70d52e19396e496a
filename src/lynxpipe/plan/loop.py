"""The loop every keep-set planner shares: solve each rank against its activation budget,
simulate the whole step, and tighten the estimate of each rank the simulator finds over budget.

A planner supplies its strategy as a `Solver` (rank budget -> policies of the rank's layers) and
optionally a `Placer` (policies -> recompute windows); `tighten_loop` owns the rest, so each
planner's file reads as its strategy alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lynxpipe.cost.memory import RankBudget, rank_budgets
from lynxpipe.plan.finalize import base_order, make_plan
from lynxpipe.plan.options import LayerOption
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.policy import LayerPolicy
from lynxpipe.sim.result import SimResult

MAX_TIGHTEN = 8

Solver = Callable[[RankBudget, int], tuple[dict[int, LayerPolicy], float]]
"""(rank budget, extra margin bytes) -> (policy per layer of the rank, MIP gap)."""
Repair = Callable[[Plan], "tuple[Plan, SimResult] | None"]
"""A plan over budget -> a variant of it that fits, or None."""
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
                 relax: bool = True, repair: Repair | None = None) -> tuple[Plan, SimResult]:
    """Solve every rank, simulate, and shrink the budget of ranks the simulator finds over it.

    `place` maps the chosen policies to recompute windows (None: everything on demand);
    `relax` hands the simulator's slack back to a conservative solver after its first fit;
    `repair` is offered the first plan over budget (fewer windows can fit where the tightened
    keep sets would recompute more), and what it returns competes with the loop's plans.
    """
    order = base_order(req)
    budgets = rank_budgets(req.costs, partition, order, req.budget_bytes, req.reserve_bytes)
    margins = [0] * order.pp
    fit: list[int | None] = [None] * order.pp   # smallest margin seen to fit
    fail: list[int | None] = [None] * order.pp  # largest margin seen to overshoot
    best: tuple[Plan, SimResult] | None = None
    solved: dict[tuple[int, int], tuple[dict[int, LayerPolicy], float]] = {}
    simulated: dict[tuple[LayerPolicy, ...], tuple[Plan, SimResult]] = {}
    for _ in range(MAX_TIGHTEN):
        chosen, gap = _solve_all(solve, budgets, margins, solved)
        policy = tuple(chosen[g] for g in range(req.model.num_layers))
        if policy not in simulated:  # bisection often lands on a plan it has already judged
            simulated[policy] = make_plan(req, name, partition, policy,
                                          place(policy) if place else None,
                                          1e3 * (time.perf_counter() - start), gap, notes)
        plan, sim = simulated[policy]
        over = [peak - req.budget_bytes for peak in plan.predicted.peak_memory_bytes]
        fixed = None
        if repair is not None and any(o > 0 for o in over):
            fixed, repair = repair(plan), None
        for run in ((plan, sim), fixed):
            if run is not None and run[0].predicted.fits_budget and (
                    best is None or run[0].predicted.step_time_ms < best[0].predicted.step_time_ms):
                best = run
        # a rank over budget with every layer on `full` keeps the least it can: tightening
        # its estimate further cannot help (the budget is below what this partition needs)
        stuck = [o > 0 and all(chosen[g].full for g in rb.layers)
                 for o, rb in zip(over, budgets)]
        nxt = [None if stuck[r] else _next_margin(r, m, o, fit, fail, req.budget_bytes, relax)
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
    if fit[rank] - fail[rank] <= budget // 100:
        return None
    return (fit[rank] + fail[rank]) // 2


def _settled(fit: list, margins: list[int]) -> list[int]:
    """Margin to keep for a settled rank: the smallest one known to fit."""
    return [f if f is not None else m for f, m in zip(fit, margins)]


def _solve_all(solve: Solver, budgets: list[RankBudget], margins: list[int],
               solved: dict[tuple[int, int], tuple[dict[int, LayerPolicy], float]],
               ) -> tuple[dict[int, LayerPolicy], float]:
    """Every rank's policies at its margin (a settled rank's answer is reused, not re-solved)."""
    layers: dict[int, LayerPolicy] = {}
    gap = 0.0
    for rb in budgets:
        key = (rb.rank, margins[rb.rank])
        if key not in solved:
            solved[key] = solve(rb, margins[rb.rank])
        chosen, rank_gap = solved[key]
        layers.update(chosen)
        gap = max(gap, rank_gap)
    return layers, gap


