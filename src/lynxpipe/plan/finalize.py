"""Shared tail of every planner: place R actions, simulate, and wrap up a Plan."""

from __future__ import annotations

from lynxpipe.cost.flops import step_flops
from lynxpipe.cost.memo import per_cost
from lynxpipe.plan.recompute import TaskKey, insert_recompute
from lynxpipe.plan.types import Plan, PlanRequest, Prediction, plan_fingerprint
from lynxpipe.schedule.actions import PipelineOrder, Window
from lynxpipe.schedule.orders import make_order
from lynxpipe.schedule.policy import LayerPolicy
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.result import SimResult


def base_order(req: PlanRequest) -> PipelineOrder:
    """The pipeline order (without recompute) for the request's layout."""
    par = req.parallel
    return make_order(par.schedule, par.pp, par.virtual_stages, par.num_microbatches)


def predict(req: PlanRequest, sim: SimResult) -> Prediction:
    """Throughput and memory figures of a simulated step, checked against the budget."""
    par = req.parallel
    tokens = par.seq_len * par.micro_batch_size * par.num_microbatches * par.dp
    seconds = sim.step_time_ms / 1e3
    # the same for every candidate of a run; keyed by what it reads besides the cost table
    flops = per_cost(req.costs, ("step_flops", req.model.num_layers, par.tp,
                                 par.num_microbatches, par.dp),
                     lambda: step_flops(req.costs, req.model, par))
    peaks = tuple(r.peak_memory_bytes + req.reserve_bytes for r in sim.ranks)
    return Prediction(
        step_time_ms=sim.step_time_ms,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        model_tflops_per_device=flops / seconds / par.devices / 1e12 if seconds else 0.0,
        peak_activation_bytes=tuple(r.peak_activation_bytes for r in sim.ranks),
        peak_memory_bytes=peaks,
        recompute_exposed_ms=sim.recompute_exposed_ms,
        recompute_hidden_ms=sim.recompute_hidden_ms,
        fits_budget=all(p <= req.budget_bytes for p in peaks),
        ranks=sim.ranks,
    )


def build_order(req: PlanRequest, partition: tuple[int, ...], layers: tuple[LayerPolicy, ...],
                placement: dict[TaskKey, Window] | None = None) -> PipelineOrder:
    """Base order with every recompute task inserted (unplaced ones on demand)."""
    return insert_recompute(base_order(req), partition, req.costs.layer.graph, layers,
                            placement or {})


def make_plan(req: PlanRequest, policy: str, partition: tuple[int, ...],
              layers: tuple[LayerPolicy, ...], placement: dict[TaskKey, Window] | None,
              planner_ms: float, mip_gap: float | None = None,
              notes: tuple[str, ...] = ()) -> tuple[Plan, SimResult]:
    """Assemble and simulate a plan."""
    order = build_order(req, partition, layers, placement)
    sim = simulate(req.costs, partition, layers, order)
    plan = Plan(
        policy=policy, model=req.model, cluster=req.cluster, parallel=req.parallel,
        budget_bytes=req.budget_bytes, reserve_bytes=req.reserve_bytes,
        partition_mode=req.partition, time_limit_s=req.time_limit_s,
        fingerprint=plan_fingerprint(req.model, req.cluster, req.parallel, req.budget_bytes),
        cost_source=req.costs.source, partition=partition, layers=layers, order=order,
        predicted=predict(req, sim), planner_ms=planner_ms, mip_gap=mip_gap, notes=notes,
        recv_ahead=req.costs.recv_ahead,
    )
    return plan, sim
