"""Move recompute tasks that still run on demand into windows the simulation shows idle.

After the knapsack and natural placement, some tasks have no window near them (the top layer
of a non-last stage) while RECV waits, pipeline bubbles and forward collectives of the
micro-batches in between sit idle. Each on-demand task goes to the latest idle window between
its forward and its backward that has room for all of it (latest = shortest time its tensors
are held); the simulator then judges the result, and the move set is kept only if it is faster
and still fits.
"""

from __future__ import annotations

from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.options import option_for
from lynxpipe.plan.recompute import TaskKey
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.policy import LayerPolicy, stage_layers
from lynxpipe.schedule.windows import FWD_COLL, RECV, is_planned
from lynxpipe.sim.result import SimResult

REPAIR_ROUNDS = 4


def _moves(req: PlanRequest, plan: Plan, sim: SimResult, kinds: set[str]) -> dict[TaskKey, Window]:
    """Greedy assignment of on-demand tasks to idle windows of the allowed kinds."""
    c = req.costs.contention
    spare: dict[Window, float] = {}
    for use in sim.windows:
        if use.window.kind in kinds:
            spare[use.window] = c * use.wait_ms - use.used_ms
    moves: dict[TaskKey, Window] = {}
    seg_ms: dict[LayerPolicy, dict[int, float]] = {}
    for actions in plan.order.ranks:
        index = {(a.kind, a.mb, a.stage): i for i, a in enumerate(actions) if a.kind != "R"}
        hosted = sorted(((index[w.host()], w) for w in spare if w.host() in index),
                        key=lambda iw: iw[0])
        for action in actions:
            if action.kind != "R" or action.segment < 0 or action.window is None \
                    or is_planned(action.window.kind):
                continue
            policy = plan.layers[action.layer]
            if policy not in seg_ms:
                seg_ms[policy] = option_for(req.costs.layer, policy).seg_ms
            ms = seg_ms[policy][action.segment]
            lo, hi = index[("F", action.mb, action.stage)], index[("B", action.mb, action.stage)]
            latest = _latest_with_room(hosted, lo, hi, spare, ms)
            if latest is not None:
                moves[(action.mb, action.layer, action.segment)] = latest
                spare[latest] -= ms
    return moves


def _latest_with_room(hosted: list[tuple[int, Window]], lo: int, hi: int,
                      spare: dict[Window, float], ms: float) -> Window | None:
    """The last window hosted strictly between action indices lo and hi with `ms` to spare."""
    for i, w in reversed(hosted):
        if i <= lo:
            return None
        if i < hi and spare[w] >= ms:
            return w
    return None


def _placement(plan: Plan) -> dict[TaskKey, Window]:
    return {(a.mb, a.layer, a.segment): a.window for r in plan.order.ranks for a in r
            if a.kind == "R" and a.window is not None and is_planned(a.window.kind)}


def refine(req: PlanRequest, plan: Plan, sim: SimResult) -> Plan:
    """Try moving on-demand tasks into RECV windows, then also forward windows; keep the best."""
    best = plan
    for kinds in ({RECV}, {RECV, FWD_COLL}):
        moves = _moves(req, plan, sim, kinds)
        if not moves:
            continue
        cand = _fitting(req, plan, moves, "/".join(sorted(kinds)))
        if cand is not None and cand.predicted.step_time_ms < best.predicted.step_time_ms - 1e-9:
            best = cand
    return best


def _fitting(req: PlanRequest, plan: Plan, moves: dict[TaskKey, Window],
             label: str) -> Plan | None:
    """Apply `moves`; where a rank then overshoots its budget, give back part of its moves
    (forward-window ones first: their tensors are held longest) and try again."""
    rank_of = {g: s % req.parallel.pp for s, rng in enumerate(stage_layers(plan.partition))
               for g in rng}
    for _ in range(REPAIR_ROUNDS):
        placement = {**_placement(plan), **moves}
        cand, _ = make_plan(req, plan.policy, plan.partition, plan.layers, placement,
                            plan.planner_ms, plan.mip_gap,
                            plan.notes + (f"{len(moves)} tasks moved into idle {label} windows",))
        over = {r for r, peak in enumerate(cand.predicted.peak_memory_bytes)
                if peak > req.budget_bytes}
        if not over:
            return cand
        for rank in over:
            mine = sorted((k for k in moves if rank_of[k[1]] == rank),
                          key=lambda k: (moves[k].kind != FWD_COLL, moves[k].mb))
            forward = [k for k in mine if moves[k].kind == FWD_COLL]
            for key in forward or mine[:max(1, len(mine) // 2)]:
                del moves[key]
        if not moves:
            return None
    return None
