"""Per-layer recomputation options: every keep/drop choice, pruned to the Pareto frontier.

A layer's droppable tensors split by segment; segments recompute independently, so the options
of a layer are the product of per-segment Pareto-optimal subsets (no smaller kept bytes at no
larger recompute time), plus Megatron-style full recompute.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lynxpipe.cost.memo import per_cost
from lynxpipe.cost.table import LayerCost
from lynxpipe.schedule.policy import FULL, LayerPolicy


@dataclass(frozen=True)
class LayerOption:
    """One way to treat a layer, with its memory and per-segment recompute costs."""

    policy: LayerPolicy
    """The keep/drop decision."""
    kept_bytes: int
    """Bytes held per micro-batch from forward to backward."""
    seg_ms: dict[int, float]
    """Recompute time per segment that has dropped tensors (-1: full with replay)."""
    seg_bytes: dict[int, int]
    """Bytes regenerated per segment (held from the recompute until the backward)."""

    @property
    def total_ms(self) -> float:
        """Recompute time of the whole layer."""
        return sum(self.seg_ms.values())

    @property
    def regen_bytes(self) -> int:
        """Bytes regenerated in all."""
        return sum(self.seg_bytes.values())


EXACT_FRONTIER_TENSORS = 10
"""Segments with up to this many droppable tensors get every subset tried (the analytic layer
has at most 8); a traced block's segment may hold dozens, and gets the greedy chain."""


def _subsets(names: list[str]) -> list[frozenset[str]]:
    return [frozenset(c) for r in range(len(names) + 1)
            for c in itertools.combinations(names, r)]


def _greedy_chain(cost: LayerCost, segment: int, names: list[str]) -> list[frozenset[str]]:
    """Nested drop sets, each adding the tensor that frees the most bytes per extra recompute
    millisecond (shared producers make the next tensor of a group nearly free)."""
    size = {t.name: t.size_bytes for t in cost.graph.tensors}
    chain, dropped = [frozenset()], frozenset()
    base = 0.0
    left = set(names)
    while left:
        def gain(n: str) -> tuple[float, str]:
            extra = cost.recompute_ms(dropped | {n}, segment) - base
            return (size[n] / max(extra, 1e-12), n)
        best = max(left, key=gain)
        dropped = dropped | {best}
        base = cost.recompute_ms(dropped, segment)
        left.discard(best)
        chain.append(dropped)
    return chain


def _segment_frontier(cost: LayerCost, segment: int) -> list[tuple[frozenset[str], float, int]]:
    """Pareto-optimal (dropped set, recompute ms, kept bytes) of one segment: over every subset
    of its droppable tensors, or over the greedy chain when there are too many to try."""
    names = [t.name for t in cost.graph.droppable() if t.segment == segment]
    size = {t.name: t.size_bytes for t in cost.graph.tensors}
    total = sum(size[n] for n in names)
    sets = (_subsets(names) if len(names) <= EXACT_FRONTIER_TENSORS
            else _greedy_chain(cost, segment, names))
    points = [(d, cost.recompute_ms(d, segment), total - sum(size[n] for n in d)) for d in sets]
    points.sort(key=lambda p: (p[2], p[1]))
    frontier: list[tuple[frozenset[str], float, int]] = []
    for point in points:
        if not frontier or point[1] < frontier[-1][1] - 1e-12:
            frontier.append(point)
    return frontier


def option_for(cost: LayerCost, policy: LayerPolicy) -> LayerOption:
    """Costs of an arbitrary policy."""
    graph = cost.graph
    if policy.full:
        kept = sum(t.size_bytes for t in graph.tensors if not t.producer)
        return LayerOption(policy, kept, {-1: cost.fwd_ms() + cost.fwd_coll_ms()},
                           {-1: graph.saved_bytes() - kept})
    seg_ms, seg_bytes = {}, {}
    for seg in sorted({graph.tensor(n).segment for n in policy.dropped}):
        names = frozenset(n for n in policy.dropped if graph.tensor(n).segment == seg)
        seg_ms[seg] = cost.recompute_ms(names, seg)
        seg_bytes[seg] = sum(graph.tensor(n).size_bytes for n in names)
    return LayerOption(policy, graph.saved_bytes(frozenset(
        t.name for t in graph.droppable() if t.name not in policy.dropped)), seg_ms, seg_bytes)


def layer_options(cost: LayerCost, with_full: bool = True) -> list[LayerOption]:
    """All segment-wise Pareto combinations (+ full), sorted by kept bytes descending
    (memoised per cost object: every planner and candidate of a run asks for them)."""
    return list(per_cost(cost, ("layer_options", with_full),
                         lambda: _layer_options(cost, with_full)))


def _layer_options(cost: LayerCost, with_full: bool) -> list[LayerOption]:
    segments = sorted({t.segment for t in cost.graph.droppable()})
    per_seg = [_segment_frontier(cost, s) for s in segments]
    options = []
    for combo in itertools.product(*per_seg):
        dropped = frozenset().union(*(c[0] for c in combo)) if combo else frozenset()
        options.append(option_for(cost, LayerPolicy(dropped)))
    if with_full:
        options.append(option_for(cost, FULL))
    options.sort(key=lambda o: (-o.kept_bytes, o.total_ms))
    return options


def pareto(options: list[LayerOption], cost_of) -> list[LayerOption]:
    """Options not dominated in (kept bytes, cost_of(option))."""
    ranked = sorted(options, key=lambda o: (o.kept_bytes, cost_of(o)))
    out: list[LayerOption] = []
    for opt in ranked:
        if not out or cost_of(opt) < cost_of(out[-1]) - 1e-12:
            out.append(opt)
    return out
