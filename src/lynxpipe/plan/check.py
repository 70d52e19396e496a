"""Semantic checks of a Plan read from plan.json, shared by `simulate`, `compare` and `train`.

`load_plan` checks types and the fingerprint; a plan can still be impossible after a hand edit
(and re-fingerprinting): a dropped tensor the layer does not save, a stage without layers, a
micro-batch past the last, a window the schedule never opens. Each is refused here, in one
line naming the plan, the entry and the rule, before anything is simulated or launched.
"""

from __future__ import annotations

from lynxpipe.checks import integer, number
from lynxpipe.cost.graph import LayerGraph
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.schedule.actions import Action
from lynxpipe.schedule.policy import FULL_SEGMENT
from lynxpipe.schedule.validate import validate_order
from lynxpipe.schedule.windows import WINDOW_KINDS
from lynxpipe.specs import validate_layout
from lynxpipe.units import MAX_BYTES

_REGENERATE = "regenerate it with `lynxpipe plan`"


def check_plan(plan: Plan, costs: CostTable, where: str) -> None:
    """Raise LynxError on the first rule `plan` breaks; `costs` holds the graphs it runs on."""
    validate_layout(plan.model, plan.cluster, plan.parallel)
    integer(plan.budget_bytes, f"{where}: budget_bytes", 1, MAX_BYTES)
    integer(plan.reserve_bytes, f"{where}: reserve_bytes", 0, plan.budget_bytes - 1)
    number(plan.time_limit_s, f"{where}: time_limit_s", 0.0, lo_open=True)
    _check_layers(plan, costs.layer.graph, where)
    _check_partition(plan, where)
    _check_order(plan, costs, where)


def _check_partition(plan: Plan, where: str) -> None:
    stages, layers = plan.parallel.num_chunks, plan.model.num_layers
    if len(plan.partition) != stages:
        raise LynxError(f"{where}: partition {tuple(plan.partition)} has {len(plan.partition)} "
                        f"stages, the layout (pp={plan.parallel.pp} x virtual_stages="
                        f"{plan.parallel.virtual_stages}) has {stages}; {_REGENERATE}")
    empty = [s for s, n in enumerate(plan.partition) if n < 1]
    if empty:
        raise LynxError(f"{where}: partition {tuple(plan.partition)} gives stage {empty[0]} "
                        f"{plan.partition[empty[0]]} layers; every stage needs at least one")
    if sum(plan.partition) != layers:
        raise LynxError(f"{where}: partition {tuple(plan.partition)} covers "
                        f"{sum(plan.partition)} layers, {plan.model.name} has {layers}; "
                        f"{_REGENERATE}")


def _check_layers(plan: Plan, graph: LayerGraph, where: str) -> None:
    if len(plan.layers) != plan.model.num_layers:
        raise LynxError(f"{where}: the plan has {len(plan.layers)} layer policies, "
                        f"{plan.model.name} has {plan.model.num_layers} layers; {_REGENERATE}")
    saved = {t.name: t for t in graph.tensors}
    droppable = sorted(t.name for t in graph.tensors if t.droppable)
    for i, policy in enumerate(plan.layers):
        if policy.full and policy.dropped:
            raise LynxError(f"{where}: layer {i} is both full recompute and drops "
                            f"{', '.join(sorted(policy.dropped))}; give one or the other")
        for name in sorted(policy.dropped):
            if name not in saved:
                raise LynxError(f"{where}: layer {i} drops {name!r}, which the layer does not "
                                f"save; droppable tensors: {', '.join(droppable)}")
            if not saved[name].droppable:
                raise LynxError(f"{where}: layer {i} drops {name!r}, which cannot be dropped "
                                f"(it is the layer input or a collective's output, kept so "
                                f"that recompute never replays a collective); droppable "
                                f"tensors: {', '.join(droppable)}")


def _check_order(plan: Plan, costs: CostTable, where: str) -> None:
    order, par = plan.order, plan.parallel
    shape = {"schedule": (order.schedule, par.schedule), "pp": (order.pp, par.pp),
             "virtual_stages": (order.virtual_stages, par.virtual_stages),
             "num_microbatches": (order.num_microbatches, par.num_microbatches)}
    for key, (got, want) in shape.items():
        if got != want:
            raise LynxError(f"{where}: order.{key}={got!r} but the plan's layout has "
                            f"{key}={want!r}; {_REGENERATE}")
    try:
        validate_order(order, tuple(plan.partition))
        for actions in order.ranks:
            for a in actions:
                if a.kind == "R":
                    _check_task(plan, costs, a)
    except LynxError as exc:
        raise LynxError(f"{where}: order: {exc}") from None


def _check_task(plan: Plan, costs: CostTable, a: Action) -> None:
    """An R regenerates what its layer drops, in a window its host's program opens."""
    policy = plan.layers[a.layer]  # validate_order checked the layer exists
    graph = costs.layer.graph
    if a.segment == FULL_SEGMENT:
        if not policy.full:
            raise LynxError(f"{a}: layer {a.layer} is not a full-recompute layer")
    elif policy.full or not any(graph.tensor(n).segment == a.segment for n in policy.dropped):
        raise LynxError(f"{a}: layer {a.layer} drops nothing in segment {a.segment}")
    w = a.window
    info = WINDOW_KINDS[w.kind] if w is not None else None
    if w is None or info is None or not info.in_layer:
        return
    if not -1 <= w.layer <= plan.model.num_layers:
        raise LynxError(f"{a}: window layer {w.layer} is outside -1 (embedding) .. "
                        f"{plan.model.num_layers} (LM head)")
    host = (costs.embed.graph if w.layer == -1 else costs.head.graph
            if w.layer == plan.model.num_layers else graph)
    steps = host.fwd_steps if info.host == "F" else host.bwd_steps
    if not (0 <= w.step < len(steps) and steps[w.step].kind == "coll"):
        colls = [i for i, s in enumerate(steps) if s.kind == "coll"]
        raise LynxError(f"{a}: step {w.step} of that program is not a collective, so the "
                        f"window never opens; its collectives are steps "
                        f"{', '.join(map(str, colls)) or '(none)'}")
