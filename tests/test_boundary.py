"""Exact at the budget boundary (issue 10): exhaustive search over every drop subset (and full
recompute) of every layer on tiny layouts, tp in {1, 2} x pp in {1, 2}, both attention variants.

- the smallest feasible budget is the least peak of any on-demand plan;
- at that budget (fit means peak <= budget) every adaptive planner fits, and one byte below
  nothing does;
- checkmate equals the best on-demand plan at every budget from there, inclusive, to keep-all;
- the dynamic programme that replaced checkmate's MILP agrees with the MILP.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
from conftest import on_demand_outcomes

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.checkmate import plan_checkmate
from lynxpipe.plan.countdp import least_budget, solve_counts_dp
from lynxpipe.plan.ondemand import count_options, solve_counts
from lynxpipe.plan.period import make_period
from lynxpipe.plan.planners import make, smallest_feasible_bytes
from lynxpipe.plan.simple import default_partition
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.specs.model import with_layers

TOL = 1e-6
# explicit attention has 8 droppable tensors per layer (257^2 plans per layout, minutes each):
# CI runs the issue's own shape (tp 2, pp 1); the other three run with `-m slow`
LAYOUTS = [pytest.param(tp, pp, att, id=f"tp{tp}-pp{pp}-{att}",
                        marks=[pytest.mark.slow] if att == "explicit" and (tp, pp) != (2, 1)
                        else [])
           for att in ("fused", "explicit") for tp in (1, 2) for pp in (1, 2)]
ADAPTIVE = ("checkmate", "adapipe", "lynx-heu", "lynx-opt")


def _request(tp: int, pp: int, attention: str) -> PlanRequest:
    model = replace(with_layers(get_model("gpt-tiny"), 2), attention=attention,
                    attention_dropout=0.1 if attention == "explicit" else 0.0,
                    hidden_dropout=0.1)
    par = ParallelSpec(tp=tp, pp=pp, num_microbatches=2 * pp, seq_len=64)
    cluster = get_cluster("a100-pcie")
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**40,
                       costs=analytic_costs(model, cluster, par))


@cache
def _exhaustive(tp: int, pp: int, attention: str) -> tuple[tuple[float, int], ...]:
    """(step time, peak memory) of every on-demand plan: any drop subset or full per layer."""
    return on_demand_outcomes(_request(tp, pp, attention))


def _budgets(layout: tuple[int, int, str]) -> list[int]:
    """The least peak, one byte above it, every few distinct peaks between, and keep-all's."""
    peaks = sorted({peak for _, peak in _exhaustive(*layout)})
    return sorted({peaks[0], peaks[0] + 1, *peaks[::max(1, len(peaks) // 5)], peaks[-1]})


@pytest.mark.parametrize("tp,pp,attention", LAYOUTS)
def test_smallest_feasible_is_the_least_peak_and_every_planner_fits_there(tp, pp, attention):
    layout = (tp, pp, attention)
    req = _request(*layout)
    least = min(peak for _, peak in _exhaustive(*layout))
    assert smallest_feasible_bytes(req) == least
    for policy in ADAPTIVE:
        assert make(policy, replace(req, budget_bytes=least)).predicted.fits_budget, policy
        assert not make(policy, replace(req, budget_bytes=least - 1)).predicted.fits_budget


@pytest.mark.parametrize("tp,pp,attention", LAYOUTS)
def test_checkmate_is_the_best_on_demand_plan_from_the_boundary_up(tp, pp, attention):
    layout = (tp, pp, attention)
    req = _request(*layout)
    for budget in _budgets(layout):
        best = min(t for t, peak in _exhaustive(*layout) if peak <= budget)
        plan = plan_checkmate(replace(req, budget_bytes=budget))
        assert plan.predicted.fits_budget
        assert plan.predicted.step_time_ms == pytest.approx(best, rel=TOL)
        for policy in ("lynx-heu", "lynx-opt"):  # windows only add options
            other = make(policy, replace(req, budget_bytes=budget))
            assert other.predicted.fits_budget
            assert other.predicted.step_time_ms <= best * (1 + TOL)


@pytest.mark.parametrize("model,tp,pp", [("gpt-1.3b", 2, 2), ("gpt-6.7b", 4, 4),
                                          ("llama-7b", 2, 2)])
def test_count_programme_agrees_with_the_milp(model, tp, pp):
    for attention in ("fused", "explicit"):
        spec = replace(get_model(model), attention=attention, attention_dropout=0.0)
        par = ParallelSpec(tp=tp, pp=pp, num_microbatches=4 * pp, seq_len=2048)
        cluster = get_cluster("a100-pcie")
        req = PlanRequest(model=spec, cluster=cluster, parallel=par, budget_bytes=2**40,
                          costs=analytic_costs(spec, cluster, par))
        options = count_options(req.costs.layer)
        for rank in range(pp):
            period = make_period(req, default_partition(req), rank, windows=False)
            least = least_budget(options, period)
            assert solve_counts_dp(options, period, least - 1) is None
            for budget in (least, int(least * 1.05), int(least * 1.3), int(least * 2)):
                dp, milp = solve_counts_dp(options, period, budget), solve_counts(
                    options, period, budget, 30.0)
                assert dp is not None and milp is not None
                ms = {o.policy: o.ms for o in options}
                assert sum(ms[p] for p in dp[0]) == pytest.approx(
                    sum(ms[p] for p in milp[0]), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_issue_repro_gpt2_config_fits_at_its_smallest_budget(tmp_path, attention):
    import json

    from lynxpipe.errors import LynxError
    from lynxpipe.specs.hf import load_hf_config
    from lynxpipe.workflow import build_request, plan_policy

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
                                  "vocab_size": 512, "resid_pdrop": 0.1}))
    model = replace(load_hf_config(config), attention=attention)
    par = ParallelSpec(tp=1, pp=1, micro_batch_size=1, num_microbatches=2, seq_len=64)
    req = build_request(model, get_cluster("a100-pcie"), par, budget_bytes=2**40)
    least = smallest_feasible_bytes(req)
    for policy in ADAPTIVE:
        assert plan_policy(policy, replace(req, budget_bytes=least)).predicted.fits_budget
    with pytest.raises(LynxError, match=f"{least - 1} bytes.*smallest feasible budget is .*"
                                        f"{least} bytes"):
        plan_policy("checkmate", replace(req, budget_bytes=least - 1), strict=True)
