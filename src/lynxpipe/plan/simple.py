"""Baseline policies with all recompute on demand: none, full (uniform/block), selective."""

from __future__ import annotations

import time

from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.partition import default_partition
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.policy import FULL, KEEP_ALL, LayerPolicy, stage_layers

SELECTIVE_TENSORS = frozenset({"probs", "probs_dropped"})
"""What selective drops from the analytic graph (`LayerGraph.attention_core`)."""


def _same_everywhere(req: PlanRequest, name: str, policy: LayerPolicy) -> Plan:
    """Every layer under one policy, on Megatron's uniform partition."""
    start = time.perf_counter()
    layers = (policy,) * req.model.num_layers
    return make_plan(req, name, default_partition(req), layers, None,
                     1e3 * (time.perf_counter() - start))[0]


def plan_none(req: PlanRequest) -> Plan:
    """Keep every activation."""
    return _same_everywhere(req, "none", KEEP_ALL)


def plan_full(req: PlanRequest) -> Plan:
    """Megatron full recompute, uniform: every layer keeps only its input."""
    return _same_everywhere(req, "full", FULL)


def plan_selective(req: PlanRequest) -> Plan:
    """Megatron selective recompute: the attention core (softmax, dropout) of every layer."""
    core = req.costs.layer.graph.attention_core()
    return _same_everywhere(req, "selective", LayerPolicy(dropped=core))


def plan_full_block(req: PlanRequest) -> Plan:
    """Megatron block recompute: the first k layers of each stage full, k minimal per stage.

    Each stage gets its own k (Megatron uses one k everywhere; a per-stage k is never worse, and
    baselines get every optimisation lynxpipe gets).
    """
    start = time.perf_counter()
    partition = default_partition(req)
    stages = stage_layers(partition)
    ks = [0] * len(stages)
    while True:
        layers = _block_layers(stages, ks)
        plan, sim = make_plan(req, "full-block", partition, layers, None, 0.0)
        over = [r.rank for r, peak in zip(sim.ranks, plan.predicted.peak_memory_bytes)
                if peak > req.budget_bytes]
        grow = [s for s in range(len(stages)) if s % req.parallel.pp in over
                and ks[s] < len(stages[s])]
        if not over or not grow:
            notes = (f"recompute-num-layers per stage: {ks}",)
            return make_plan(req, "full-block", partition, layers, None,
                             1e3 * (time.perf_counter() - start), notes=notes)[0]
        for s in grow:
            ks[s] += 1


def _block_layers(stages: list[range], ks: list[int]) -> tuple[LayerPolicy, ...]:
    out: list[LayerPolicy] = []
    for rng, k in zip(stages, ks):
        out += [FULL if i < k else KEEP_ALL for i in range(len(rng))]
    return tuple(out)
