"""One entry point for every policy: `make(policy, request) -> Plan` (SPEC §5)."""

from __future__ import annotations

from typing import Callable

from lynxpipe.errors import LynxError
from lynxpipe.plan.checkmate import plan_adapipe, plan_checkmate
from lynxpipe.plan.heu import plan_lynx_heu
from lynxpipe.plan.simple import plan_full, plan_full_block, plan_none, plan_selective
from lynxpipe.plan.types import Plan, PlanRequest
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
}
try:  # lynx-opt solves a larger MILP; registered when its module is present
    from lynxpipe.plan.opt import plan_lynx_opt

    PLANNERS["lynx-opt"] = plan_lynx_opt
except ImportError:  # pragma: no cover
    pass


def policies() -> list[str]:
    """Names of every registered policy, baselines first."""
    return list(PLANNERS)


def make(policy: str, req: PlanRequest, strict: bool = False) -> Plan:
    """Plan with `policy`; with `strict`, a plan that does not fit the budget is an error."""
    if policy not in PLANNERS:
        raise LynxError(f"unknown policy {policy!r}; choose one of {', '.join(PLANNERS)}")
    plan = PLANNERS[policy](req)
    if strict and not plan.predicted.fits_budget:
        raise LynxError(_too_small(policy, req, plan))
    return plan


def _too_small(policy: str, req: PlanRequest, plan: Plan) -> str:
    need = max(plan.predicted.peak_memory_bytes)
    least = max(plan_full(req).predicted.peak_memory_bytes)
    msg = (f"budget {format_bytes(req.budget_bytes)} per device is too small for policy "
           f"{policy!r} (its plan needs {format_bytes(need)})")
    if least > req.budget_bytes:
        return (msg + f"; no policy fits: the smallest feasible budget is {format_bytes(least)} "
                f"({least} bytes, full recompute) — raise --budget, or add pipeline/tensor "
                f"parallelism or a distributed optimizer")
    return msg + f"; full recompute fits from {format_bytes(least)} — try another policy"
