"""The library's front door: from specs to a planning request, from a request to a plan (or a
clear reason why none fits), from a plan back to a simulation. The CLI is a thin layer over
these; scripts and notebooks call them the same way.

    req = build_request(get_model("gpt-13b"), get_cluster("a100-nvlink"),
                        ParallelSpec(tp=8, pp=2), budget_bytes=parse_bytes("30GiB"))
    plan = plan_policy("lynx-heu", req, strict=True)
    plan, sim = resimulate(plan, req.costs)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lynxpipe.artifact import fingerprint
from lynxpipe.cost.check import check_costs
from lynxpipe.cost.table import CostTable, analytic_costs, load_profile, profile_model
from lynxpipe.errors import LynxError
from lynxpipe.plan.check import check_plan
from lynxpipe.plan.finalize import predict
from lynxpipe.plan.planners import make, smallest_feasible_bytes, too_small
from lynxpipe.plan.types import Plan, PlanRequest, load_plan
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.result import SimResult
from lynxpipe.specs import ClusterSpec, ModelSpec, ParallelSpec, validate_layout

T = TypeVar("T")
PARTITIONS = ("uniform", "balanced", "default")
DEFAULT_POLICY = "lynx-heu"
"""The policy `plan`, `simulate` and `train` use when none is named."""


def checked_load(loader: Callable[[Path], T], path: Path, what: str) -> T:
    """Load an artifact; a file with the right kind and version but a broken body, or a path
    that is not a readable file, is a one-line LynxError, never a traceback."""
    if Path(path).is_dir():
        raise LynxError(f"{path}: is a directory; give the path of a {what} file")
    try:
        return loader(path)
    except LynxError:
        raise
    except OSError as exc:
        raise LynxError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    except (TypeError, ValueError, KeyError, AttributeError, StopIteration) as exc:
        raise LynxError(f"{path}: malformed {what} file ({type(exc).__name__}: {exc}); "
                        f"regenerate it") from None


def model_for_profile(model: ModelSpec, par: ParallelSpec, table: CostTable, where: str,
                      widths: tuple[int, ...] = (4, 2, 1)) -> ModelSpec:
    """`model` at the activation width `table` was made for (fp32 on CPU: 4); a profile made
    for other specs is refused with the flags that must match."""
    found = profile_model(model, par, table, widths)
    if found is not None:
        return found
    raise LynxError(f"{where}: profile was made for other specs (fingerprint "
                    f"{table.spec_fingerprint}, these specs: {fingerprint(model, par)}); re-run "
                    f"`lynxpipe profile` with the same --model/--tp/--pp/--micro-batch-size/"
                    f"--seq-len/--attention flags (and --dtype-bytes, if you gave one)")


def load_costs(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
               profile: Path | None, adopt_dtype: bool = False) -> tuple[ModelSpec, CostTable]:
    """Analytic costs, or a profile.json checked to be made for this model and layout.

    With `adopt_dtype` (no activation width asked for) the model takes the width the profile
    was measured at (fp32 on CPU), so a CPU profile works with the preset's flags.
    """
    if profile is None:
        return model, analytic_costs(model, cluster, par)
    table = checked_load(load_profile, profile, "profile")
    check_costs(table, str(profile))
    return model_for_profile(model, par, table, str(profile),
                             (4, 2, 1) if adopt_dtype else ()), table


def build_request(model: ModelSpec, cluster: ClusterSpec, parallel: ParallelSpec, *,
                  budget_bytes: int | None = None, reserve_bytes: int = 0,
                  profile: Path | None = None, partition: str = "default",
                  time_limit_s: float = 30.0, devices: int | None = None,
                  adopt_profile_dtype: bool = False, costs: CostTable | None = None
                  ) -> PlanRequest:
    """Validate the layout and knobs and return the request every planner receives.

    `budget_bytes` None means the cluster's device memory. `costs` (a CostTable in hand, e.g.
    `profile.module.module_costs` of a traced block) replaces `profile`; like a profile it must
    be made for these specs (at any activation width).
    """
    validate_layout(model, cluster, parallel, devices)
    if partition not in PARTITIONS:
        raise LynxError(f"--partition {partition!r} must be one of {', '.join(PARTITIONS)}")
    if not time_limit_s > 0 or time_limit_s == float("inf"):
        raise LynxError(f"--time-limit {time_limit_s} must be a finite number of seconds > 0")
    budget = cluster.device_memory_bytes if budget_bytes is None else budget_bytes
    if reserve_bytes >= budget:
        raise LynxError(f"--reserve {reserve_bytes} bytes leaves nothing of the "
                        f"{budget}-byte budget for the model")
    if costs is not None:
        model = model_for_profile(model, parallel, costs, "costs")
    else:
        model, costs = load_costs(model, cluster, parallel, profile, adopt_profile_dtype)
    return PlanRequest(model=model, cluster=cluster, parallel=parallel, budget_bytes=budget,
                       costs=costs, partition=partition,  # type: ignore[arg-type]
                       reserve_bytes=reserve_bytes, time_limit_s=time_limit_s)


def load_plan_file(path: Path, profile: Path | None = None) -> tuple[Plan, CostTable]:
    """plan.json, checked: types and fingerprint (`load_plan`), layout and size limits, then
    every layer, stage, action and window against the graphs it will run on (`check_plan`).
    `simulate`, `compare` and `train` all read plans here, so they never disagree on what is a
    valid plan. Costs: the plan's own analytic ones, or `profile` (checked to match)."""
    plan = checked_load(load_plan, path, "plan")
    try:
        validate_layout(plan.model, plan.cluster, plan.parallel)
    except LynxError as exc:
        raise LynxError(f"{path}: {exc}") from None
    _, costs = load_costs(plan.model, plan.cluster, plan.parallel, profile)
    if plan.cost_source == "traced" and costs.source != "traced":
        raise LynxError(f"{path}: the plan was made from a traced block's costs and names its "
                        f"tensors; give its profile.json with --profile")
    check_plan(plan, costs, str(path))
    return plan, costs


