"""The steady-state period of one pipeline rank, as the exact MILPs (lynx-opt, checkmate) see it.

The period of a representative micro-batch j on a rank is what the rank runs after its previous
backward up to and including B(j) (1F1B, w = pp - r - 1: F(j + w) with its RECV/SEND, the
RECV_B wait of j, then B(j)). A layer's choices are keep/drop *points* per segment (or full
recompute); `LayerData` holds them with the layer's backward memory profile, `Period` the
windows of the period and how they map onto every micro-batch (in warm-up/cool-down a missing
window falls back to the RECV_B wait of the task's backward, else on demand).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lynxpipe.cost.memo import per_cost
from lynxpipe.cost.table import overlapped_collective
from lynxpipe.plan.finalize import base_order
from lynxpipe.plan.options import LayerOption, option_for
from lynxpipe.plan.types import PlanRequest
from lynxpipe.schedule.actions import Action, Window
from lynxpipe.schedule.policy import (
    FULL,
    FULL_SEGMENT,
    KEEP_ALL,
    LayerPolicy,
    stage_layers,
)
from lynxpipe.schedule.windows import FWD_COLL, RECV
from lynxpipe.sim.program import compile_program

Key = tuple
"""A window of the period: ("F", mb offset, unit, fwd step) | (RECV kind, mb offset) |
("B", unit, bwd step); unit = global layer, -1 embedding, num_layers head."""
NEVER = 1 << 30


@dataclass(frozen=True)
class Point:
    """One keep/drop choice of a segment (or full recompute, segment -1)."""

    dropped: frozenset[str]
    ms: float
    regen: int
    kept: int
    need: int  # backward step of the layer before which the task must have run


@dataclass(frozen=True)
class LayerData:
    """The choices of one (repeated) layer and its backward memory profile."""

    points: dict[int, tuple[Point, ...]]
    full: Point | None
    pinned: int               # non-droppable bytes
    saved: int                # bytes of a layer that keeps everything
    freed: tuple[int, ...]    # freed[k]: bytes released by backward steps before step k
    options: tuple[dict[int, int], ...] | None  # allowed point per segment, if not a product


def _need(cost, policy: LayerPolicy, seg: int) -> int:
    """Step whose `needs` list the segment, exactly as the simulator's program does."""
    return next(s.step for s in compile_program(cost, policy).bwd if seg in s.needs)


def layer_data(cost, options: list[LayerOption]) -> LayerData:
    """Per-segment points of `options` (Pareto per segment when they come from layer_options)."""
    graph = cost.graph
    seg_of = {t.name: t.segment for t in graph.droppable()}
    size = {t.name: t.size_bytes for t in graph.tensors}
    sets: dict[int, set[frozenset[str]]] = {s: set() for s in set(seg_of.values())}
    partial = [o.policy.dropped for o in options if not o.policy.full]
    for dropped in partial:
        for s, found in sets.items():
            found.add(frozenset(n for n in dropped if seg_of[n] == s))
    points = {}
    for s, found in sets.items():
        total = sum(size[n] for n in seg_of if seg_of[n] == s)
        points[s] = tuple(Point(d, cost.recompute_ms(d, s), sum(size[n] for n in d),
                                total - sum(size[n] for n in d),
                                _need(cost, LayerPolicy(d), s) if d else NEVER)
                          for d in sorted(found, key=lambda d: (len(d), sorted(d))))
    full = None
    if any(o.policy.full for o in options):
        fo = option_for(cost, FULL)
        full = Point(frozenset(), fo.seg_ms[-1], fo.seg_bytes[-1], fo.kept_bytes,
                     _need(cost, FULL, FULL_SEGMENT))
    acc = [0]
    for step in compile_program(cost, KEEP_ALL).bwd:
        acc.append(acc[-1] + step.free_bytes)
    allowed = None
    if len(partial) != int(np.prod([len(p) for p in points.values()])):
        index = {s: {pt.dropped: i for i, pt in enumerate(pts)} for s, pts in points.items()}
        allowed = tuple({s: index[s][frozenset(n for n in d if seg_of[n] == s)] for s in points}
                        for d in partial)
    return LayerData(points, full, graph.saved_bytes(frozenset()), graph.saved_bytes(),
                     tuple(acc), allowed)


@dataclass(frozen=True)
class Period:
    """The representative period of one rank and how it maps onto every micro-batch."""

    stage: int
    layers: tuple[int, ...]
    inflight: int                 # micro-batches held at B (each period is bounded with it)
    pre: tuple[Key, ...]          # windows before B(j) (their tensors are held at the peak)
    bwd: dict[Key, float]         # windows inside B(j) -> capacity (contention applied)
    fwd_cap: dict[tuple[int, int], float]  # (unit, fwd step) -> capacity
    order: dict[int, int]         # unit -> position in the backward walk (head first)
    hosts: dict[int, dict[Key, Window | None]]  # per micro-batch: where each pre window runs
    extras: tuple[int, int]       # embedding and head saved bytes per micro-batch
    buffer: int                   # gradient receive buffer, held from RECV_B(j) through B(j)
    head_freed: tuple[int, ...]
    base_ms: tuple[float, float]  # forward and backward of the stage without recompute


