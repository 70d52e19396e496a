"""lynx-opt against exhaustive search with the real simulator, and its never-worse guarantee."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from conftest import toy_costs

from lynxpipe.cost.table import analytic_costs
from lynxpipe.errors import LynxError
from lynxpipe.plan.checkmate import plan_checkmate
from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.heu import plan_lynx_heu
from lynxpipe.plan.opt import plan_lynx_opt, solve_lynx_opt, translate
from lynxpipe.plan.options import LayerOption, layer_options
from lynxpipe.plan.period import make_period
from lynxpipe.plan.simple import default_partition, plan_full
from lynxpipe.plan.types import PlanRequest
from lynxpipe.schedule.validate import validate_order
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.specs.model import with_layers

TOL = 1e-6


def _request(layers: int, pp: int, m: int, coll_ms: float, p2p_ms: float,
             schedule: str = "1f1b") -> PlanRequest:
    costs = toy_costs(tp=2, fwd_ms=1.0, bwd_ms=2.0, coll_ms=coll_ms, p2p_ms=p2p_ms)
    par = ParallelSpec(tp=2, pp=pp, num_microbatches=m, seq_len=64, schedule=schedule)
    return PlanRequest(model=with_layers(get_model("gpt-tiny"), layers), cluster=get_cluster("a100-nvlink"),
                       parallel=par, budget_bytes=2**40, costs=costs, partition="uniform")


def _subset(req: PlanRequest, count: int) -> list[LayerOption]:
    """`count` options spread over the frontier, full recompute last (None: all of them)."""
    options = layer_options(req.costs.layer)
    picks = [round(i * (len(options) - 2) / max(1, count - 2)) for i in range(count - 1)]
    return [options[i] for i in sorted(set(picks + [len(options) - 1]))]


def _exhaustive(req: PlanRequest, options: list[LayerOption]) -> list[tuple[float, int]]:
    """(step time, peak memory) of every option per layer x window per task of the period.

    A task may go to any window of its rank's period or on demand; placements after the
    backward that needs the tensors are rejected by the simulator itself. Zero-capacity
    windows are left out: they delay like on demand and only hold memory longer.
    """
    partition = default_partition(req)
    slots = []
    for rank in range(req.parallel.pp):
        period = make_period(req, partition, rank)
        keys = [*period.pre, *period.bwd, None]
        for layer in period.layers:
            slots.append([(period, layer, o.policy, dict(zip(((layer, s) for s in sorted(o.seg_ms)),
                                                                 where)))
                          for o in options
                          for where in itertools.product(keys, repeat=len(o.seg_ms))])
    found = []
    for combo in itertools.product(*slots):
        layers = tuple(policy for _, _, policy, _ in combo)
        placement = {k: w for period, _, _, chosen in combo
                     for k, w in translate(period, chosen).items()}
        try:
            plan, _ = make_plan(req, "x", partition, layers, placement, 0.0)
        except (LynxError, ValueError):
            continue
        found.append((plan.predicted.step_time_ms, max(plan.predicted.peak_memory_bytes)))
    return found


def _budgets(found: list[tuple[float, int]], count: int) -> list[int]:
    """Budgets halfway between distinct peaks, from the tightest to above the loosest (the
    MILP keeps a few bytes per GB below the budget against solver tolerances)."""
    peaks = sorted({peak for _, peak in found})
    picks = sorted({round(i * (len(peaks) - 2) / (count - 1)) for i in range(count)})
    return [(peaks[i] + peaks[i + 1]) // 2 for i in picks] + [peaks[-1] + 4096]


CASES = [  # layers, pp, m, coll ms, p2p ms, schedule, options (None: all)
    (1, 1, 2, 0.3, 0.0, "1f1b", None),
    (1, 1, 3, 0.1, 0.0, "1f1b", None),
    (2, 1, 2, 0.3, 0.0, "1f1b", 6),
    (2, 2, 3, 0.3, 0.05, "1f1b", 5),
    (2, 2, 4, 0.1, 0.5, "1f1b", 5),
    (2, 2, 2, 0.5, 0.2, "gpipe", 3),
]


@pytest.mark.parametrize("layers,pp,m,coll,p2p,schedule,count", CASES)
def test_milp_matches_exhaustive_search(layers, pp, m, coll, p2p, schedule, count):
    req = _request(layers, pp, m, coll, p2p, schedule)
    options = layer_options(req.costs.layer) if count is None else _subset(req, count)
    _matches_exhaustive(req, options, 5)


def _matches_exhaustive(req: PlanRequest, options: list[LayerOption], budgets: int) -> None:
    """At `budgets` budgets, lynx-opt's plan fits and is the exhaustive optimum (within gap)."""
    found = _exhaustive(req, options)
    for budget in _budgets(found, budgets):
        best = min(t for t, peak in found if peak <= budget)
        plan, _ = solve_lynx_opt(replace(req, budget_bytes=budget), default_partition(req),
                                 options)
        assert plan.predicted.fits_budget
        assert plan.mip_gap is not None
        assert plan.predicted.step_time_ms >= best * (1 - TOL)
        assert plan.predicted.step_time_ms <= best * (1 + TOL + plan.mip_gap)