def request_for_plan(plan: Plan, costs: CostTable) -> PlanRequest:
    """The request a plan was made from, with `costs` (its own, or a measured profile)."""
    return PlanRequest(model=plan.model, cluster=plan.cluster, parallel=plan.parallel,
                       budget_bytes=plan.budget_bytes, costs=costs,
                       partition=plan.partition_mode, reserve_bytes=plan.reserve_bytes,
                       time_limit_s=plan.time_limit_s)


def resimulate(plan: Plan, costs: CostTable, trace: bool = True) -> tuple[Plan, SimResult]:
    """Simulate a plan's own order again (with a trace); predictions refreshed from `costs`."""
    if (plan.cost_source == "traced") != (costs.source == "traced"):
        raise LynxError(f"the plan was made from {plan.cost_source} costs but these are "
                        f"{costs.source}: a traced block's plan names its tensors, so give its "
                        f"profile.json with --profile")
    # how the runtime posts receives is the plan's decision, whatever profile times it
    costs = dataclasses.replace(costs, recv_ahead=plan.recv_ahead)
    sim = simulate(costs, plan.partition, plan.layers, plan.order, trace=trace)
    pred = predict(request_for_plan(plan, costs), sim)
    return dataclasses.replace(plan, predicted=pred, cost_source=costs.source), sim


def require_feasible(plans: list[Plan], req: PlanRequest) -> None:
    """When no plan fits, raise naming the smallest feasible budget."""
    if plans and not any(p.predicted.fits_budget for p in plans):
        raise LynxError(too_small(req, plans[0]))


def plan_policy(policy: str, req: PlanRequest, strict: bool = False) -> Plan:
    """`planners.make`, except that when planning fails (a solver error, say) at a budget no
    policy can meet, the error says that instead."""
    try:
        return make(policy, req, strict=strict)
    except LynxError:
        least = smallest_feasible_bytes(req)
        if least > req.budget_bytes:
            raise LynxError(too_small(req, None)) from None
        raise
