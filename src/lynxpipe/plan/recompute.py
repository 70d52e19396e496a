"""Turn recompute placements into R actions inside a pipeline order (SPEC §4)."""

from __future__ import annotations

import functools

from lynxpipe.cost.graph import LayerGraph
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.policy import LayerPolicy, stage_layers
from lynxpipe.schedule.windows import ON_DEMAND as ON_DEMAND_KIND

TaskKey = tuple[int, int, int]
"""(micro-batch, global layer, segment)."""

ON_DEMAND = Window(ON_DEMAND_KIND)


def required_tasks(graph: LayerGraph, layers: tuple[LayerPolicy, ...],
                   num_microbatches: int) -> list[TaskKey]:
    """Every recompute task the policies imply, one per (micro-batch, layer, segment)."""
    segments: dict[LayerPolicy, list[int]] = {}  # a stage's layers mostly share policies
    per_layer: list[list[int]] = []
    for pol in layers:
        if pol not in segments:
            segments[pol] = [-1] if pol.full else sorted({graph.tensor(n).segment
                                                           for n in pol.dropped})
        per_layer.append(segments[pol])
    return [(mb, layer, seg) for mb in range(num_microbatches)
            for layer, segs in enumerate(per_layer) for seg in segs]


@functools.lru_cache(maxsize=1 << 16)
def _r_action(mb: int, stage: int, layer: int, segment: int, window: Window) -> Action:
    """An R action, shared across the orders of a planner run (Action is frozen; building
    one cost more than the rest of inserting it)."""
    return Action("R", mb, stage, layer, segment, window)


def insert_recompute(order: PipelineOrder, partition: tuple[int, ...], graph: LayerGraph,
                     layers: tuple[LayerPolicy, ...],
                     placement: dict[TaskKey, Window]) -> PipelineOrder:
    """Insert an R action before the action hosting each task's window (on demand: before B)."""
    stage_of = {g: s for s, rng in enumerate(stage_layers(partition)) for g in rng}
    by_host: dict[tuple[str, int, int], list[Action]] = {}
    for key in required_tasks(graph, layers, order.num_microbatches):
        mb, layer, seg = key
        window = placement.get(key, ON_DEMAND)
        host = window.host() or ("B", mb, stage_of[layer])
        by_host.setdefault(host, []).append(_r_action(mb, stage_of[layer], layer, seg, window))
    ranks = []
    for actions in order.ranks:
        out: list[Action] = []
        for action in actions:
            out.extend(by_host.pop((action.kind, action.mb, action.stage), []))
            out.append(action)
        ranks.append(tuple(out))
    if by_host:
        host = next(iter(by_host))
        raise ValueError(f"recompute window host {host} is not in the pipeline order")
    return PipelineOrder(order.schedule, order.pp, order.virtual_stages, order.num_microbatches,
                         tuple(ranks))
