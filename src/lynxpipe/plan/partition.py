"""Stage partitions (SPEC §5): Megatron's uniform split, and the recompute-aware one — contiguous
layer ranges minimising the slowest stage, where a stage's time includes the recompute that stays
exposed under its own memory budget. `choose_partition` is the one place a planner's request
(`--partition uniform|balanced|default`) becomes a partition."""

from __future__ import annotations

import numpy as np

from lynxpipe.cost.memory import rank_budgets
from lynxpipe.cost.table import overlapped_collective
from lynxpipe.plan.finalize import base_order
from lynxpipe.plan.knapsack import INFEASIBLE, pair_knapsacks
from lynxpipe.plan.options import layer_options, pareto
from lynxpipe.plan.types import PlanRequest
from lynxpipe.plan.windows import exposure, natural_slots
from lynxpipe.schedule.policy import uniform_partition

COUNT_BLOCK = 6
"""Layer counts of one stage whose exposed recompute is searched together (the DP mostly
stops within a few counts of where it starts)."""


def default_partition(req: PlanRequest) -> tuple[int, ...]:
    """Megatron's uniform split over virtual stages."""
    return uniform_partition(req.model.num_layers, req.parallel.num_chunks)


def choose_partition(req: PlanRequest, kind: str) -> tuple[int, ...]:
    """The request's partition: uniform when asked for, else the recompute-aware one whose
    stage times count exposed recompute as `kind` plans it ('lynx': windows hide recompute,
    'ondemand': all of it is exposed)."""
    if req.partition == "uniform":
        return default_partition(req)
    return balanced_partition(req, kind)


def _layer_ms(req: PlanRequest) -> float:
    """Forward + backward of a layer with its exposed TP communication (no recompute), each
    collective with its measured sync wait, as the simulator counts them."""
    cost = req.costs.layer
    sync = req.costs.tp_sync_ms
    fwd = cost.fwd_ms() + cost.fwd_coll_ms() + sync * sum(
        step.kind == "coll" for step in cost.graph.fwd_steps)
    bwd = cost.bwd_ms()
    for step in cost.graph.bwd_steps:
        if step.kind == "coll":
            bwd += sync
            overlap = cost.part_ms(step.ops, step.part)
            wall, wait = overlapped_collective(overlap, cost.coll_ms[step.coll],
                                               req.costs.contention)
            bwd += wall + wait - overlap  # bwd_ms() has the overlapped GEMM at full speed
    return fwd + bwd


def _extra_ms(cost) -> float:
    return cost.fwd_ms() + cost.bwd_ms() + sum(cost.coll_ms.values())


def balanced_partition(req: PlanRequest, kind: str) -> tuple[int, ...]:
    """DP over contiguous layer ranges; `kind` 'lynx' counts windows, 'ondemand' does not.

    Interleaved schedules keep Megatron's uniform split (chunks of a rank share one budget).
    """
    par = req.parallel
    if par.virtual_stages > 1 or par.pp == 1:
        return default_partition(req)
    num_layers, p = req.model.num_layers, par.pp
    uniform = default_partition(req)
    order = base_order(req)
    rb = rank_budgets(req.costs, uniform, order, req.budget_bytes, req.reserve_bytes)
    options = layer_options(req.costs.layer)
    interior = natural_slots(req.costs, range(1, 3), False, num_layers)
    slots = {seg: slot for (g, seg), slot in interior.items() if g == 1}
    c = req.costs.contention
    cost_of = {id(o): exposure(o, slots, c) if kind == "lynx" else o.total_ms for o in options}
    options = pareto(options, lambda o: cost_of[id(o)])
    costs = [cost_of[id(o)] for o in options]
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    regen = np.array([o.regen_bytes for o in options], dtype=float)
    cost = np.array(costs)
    layer_ms, per_layer_static = _layer_ms(req), req.costs.layer_params * req.costs.bytes_per_param
    extra = [_extra_ms(req.costs.embed) if s == 0 else 0.0 for s in range(p)]
    extra[-1] += _extra_ms(req.costs.head)

    most = num_layers - p + 1
    exposed: dict[tuple[int, int], float] = {}

    def stage_ms(stage: int, count: int) -> float:
        if (stage, count) not in exposed:  # the DP asks counts in rising order: a block
            block = range(count, min(count + COUNT_BLOCK, most + 1))
            # the stage's activation budget moves with its layer count (weights scale with it)
            budgets = [rb[stage].activation_bytes - (n - uniform[stage]) * per_layer_static
                       for n in block]
            exposed.update(zip(((stage, n) for n in block), pair_knapsacks(
                kept, regen, cost, block, rb[stage].inflight, budgets)))
        return count * layer_ms + extra[stage] + exposed[(stage, count)]

    best = _dp(num_layers, p, stage_ms)
    return best if best is not None else uniform


def _dp(num_layers: int, p: int, stage_ms) -> tuple[int, ...] | None:
    """min over splits of max stage time; stages get at least one layer.

    A stage's time never falls as it takes more layers (more compute, less memory for its
    activations), so once it alone reaches the best split found, more layers cannot help: the
    scan stops there and most stage times (a knapsack each) are never computed.
    """
    # f[s][n]: best max time placing the first n layers on stages 0..s-1
    f = [[INFEASIBLE] * (num_layers + 1) for _ in range(p + 1)]
    arg = [[0] * (num_layers + 1) for _ in range(p + 1)]
    f[0][0] = 0.0
    for s in range(1, p + 1):
        for n in range(s, num_layers - (p - s) + 1):
            for k in range(1, n - (s - 1) + 1):
                prev = f[s - 1][n - k]
                if prev == INFEASIBLE:
                    continue
                own = stage_ms(s - 1, k)
                if own >= f[s][n] - 1e-12:
                    break
                val = max(prev, own)
                if val < f[s][n] - 1e-12:
                    f[s][n], arg[s][n] = val, k
    if f[p][num_layers] == INFEASIBLE:
        return None
    out, n = [], num_layers
    for s in range(p, 0, -1):
        out.append(arg[s][n])
        n -= arg[s][n]
    return tuple(reversed(out))