def _units(req: PlanRequest, partition: tuple[int, ...], stage: int) -> list:
    c, num = req.costs, req.model.num_layers
    units = [(-1, compile_program(c.embed, KEEP_ALL))] if stage == 0 else []
    layer = compile_program(c.layer, KEEP_ALL)
    units += [(g, layer) for g in stage_layers(partition)[stage]]
    if stage == len(partition) - 1:
        units.append((num, compile_program(c.head, KEEP_ALL)))
    return units


def _spans(actions: tuple[Action, ...]) -> dict[int, tuple[int, int]]:
    """Per micro-batch j: (lo, b) with the period's pre-region actions[lo+1:b], b = B(j)."""
    spans, f_at, last_b = {}, {}, -1
    for i, a in enumerate(actions):
        if a.kind == "F":
            f_at[a.mb] = i
        elif a.kind == "B":
            spans[a.mb] = (max(last_b, f_at[a.mb]), i)
            last_b = i
    return spans


def _pre_keys(actions, span, j, fwd_caps) -> list[Key]:
    keys: list[Key] = []
    for a in actions[span[0] + 1:span[1]]:
        if a.kind == "F":
            keys += [("F", a.mb - j, u, s) for (u, s) in fwd_caps]
        elif a.kind in ("RECV_F", "RECV_B"):
            keys.append((a.kind, a.mb - j))
    return keys


def _resolve(key: Key, j: int, index: dict, span, stage: int) -> Window | None:
    idx = index.get((key[0], j + key[1], stage))
    if idx is None or not span[0] < idx < span[1]:
        return None
    if key[0] == "F":
        return Window(FWD_COLL, j + key[1], stage, key[2], key[3])
    return Window(RECV, j + key[1], stage, recv=key[0])


def make_period(req: PlanRequest, partition: tuple[int, ...], rank: int,
                windows: bool = True) -> Period:
    """The period of `rank` (one stage per rank); without `windows` all recompute is on demand
    (then the MILP is an exact checkmate: least step time, memory as the simulator counts).

    Memoised per cost table (a lynx-heu run asks for the same periods from its checkmate
    candidates and its count programmes); the Period is frozen and shared.
    """
    key = ("period", req.parallel, req.model.num_layers, partition, rank, windows)
    return per_cost(req.costs, key, lambda: _make_period(req, partition, rank, windows))


def _make_period(req: PlanRequest, partition: tuple[int, ...], rank: int,
                 windows: bool) -> Period:
    c, actions = req.costs.contention, base_order(req).ranks[rank]
    units = _units(req, partition, rank)
    fwd_cap = {(u, s.step): s.coll_ms * c for u, p in units for s in p.fwd if s.coll_ms >= 0}
    bwd = {("B", u, s.step): overlapped_collective(s.overlap_ms, s.coll_ms, c)[1] * c
           for u, p in reversed(units) for s in p.bwd if s.coll_ms >= 0}
    spans, index = _spans(actions), {(a.kind, a.mb, a.stage): i for i, a in enumerate(actions)}
    held, live = [], 0
    for a in actions:
        held.append(live)
        live += (a.kind == "F") - (a.kind == "B")

    def shape(j: int) -> tuple:
        return tuple((a.kind, a.mb - j) for a in actions[spans[j][0] + 1:spans[j][1]])

    # the steady state is the most common shape of the pre-region (1F1B: RECV_F, F(j + w),
    # SEND_F, RECV_B(j)); warm-up and cool-down are mapped onto it
    count: dict[tuple, int] = defaultdict(int)
    for j in spans:
        count[shape(j)] += 1
    top = max(count, key=lambda sh: (count[sh], len(sh)))
    steady = [j for j in sorted(spans) if shape(j) == top]
    rep = steady[len(steady) // 2]
    pre = [k for k in _pre_keys(actions, spans[rep], rep, fwd_cap)
           if windows and (k[0] != "F" or fwd_cap[k[2:]] > 0)]
    hosts = {j: {k: _resolve(k, j, index, span, rank)
                 or _resolve(("RECV_B", 0), j, index, span, rank) for k in pre}
             for j, span in spans.items()}
    head = compile_program(req.costs.head, KEEP_ALL)
    sync = req.costs.tp_sync_ms  # every TP collective's wait for the last rank, as simulated
    base = (sum(s.compute_ms + (s.coll_ms + sync if s.coll_ms >= 0 else 0.0)
                for _, p in units for s in p.fwd),
            sum(s.compute_ms + (sum(overlapped_collective(s.overlap_ms, s.coll_ms, c)) + sync
                                if s.coll_ms >= 0 else 0.0) for _, p in units for s in p.bwd))
    # copies held at B: the most of any micro-batch (1F1B: w + 1; GPipe: m at B(0))
    return Period(rank, tuple(stage_layers(partition)[rank]),
                  max(held[b] for _, b in spans.values()),
                  tuple(pre), {k: v for k, v in bwd.items() if v > 0 and windows}, fwd_cap,
                  {u: i for i, (u, _) in enumerate(reversed(units))}, hosts,
                  (req.costs.embed.graph.saved_bytes() if rank == 0 else 0,
                   head.kept_bytes if rank == len(partition) - 1 else 0),
                  req.costs.grad_buffer_bytes if rank < len(partition) - 1 else 0,
                  tuple(np.cumsum([0] + [s.free_bytes for s in head.bwd]).tolist()), base)
