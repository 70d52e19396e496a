"""One entry point for every policy: `make(policy, request) -> Plan` (SPEC §5)."""

from __future__ import annotations

from collections.abc import Callable

from lynxpipe.cost.memory import rank_budgets
from lynxpipe.errors import LynxError
from lynxpipe.plan.checkmate import plan_adapipe, plan_checkmate
from lynxpipe.plan.countdp import least_budget
from lynxpipe.plan.finalize import base_order, make_plan
from lynxpipe.plan.heu import plan_lynx_heu
from lynxpipe.plan.ondemand import count_options
from lynxpipe.plan.opt import plan_lynx_opt
from lynxpipe.plan.partition import default_partition
from lynxpipe.plan.period import make_period
from lynxpipe.plan.simple import plan_full, plan_full_block, plan_none, plan_selective
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.policy import LayerPolicy
from lynxpipe.units import format_bytes

Planner = Callable[[PlanRequest], Plan]

PLANNERS: dict[str, Planner] = {
    "none": plan_none,
    "full": plan_full,
    "full-block": plan_full_block,
    "selective": plan_selective,
    "checkmate": plan_checkmate,
    "adapipe": plan_adapipe,
    "lynx-heu": plan_lynx_heu,
    "lynx-opt": plan_lynx_opt,
}
"""Every policy, baselines first (the order of `lynxpipe compare`)."""


def policies() -> list[str]:
    """Names of every registered policy, baselines first."""
    return list(PLANNERS)


def make(policy: str, req: PlanRequest, strict: bool = False) -> Plan:
    """Plan with `policy`; with `strict`, a plan that does not fit the budget is an error."""
    if policy not in PLANNERS:
        raise LynxError(f"unknown policy {policy!r}; choose one of {', '.join(PLANNERS)}")
    plan = PLANNERS[policy](req)
    if strict and not plan.predicted.fits_budget:
        raise LynxError(too_small(req, plan))
    return plan


def smallest_feasible_bytes(req: PlanRequest) -> int:
    """Least per-device memory any plan needs (fit means peak <= budget).

    With one stage per rank it is exact over the whole on-demand option space (every mix of
    keep/drop options and full recompute per layer, `countdp.least_budget` per rank); windowed
    recompute only holds regenerated tensors longer, so it never needs less. Interleaved
    schedules take the leaner of Megatron full recompute and dropping every droppable tensor.
    """
    partition = default_partition(req)
    if req.parallel.virtual_stages == 1:
        options = count_options(req.costs.layer)
        order = base_order(req)
        ranks = rank_budgets(req.costs, partition, order, 0, req.reserve_bytes)
        # at a zero budget a rank's activation room is -(reserve + static + extras)
        return max(least_budget(options, make_period(req, partition, rb.rank, windows=False))
                   - rb.activation_bytes - rb.extras_bytes for rb in ranks)
    drop_all = LayerPolicy(frozenset(t.name for t in req.costs.layer.graph.droppable()))
    lean, _ = make_plan(req, "drop-all", partition, (drop_all,) * req.model.num_layers, None,
                        0.0)
    return min(max(plan_full(req).predicted.peak_memory_bytes),
               max(lean.predicted.peak_memory_bytes))


def too_small(req: PlanRequest, plan: Plan | None) -> str:
    """Why `plan` (or planning at all) failed the budget, with the smallest feasible budget."""
    least = smallest_feasible_bytes(req)
    budget = format_bytes(req.budget_bytes)
    if least > req.budget_bytes:
        return (f"budget {budget} ({req.budget_bytes} bytes) per device is too small for any "
                f"plan: the smallest feasible "
                f"budget is {format_bytes(least)} ({least} bytes) — raise --budget, or add "
                f"pipeline/tensor parallelism or a distributed optimizer")
    assert plan is not None
    need = format_bytes(max(plan.predicted.peak_memory_bytes))
    return (f"policy {plan.policy!r} needs {need} per device, over the budget of {budget}; "
            f"plans fit from {format_bytes(least)} ({least} bytes): try checkmate, lynx-heu "
            f"or lynx-opt")
