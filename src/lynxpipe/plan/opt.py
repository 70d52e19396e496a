"""`lynx-opt` (SPEC §5): a MILP per pipeline rank over one steady-state period of its timeline.

The period of a representative micro-batch j on a rank is what the rank runs after its previous
backward up to and including B(j) (1F1B, w = pp - r - 1: RECV_F/F of j + w, the RECV_B wait of
j, then B(j)). Every layer picks one keep/drop point per segment (or full recompute) and every
recompute task a window of that period, or on demand. The objective is the exposed recompute of
the whole step with that placement replicated to every micro-batch (RECV waits differ per
micro-batch; where a window does not exist, in warm-up/cool-down, the task falls back to the
RECV_B wait of its backward or runs on demand); memory is bounded at every allocation event of
the period the way the simulator counts it. RECV capacities come from a simulation, so the
solve is repeated with the waits of its own plan; the simulator judges, and the fastest fitting
plan among the MILP's, lynx-heu's, checkmate's and full's is returned.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from lynxpipe.plan.checkmate import plan_checkmate, plan_checkmate_on, tighten_loop
from lynxpipe.plan.finalize import base_order
from lynxpipe.plan.memory import RankBudget
from lynxpipe.plan.options import LayerOption, layer_options, option_for
from lynxpipe.plan.policy import FULL, KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.simple import default_partition, plan_full
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Action, Window
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.program import FULL_SEGMENT, compile_program
from lynxpipe.sim.result import SimResult

Key = tuple
"""A window of the period: ("F", mb offset, unit, fwd step) | (RECV kind, mb offset) |
("B", unit, bwd step); unit = global layer, -1 embedding, num_layers head."""
F_REACH = 1   # forward windows of layers within this distance (all are alike for memory)
B_REACH = 2   # backward windows of up to this many layers above (longer = held across more)
ROUNDS = 3    # re-solves with the RECV waits of the previous plan
EPS = 1e-4    # weight of total recompute: among equal exposure, recompute (and drop) less
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
    freed: tuple[int, ...]    # freed[k]: bytes released by backward steps before step k
    options: tuple[frozenset[str], ...] | None  # allowed drop sets when not a full product


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
        for s in sets:
            sets[s].add(frozenset(n for n in dropped if seg_of[n] == s))
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
    product = len(partial) == int(np.prod([len(p) for p in points.values()]))
    return LayerData(points, full, graph.saved_bytes(frozenset()), tuple(acc),
                     None if product else tuple(partial))


@dataclass(frozen=True)
class Period:
    """The representative period of one rank and how it maps onto every micro-batch."""

    stage: int
    layers: tuple[int, ...]
    inflight: int                 # micro-batches held at the end of the period's pre-region
    inflight_max: int
    pre: tuple[Key, ...]          # windows before B(j) (their tensors are held at the peak)
    bwd: dict[Key, float]         # windows inside B(j) -> capacity
    order: dict[int, int]         # unit -> position in the backward walk (head first)
    groups: dict[tuple[tuple[Key, ...], float], int]  # (keys sharing a window, cap) -> count
    od_weight: dict[Key, int]     # micro-batches where a pre window has no host
    hosts: dict[int, dict[Key, Window | None]]
    extras: tuple[int, int]       # embedding and head saved bytes per micro-batch
    head_freed: tuple[int, ...]


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
        return Window("fwd_coll", j + key[1], stage, key[2], key[3])
    return Window("recv", j + key[1], stage, recv=key[0])


def make_period(req: PlanRequest, partition: tuple[int, ...], rank: int,
                waits: dict[tuple[str, int], float]) -> Period:
    """The period of `rank` (one stage per rank) with RECV waits taken from a simulation."""
    c, actions = req.costs.contention, base_order(req).ranks[rank]
    units = _units(req, partition, rank)
    fwd_caps = {(u, s.step): s.coll_ms * c for u, p in units for s in p.fwd if s.coll_ms >= 0}
    bwd = {("B", u, s.step): max(0.0, s.coll_ms - s.overlap_ms) * c
           for u, p in reversed(units) for s in p.bwd if s.coll_ms >= 0}
    spans, index = _spans(actions), {(a.kind, a.mb, a.stage): i for i, a in enumerate(actions)}
    held, live = [], 0
    for a in actions:
        held.append(live)
        live += (a.kind == "F") - (a.kind == "B")
    ranked = sorted(spans, key=lambda j: (len(_pre_keys(actions, spans[j], j, fwd_caps)),
                                          held[spans[j][1]]))
    best = [j for j in ranked if (len(_pre_keys(actions, spans[j], j, fwd_caps)),
                                  held[spans[j][1]]) == (len(_pre_keys(
                                      actions, spans[ranked[-1]], ranked[-1], fwd_caps)),
                                      held[spans[ranked[-1]][1]])]
    rep = best[len(best) // 2]

    def cap(w: Window) -> float:
        if w.kind == "fwd_coll":
            return fwd_caps[(w.layer, w.step)]
        return waits.get((w.recv, w.mb), 0.0) * c

    pre = _pre_keys(actions, spans[rep], rep, fwd_caps)
    hosts: dict[int, dict[Key, Window | None]] = {}
    groups: dict[tuple[tuple[Key, ...], float], int] = defaultdict(int)
    od_weight: dict[Key, int] = defaultdict(int)
    useful: set[Key] = set()
    for j, span in spans.items():
        hosts[j], shared = {}, defaultdict(list)
        for key in pre:
            w = (_resolve(key, j, index, span, rank)
                 or _resolve(("RECV_B", 0), j, index, span, rank))
            hosts[j][key] = w
            if w is None:
                od_weight[key] += 1
            else:
                shared[w].append(key)
                if cap(w) > 0:
                    useful.add(key)
        for w, keys in shared.items():
            groups[(tuple(keys), cap(w))] += 1
    for key, cap_ms in bwd.items():
        groups[((key,), cap_ms)] += len(spans)
    head = compile_program(req.costs.head, KEEP_ALL)
    return Period(rank, tuple(stage_layers(partition)[rank]), held[spans[rep][1]], max(held),
                  tuple(k for k in pre if k in useful), {k: v for k, v in bwd.items() if v > 0},
                  {u: i for i, (u, _) in enumerate(reversed(units))}, dict(groups),
                  dict(od_weight), hosts,
                  (req.costs.embed.graph.saved_bytes() if rank == 0 else 0,
                   head.kept_bytes if rank == len(partition) - 1 else 0),
                  tuple(np.cumsum([0] + [s.free_bytes for s in head.bwd]).tolist()))