@pytest.mark.parametrize("contention,sync_ms", [(0.3, 0.05), (0.9, 0.2)])
def test_milp_matches_exhaustive_search_with_contention_and_sync(contention, sync_ms):
    # the period model prices the wgrad GEMM under its all-reduce and each collective's sync
    # wait as the simulator does (pipeline waits make a mismatch visible)
    req = _request(2, 2, 3, 0.3, 0.05)
    req = replace(req, costs=replace(req.costs, contention=contention, tp_sync_ms=sync_ms))
    _matches_exhaustive(req, _subset(req, 4), 3)


def _span(req: PlanRequest, frac: float) -> PlanRequest:
    low = max(plan_full(req).predicted.peak_memory_bytes)
    high = max(make_plan(req, "none", default_partition(req),
                         (layer_options(req.costs.layer)[0].policy,) * req.model.num_layers,
                         None, 0.0)[0].predicted.peak_memory_bytes)
    return replace(req, budget_bytes=int(low + frac * (high - low)))


def _analytic(cluster: str, pp: int, m: int) -> PlanRequest:
    model = with_layers(get_model("gpt-1.3b"), 4)
    par = ParallelSpec(tp=2, pp=pp, num_microbatches=m, seq_len=512)
    return PlanRequest(model=model, cluster=get_cluster(cluster), parallel=par, budget_bytes=2**40,
                       costs=analytic_costs(model, get_cluster(cluster), par), time_limit_s=10.0)


@pytest.mark.parametrize("req", [_request(3, 1, 3, 0.2, 0.0), _request(4, 2, 4, 0.3, 0.1),
                                 _analytic("a100-nvlink", 2, 4), _analytic("a100-pcie", 1, 2)],
                         ids=["toy-pp1", "toy-pp2", "nvlink-pp2", "pcie-pp1"])
@pytest.mark.parametrize("frac", [0.1, 0.5])
def test_never_worse_than_heu_checkmate_full(req, frac):
    req = _span(req, frac)
    plan = plan_lynx_opt(req)
    assert plan.policy == "lynx-opt" and plan.predicted.fits_budget
    validate_order(plan.order, plan.partition)
    assert plan.mip_gap is not None and plan.mip_gap >= 0.0
    assert any("kept the" in note for note in plan.notes)
    for other in (plan_lynx_heu(req), plan_checkmate(req), plan_full(req)):
        if other.predicted.fits_budget:
            assert plan.predicted.step_time_ms <= other.predicted.step_time_ms * (1 + TOL)


def test_budget_without_room_for_activations_does_not_fit():
    # (below full recompute's peak is not enough: dropping every tensor segment-wise, without
    # replaying collectives, can need less than full recompute on some ranks)
    req = _request(2, 2, 3, 0.3, 0.05)
    static = max(r.static_bytes for r in plan_full(req).predicted.ranks)
    plan = plan_lynx_opt(replace(req, budget_bytes=static + 1024))
    assert not plan.predicted.fits_budget


def test_interleaved_falls_back_to_the_candidates():
    req = _request(4, 2, 4, 0.3, 0.1)
    par = replace(req.parallel, schedule="interleaved", virtual_stages=2)
    plan = plan_lynx_opt(_span(replace(req, parallel=par), 0.1))
    assert plan.predicted.fits_budget and plan.mip_gap is None
    assert "interleaved uses the candidates" in plan.notes[-1]


def test_skips_the_milp_when_a_candidate_cannot_be_beaten():
    req = _span(_request(2, 2, 3, 0.3, 0.05), 1.0)
    plan = plan_lynx_opt(req)
    assert plan.mip_gap == 0.0 and "MILP skipped" in plan.notes[-1]
