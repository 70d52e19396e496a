"""Property tests over random small models, layouts and budgets (issue: planners)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynxpipe.cost.table import analytic_costs
from lynxpipe.errors import LynxError
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import PlanRequest, load_plan, save_plan
from lynxpipe.schedule.validate import validate_order
from lynxpipe.sim.engine import simulate
from lynxpipe.specs import ModelSpec, ParallelSpec, get_cluster

TOL = 1e-6  # relative slack for float noise; MILP gaps are added on top


@st.composite
def requests(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    hidden = heads * draw(st.sampled_from([16, 32]))
    layers = draw(st.integers(2, 8))
    attention = draw(st.sampled_from(["fused", "explicit"]))
    model = ModelSpec("rand", draw(st.sampled_from(["gpt", "llama"])), layers, hidden, heads,
                      heads, 4 * hidden, 512, attention=attention,
                      attention_dropout=0.1 if attention == "explicit" else 0.0,
                      hidden_dropout=0.1)
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if heads % t == 0]))
    pp = draw(st.integers(1, min(3, layers)))
    par = ParallelSpec(tp=tp, pp=pp, seq_len=draw(st.sampled_from([128, 256])),
                       micro_batch_size=draw(st.integers(1, 2)),
                       num_microbatches=draw(st.integers(1, 6)),
                       sequence_parallel=tp > 1 and draw(st.booleans()))
    cluster = get_cluster(draw(st.sampled_from(["a100-pcie", "a100-nvlink", "ascend-910b"])))
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60, costs=costs)
    low = max(make("full", probe).predicted.peak_memory_bytes)
    high = max(make("none", probe).predicted.peak_memory_bytes)
    budget = int(low + draw(st.floats(0.0, 1.0)) * (high - low))
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=budget, costs=costs)


def _time(plan):
    return plan.predicted.step_time_ms


@settings(max_examples=int(os.environ.get("LYNX_EXAMPLES", "25")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_plans_fit_validate_and_order(req):
    plans = {p: make(p, req) for p in ("full", "selective", "checkmate", "adapipe", "lynx-heu")}
    for name, plan in plans.items():
        validate_order(plan.order, plan.partition)
        again = simulate(req.costs, plan.partition, plan.layers, plan.order)
        assert again.step_time_ms == pytest.approx(_time(plan))
    for name in ("full", "checkmate", "adapipe", "lynx-heu"):
        assert plans[name].predicted.fits_budget, name
    gap = 1 + TOL + (plans["checkmate"].mip_gap or 0.0)
    assert _time(plans["lynx-heu"]) <= _time(plans["checkmate"]) * gap
    assert _time(plans["checkmate"]) <= _time(plans["full"]) * gap
    assert _time(plans["adapipe"]) <= _time(plans["checkmate"]) * gap
    if plans["selective"].predicted.fits_budget:
        assert _time(plans["checkmate"]) <= _time(plans["selective"]) * gap


def test_recompute_happens_where_planned(tmp_path):
    from lynxpipe.specs import get_model

    model, cluster = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=4, pp=2, num_microbatches=4, micro_batch_size=2)
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60, costs=costs)
    budget = (max(make("full", probe).predicted.peak_memory_bytes)
              + max(make("none", probe).predicted.peak_memory_bytes)) // 2
    req = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=budget, costs=costs)
    plan = make("lynx-heu", req, strict=True)
    kinds = {a.window.kind for r in plan.order.ranks for a in r if a.kind == "R"}
    assert "bwd_coll" in kinds  # windows are used, not only on-demand recompute
    assert plan.predicted.recompute_hidden_ms > 0
    assert _time(plan) < _time(make("full", req))
    assert load_plan(save_plan(tmp_path / "plan.json", plan)) == plan


def test_budget_too_small_names_smallest_feasible():
    from lynxpipe.specs import get_model

    model, cluster, par = get_model("gpt-22b"), get_cluster("a100-pcie"), ParallelSpec(tp=8, pp=4)
    req = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2 * 2**30, costs=analytic_costs(model, cluster, par))
    with pytest.raises(LynxError, match="smallest feasible budget is"):
        make("lynx-heu", req, strict=True)


def test_every_policy_is_registered():
    assert {"none", "full", "selective", "checkmate", "adapipe", "lynx-heu"} <= set(PLANNERS)


@pytest.mark.parametrize("schedule", ["interleaved", "gpipe"])
def test_other_schedules_fit_and_order(schedule):
    # interleaved keeps checkmate's count knapsack (several stages per rank); GPipe the exact one
    from lynxpipe.specs import get_model

    model, cluster = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, schedule=schedule,
                       virtual_stages=2 if schedule == "interleaved" else 1)
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60, costs=costs)
    low = max(make("full", probe).predicted.peak_memory_bytes)
    high = max(make("none", probe).predicted.peak_memory_bytes)
    req = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=(low + high) // 2, costs=costs)
    plans = {p: make(p, req) for p in ("full", "checkmate", "lynx-heu")}
    for plan in plans.values():
        validate_order(plan.order, plan.partition)
        assert plan.predicted.fits_budget
    gap = 1 + TOL + (plans["checkmate"].mip_gap or 0.0)
    assert _time(plans["lynx-heu"]) <= _time(plans["checkmate"]) * gap
    assert _time(plans["checkmate"]) < _time(plans["full"])


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_heu_leaves_out_checkmate_only_where_it_could_not_win(attention, monkeypatch):
    """Where lynx-heu's own plan beats checkmate's lower bound on a partition, checkmate's keep
    sets are not solved there; the plan must be the very plan solving them gives."""
    from dataclasses import replace

    import lynxpipe.plan.heu as heu
    from lynxpipe.specs import get_model

    model = replace(get_model("gpt-13b"), attention=attention)
    cluster = get_cluster("a100-pcie")
    par = ParallelSpec(tp=8, pp=4, num_microbatches=16, seq_len=2048)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60,
                        costs=analytic_costs(model, cluster, par))
    ranks = make("none", probe).predicted.ranks
    budget = max(r.static_bytes for r in ranks) + int(0.15 * max(
        r.peak_activation_bytes for r in ranks))
    ahead, solved = [], []
    test, run = heu._ahead_of_checkmate, heu.checkmate_run
    monkeypatch.setattr(heu, "_ahead_of_checkmate", lambda *a: ahead.append(test(*a)) or
                        ahead[-1])
    monkeypatch.setattr(heu, "checkmate_run", lambda req, p, *a: solved.append(p) or run(
        req, p, *a))
    req = replace(probe, budget_bytes=budget)
    skipping = make("lynx-heu", req)
    assert any(ahead) and len(solved) == ahead.count(False)  # some were left out
    monkeypatch.setattr(heu, "_ahead_of_checkmate", lambda *_: False)
    solving = make("lynx-heu", replace(req, costs=analytic_costs(model, cluster, par)))
    assert (skipping.layers, skipping.order, skipping.predicted, skipping.chosen_from) == \
        (solving.layers, solving.order, solving.predicted, solving.chosen_from)
