"""checkmate against exhaustive search over every drop subset, with the real simulator."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
from conftest import on_demand_outcomes

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.checkmate import least_step_ms, plan_checkmate
from lynxpipe.plan.opt import solve_lynx_opt
from lynxpipe.plan.simple import default_partition, plan_full, plan_selective
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.specs.model import with_layers

TOL = 1e-6
LAYOUTS = {  # name: layers, pp, m, dropout, sequence parallel, schedule, attention
    "1layer-pp1": (1, 1, 2, 0.1, False, "1f1b", "explicit"),
    "2layers-pp1-sp": (2, 1, 2, 0.0, True, "1f1b", "explicit"),
    "2layers-pp2-sp": (2, 2, 3, 0.0, True, "1f1b", "explicit"),
    "2layers-pp2-sp-dropout": (2, 2, 2, 0.1, True, "1f1b", "explicit"),
    "2layers-pp2-gpipe": (2, 2, 3, 0.1, False, "gpipe", "explicit"),
    "2layers-pp2-fused": (2, 2, 3, 0.1, False, "1f1b", "fused"),
    "2layers-pp1-sp-fused": (2, 1, 2, 0.1, True, "1f1b", "fused"),
}


def _request(name: str) -> PlanRequest:
    layers, pp, m, dropout, sp, schedule, attention = LAYOUTS[name]
    model = replace(with_layers(get_model("gpt-tiny"), layers), attention=attention,
                    attention_dropout=dropout if attention == "explicit" else 0.0,
                    hidden_dropout=dropout)
    par = ParallelSpec(tp=2, pp=pp, num_microbatches=m, seq_len=64, sequence_parallel=sp,
                       schedule=schedule)
    cluster = get_cluster("a100-pcie")
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**40, costs=analytic_costs(model, cluster, par))


@cache
def _exhaustive(name: str) -> tuple[tuple[float, int], ...]:
    """(step time, peak memory) of every drop subset (and full recompute) of every layer."""
    return on_demand_outcomes(_request(name))


def _budgets(name: str, count: int = 7) -> list[int]:
    """Budgets halfway between distinct peaks, from the tightest to the loosest."""
    peaks = sorted({peak for _, peak in _exhaustive(name)})
    picks = sorted({round(i * (len(peaks) - 2) / (count - 1)) for i in range(count)})
    return [(peaks[i] + peaks[i + 1]) // 2 for i in picks]


def _best(name: str, budget: int) -> float:
    return min(t for t, peak in _exhaustive(name) if peak <= budget)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_checkmate_matches_exhaustive_search(name):
    req = _request(name)
    for budget in _budgets(name):
        plan = plan_checkmate(replace(req, budget_bytes=budget))
        assert plan.predicted.fits_budget
        assert plan.predicted.step_time_ms == pytest.approx(_best(name, budget), rel=TOL)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exact_on_demand_milp_matches_exhaustive_search(name):
    # the same objective with lynx-opt's exact memory rows and every task on demand
    req = _request(name)
    for budget in _budgets(name):
        plan, _ = solve_lynx_opt(replace(req, budget_bytes=budget), default_partition(req),
                                 windows=False, name="checkmate")
        best = _best(name, budget)
        assert plan.predicted.fits_budget
        assert best * (1 - TOL) <= plan.predicted.step_time_ms
        assert plan.predicted.step_time_ms <= best * (1 + TOL + plan.mip_gap)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_budget_below_every_plan_does_not_fit(name):
    least = min(peak for _, peak in _exhaustive(name))
    assert not plan_checkmate(replace(_request(name), budget_bytes=least - 1)).predicted.fits_budget


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_budget_below_full_recompute_does_not_fit_when_nothing_does(name):
    req = _request(name)
    need = max(plan_full(req).predicted.peak_memory_bytes)
    budget = need - 1
    if any(peak <= budget for _, peak in _exhaustive(name)):
        pytest.skip("a segment-wise plan fits below full recompute's peak here")
    assert not plan_checkmate(replace(req, budget_bytes=budget)).predicted.fits_budget


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_checkmate_no_slower_than_full_and_selective(name):
    req = _request(name)
    for budget in _budgets(name):
        sized = replace(req, budget_bytes=budget)
        plan = plan_checkmate(sized)
        for other in (plan_full(sized), plan_selective(sized)):
            if other.predicted.fits_budget:
                assert plan.predicted.fits_budget
                assert plan.predicted.step_time_ms <= other.predicted.step_time_ms * (1 + TOL)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_least_step_bounds_checkmate_from_below(name):
    """lynx-heu leaves out checkmate's keep sets on a partition where its own plan already
    beats `least_step_ms`; that is sound only if no checkmate plan there is faster than the
    bound: at every budget, from below the least feasible to keeping everything, the plan is
    no faster than either form (relaxed, solved), and where one is infinite the plan does not
    fit. The bound also says more than 'keep everything' somewhere (it is not trivially low)."""
    req = _request(name)
    peaks = sorted({peak for _, peak in _exhaustive(name)})
    floor = min(t for t, _ in _exhaustive(name))
    above_floor = 0
    for budget in [peaks[0] - 1, peaks[0], *_budgets(name), peaks[-1]]:
        at = replace(req, budget_bytes=budget)
        plan = plan_checkmate(at)
        relaxed, solved = (least_step_ms(at, default_partition(at), exact)
                           for exact in (False, True))
        assert relaxed <= solved, budget
        for bound in (relaxed, solved):
            if bound == float("inf"):
                assert not plan.predicted.fits_budget, budget
                continue
            assert bound <= plan.predicted.step_time_ms * (1 + 1e-12), budget
            above_floor += bound > floor * (1 + 1e-9)
    assert above_floor
