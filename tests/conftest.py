"""Shared fixtures: a toy cost table with round numbers for exact simulator checks."""

from __future__ import annotations

import os
from dataclasses import replace

from hypothesis import settings

from lynxpipe.cost.table import CostTable, LayerCost, OpTime, analytic_costs
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

# CI runs the same examples every time (a red build is reproducible); `explore` draws new ones:
#   HYPOTHESIS_PROFILE=explore LYNX_EXAMPLES=300 pytest tests/test_planners.py
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _scaled(cost: LayerCost, fwd_ms: float, bwd_ms: float, coll_ms: float) -> LayerCost:
    """Same graph, op times rescaled so the layer totals are exactly fwd_ms / bwd_ms."""
    f, b = cost.fwd_ms(), cost.bwd_ms()
    ops = {name: OpTime(t.fwd_ms * fwd_ms / f if f else 0.0, t.dgrad_ms * bwd_ms / b if b else 0.0,
                        t.wgrad_ms * bwd_ms / b if b else 0.0) for name, t in cost.op_ms.items()}
    return LayerCost(cost.graph, ops, {k: coll_ms for k in cost.coll_ms})


def toy_costs(tp: int = 1, fwd_ms: float = 1.0, bwd_ms: float = 2.0, coll_ms: float = 0.0,
              p2p_ms: float = 0.0, extras: bool = False) -> CostTable:
    """gpt-tiny graphs with layer forward/backward of exactly fwd_ms/bwd_ms, free embed/head."""
    par = ParallelSpec(tp=tp, seq_len=64)
    # the explicit-attention graph (probs, probs_dropped) the exact toy cases were written for
    model = replace(get_model("gpt-tiny"), attention="explicit", attention_dropout=0.1)
    costs = analytic_costs(model, get_cluster("a100-nvlink"), par)
    extra_f = 1.0 if extras else 0.0
    return replace(costs, layer=_scaled(costs.layer, fwd_ms, bwd_ms, coll_ms),
                   embed=_scaled(costs.embed, extra_f, extra_f, 0.0),
                   head=_scaled(costs.head, extra_f, extra_f, 0.0),
                   p2p_ms=p2p_ms, dp_alpha_ms=0.0, dp_ms_per_byte=0.0, optimizer_ms_per_param=0.0)


def on_demand_outcomes(req) -> tuple[tuple[float, int], ...]:
    """(step time, peak memory) of every on-demand plan of `req` by exhaustive search: every
    drop subset, and full recompute, for every layer, each simulated by the real simulator."""
    import itertools

    from lynxpipe.plan.finalize import make_plan
    from lynxpipe.plan.partition import default_partition
    from lynxpipe.schedule.policy import FULL, LayerPolicy

    names = [t.name for t in req.costs.layer.graph.droppable()]
    policies = [LayerPolicy(frozenset(c)) for r in range(len(names) + 1)
                for c in itertools.combinations(names, r)] + [FULL]
    found = []
    for layers in itertools.product(policies, repeat=req.model.num_layers):
        plan, _ = make_plan(req, "x", default_partition(req), layers, None, 0.0)
        found.append((plan.predicted.step_time_ms, max(plan.predicted.peak_memory_bytes)))
    return tuple(found)
