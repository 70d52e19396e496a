"""Model FLOPs of a training step (recompute not counted), for throughput reporting."""

from __future__ import annotations

from lynxpipe.cost.graph import LayerGraph
from lynxpipe.cost.table import CostTable
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec


def graph_flops(graph: LayerGraph) -> float:
    """Forward + backward model FLOPs of one micro-batch through a layer graph (one TP rank);
    work a fused kernel recomputes inside its backward is not counted."""
    return sum(op.fwd_flops + op.dgrad_flops + op.wgrad_flops - op.kernel_recompute_flops
               for op in graph.ops)


def step_flops(costs: CostTable, model: ModelSpec, par: ParallelSpec) -> float:
    """FLOPs of one step over all devices: layers, embedding and head, for m*dp micro-batches."""
    per_mb = (model.num_layers * graph_flops(costs.layer.graph) + graph_flops(costs.embed.graph)
              + graph_flops(costs.head.graph)) * par.tp
    return per_mb * par.num_microbatches * par.dp


def narayanan_flops(model: ModelSpec, par: ParallelSpec) -> float:
    """72 B s l h^2 (1 + s/(6h) + V/(12 l h)): Narayanan et al. 2021 without recomputation."""
    batch = par.micro_batch_size * par.num_microbatches * par.dp
    s, layers, h, v = par.seq_len, model.num_layers, model.hidden_size, model.vocab_size
    return 72.0 * batch * s * layers * h * h * (1 + s / (6 * h) + v / (12 * layers * h))
