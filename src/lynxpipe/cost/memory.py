"""Per-rank memory bookkeeping shared by the planners: static state, in-flight micro-batches
and the activation budget left for each pipeline rank (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

from lynxpipe.cost.table import CostTable
from lynxpipe.schedule.actions import PipelineOrder
from lynxpipe.schedule.policy import stage_layers
from lynxpipe.schedule.validate import inflight_peak


def rank_params(costs: CostTable, partition: tuple[int, ...], pp: int, rank: int) -> int:
    """Parameters a pipeline rank holds (one TP shard): its layers, embedding / tied head."""
    params = 0
    for stage in range(rank, len(partition), pp):
        params += partition[stage] * costs.layer_params
        if stage in (0, len(partition) - 1):
            params += costs.embed_params
    return params


def static_bytes(costs: CostTable, partition: tuple[int, ...], pp: int, rank: int) -> int:
    """Weights, gradients and optimizer state of a rank, and the receive buffer it posts ahead
    (`CostTable.recv_ahead`; with one stage nothing is received)."""
    ahead = costs.grad_buffer_bytes if costs.recv_ahead and pp > 1 else 0
    return int(rank_params(costs, partition, pp, rank) * costs.bytes_per_param) + ahead


@dataclass(frozen=True)
class RankBudget:
    """What one pipeline rank may spend on activations, and how many copies it holds."""

    rank: int
    """Pipeline rank."""
    layers: tuple[int, ...]
    """Global layer indices hosted by the rank."""
    inflight: float
    """Micro-batches of each layer held at the peak (in-flight (mb, chunk) pairs / chunks)."""
    extras_bytes: int
    """Embedding / head activations held at the peak."""
    activation_bytes: int
    """Budget minus static state, reserve and extras: what layer activations may use."""
    transient_credit: int = 0
    """Bytes already freed when the first layer recompute of a backward runs (the LM head's
    tensors of that micro-batch, on the last stage)."""


def rank_budgets(costs: CostTable, partition: tuple[int, ...], order: PipelineOrder,
                 budget_bytes: int, reserve_bytes: int) -> list[RankBudget]:
    """Activation budget of every pipeline rank under `order`."""
    stages = stage_layers(partition)
    peaks = inflight_peak(order)
    out = []
    for rank in range(order.pp):
        mine = [s for s in range(len(partition)) if s % order.pp == rank]
        inflight = peaks[rank] / len(mine)
        extras = 0
        if 0 in mine:
            extras += costs.embed.graph.saved_bytes()
        if len(partition) - 1 in mine:
            extras += costs.head.graph.saved_bytes()
        extras = int(extras * inflight)
        if mine != [len(partition) - 1]:  # a gradient receive buffer is held during B
            extras += costs.grad_buffer_bytes
        left = (budget_bytes - reserve_bytes - static_bytes(costs, partition, order.pp, rank)
                - extras)
        credit = costs.head.graph.saved_bytes() if len(partition) - 1 in mine else 0
        out.append(RankBudget(rank, tuple(g for s in mine for g in stages[s]), inflight,
                              extras, left, credit))
    return out
