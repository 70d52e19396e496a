"""The planner contract, for every registered planner (a new one gets this test for free):
its plan fits a budget every policy can meet, validates, survives the plan.json round trip and
re-simulates to its own predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import PlanRequest, load_plan, save_plan
from lynxpipe.schedule.validate import validate_order
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.workflow import resimulate

LAYOUTS = {
    "gpt tp2 pp2 1f1b": ("gpt-tiny", ParallelSpec(tp=2, pp=2, num_microbatches=4, seq_len=64)),
    "gpt sp gpipe": ("gpt-tiny", ParallelSpec(tp=2, pp=2, num_microbatches=3, seq_len=64,
                                              sequence_parallel=True, schedule="gpipe")),
    "gpt interleaved": ("gpt-tiny", ParallelSpec(pp=2, num_microbatches=4, seq_len=64,
                                                 schedule="interleaved", virtual_stages=2)),
    "llama tp2 pp1": ("llama-tiny", ParallelSpec(tp=2, pp=1, num_microbatches=2, seq_len=64)),
}


def _request(layout: str) -> PlanRequest:
    name, par = LAYOUTS[layout]
    model = get_model(name)
    cluster = get_cluster("a100-pcie")
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**50,
                        costs=costs)
    # every policy fits what keeping everything needs (on the uniform partition)
    budget = max(make("none", probe).predicted.peak_memory_bytes)
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=budget,
                       costs=costs, time_limit_s=10.0)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def request_(request: pytest.FixtureRequest) -> PlanRequest:
    return _request(request.param)


@pytest.mark.parametrize("policy", list(PLANNERS))
def test_planner_contract(policy: str, request_: PlanRequest, tmp_path: Path) -> None:
    plan = make(policy, request_)
    assert plan.predicted.fits_budget, policy
    assert plan.policy == policy
    validate_order(plan.order, plan.partition)
    assert sum(plan.partition) == request_.model.num_layers == len(plan.layers)
    assert load_plan(save_plan(tmp_path / "plan.json", plan)) == plan
    again, _ = resimulate(plan, request_.costs, trace=False)
    assert again.predicted == plan.predicted
