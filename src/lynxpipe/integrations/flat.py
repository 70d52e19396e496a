"""A flat JSON listing of a plan for any other framework (`lynxpipe export --to json`).

    {"kind": "lynxpipe.flat", "version": 1,
     "tensors": [{"name", "bytes", "droppable", "producer"}],          # one layer's saved tensors
     "layers":  [{"layer", "stage", "rank", "full", "keep", "drop", "saved_bytes"}],
     "tasks":   [{"rank", "mb", "layer", "segment", "window", "kind", "before"}]}

`keep`/`drop` name the layer's saved tensors (as the layer graph names them; for a traced
block, as `lynxpipe profile --module` does); `saved_bytes` is what the layer holds from its
forward to its backward per micro-batch. A task regenerates the dropped tensors of (mb, layer,
segment; -1 the whole layer) in `window` (`on_demand`: right before the backward that needs
them), which opens during the action `before` of rank `rank`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lynxpipe.artifact import write_json_atomic
from lynxpipe.cost.graph import LayerGraph
from lynxpipe.plan.types import Plan
from lynxpipe.schedule.policy import stage_layers
from lynxpipe.schedule.windows import ON_DEMAND

FLAT_VERSION = 1


def layer_saved_bytes(graph: LayerGraph, full: bool, dropped: frozenset[str]) -> int:
    """Bytes a layer holds per micro-batch under a policy (full: only tensors no op of the
    layer produces, its input)."""
    if full:
        return sum(t.size_bytes for t in graph.tensors if not t.producer)
    return graph.saved_bytes(frozenset(t.name for t in graph.droppable()) - dropped)


def flat_listing(plan: Plan, graph: LayerGraph) -> dict[str, Any]:
    """The listing as a JSON-ready dict."""
    stage_of = {g: s for s, rng in enumerate(stage_layers(plan.partition)) for g in rng}
    names = [t.name for t in graph.tensors]
    layers = []
    for g, pol in enumerate(plan.layers):
        drop = set(names) - {t.name for t in graph.tensors if not t.producer} if pol.full \
            else set(pol.dropped)
        layers.append({"layer": g, "stage": stage_of[g], "rank": plan.order.rank_of(stage_of[g]),
                       "full": pol.full, "keep": [n for n in names if n not in drop],
                       "drop": [n for n in names if n in drop],
                       "saved_bytes": layer_saved_bytes(graph, pol.full, pol.dropped)})
    tasks = []
    for rank, actions in enumerate(plan.order.ranks):
        for i, a in enumerate(actions):
            if a.kind != "R":
                continue
            host = next((str(b) for b in actions[i + 1:] if b.kind != "R"), "")
            kind = a.window.kind if a.window else ON_DEMAND
            tasks.append({"rank": rank, "mb": a.mb, "layer": a.layer, "segment": a.segment,
                          "window": str(a.window) if a.window else ON_DEMAND, "kind": kind,
                          "before": host})
    return {"kind": "lynxpipe.flat", "version": FLAT_VERSION, "policy": plan.policy,
            "plan_fingerprint": plan.fingerprint, "partition": list(plan.partition),
            "tensors": [{"name": t.name, "bytes": t.size_bytes, "droppable": t.droppable,
                         "producer": t.producer} for t in graph.tensors],
            "layers": layers, "tasks": tasks}


def write_flat(path: str | Path, plan: Plan, graph: LayerGraph) -> Path:
    """Write the listing."""
    return write_json_atomic(path, flat_listing(plan, graph))
