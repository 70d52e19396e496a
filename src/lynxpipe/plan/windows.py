"""Static windows of a stage's backward: where each layer's recompute naturally hides.

Walking a stage's backward from the top, a layer's segment is needed at the first backward step
that reads one of its droppable tensors; its *natural slot* is the last backward-collective
window before that point (for an interior layer: the input-gradient all-reduce of the layer
above, or of its own MLP for the attention segment — SPEC §4).
"""

from __future__ import annotations

from dataclasses import dataclass

from lynxpipe.cost.table import CostTable, LayerCost, overlapped_collective
from lynxpipe.plan.options import LayerOption


@dataclass(frozen=True)
class Slot:
    """A backward-collective window of a stage, identified relative to the stage."""

    host: int
    """Global layer index of the unit hosting the collective (num_layers for the head)."""
    step: int
    """Index of the collective step in the host's backward program."""
    capacity_ms: float
    """Idle time of the window (collective minus the compute it overlaps)."""


def need_steps(cost: LayerCost) -> dict[int, int]:
    """Backward step index at which each segment's droppable tensors are first read."""
    graph = cost.graph
    step_of: dict[str, int] = {}
    for idx, step in enumerate(graph.bwd_steps):
        for op in step.ops:
            step_of.setdefault(op, idx)
    need: dict[int, int] = {}
    for t in graph.droppable():
        first = min(step_of[o] for o in t.used_by)
        need[t.segment] = min(need.get(t.segment, first), first)
    return need


def _windows(cost: LayerCost, host: int, contention: float) -> list[tuple[int, Slot]]:
    """(step index, slot) of every backward collective window of a unit."""
    out = []
    for idx, step in enumerate(cost.graph.bwd_steps):
        if step.kind == "coll":
            overlap = cost.part_ms(step.ops, step.part)
            left = overlapped_collective(overlap, cost.coll_ms[step.coll], contention)[1]
            out.append((idx, Slot(host, idx, left)))
    return out


def natural_slots(costs: CostTable, layers: range | list[int], has_head: bool,
                  num_layers: int) -> dict[tuple[int, int], Slot]:
    """Natural slot of every (layer, segment) of a stage; segments without one are absent.

    The segment needed last takes the latest free window before its need point, so segments
    spread over distinct windows; when none is free the latest window is shared.
    """
    need = need_steps(costs.layer)
    slots: dict[tuple[int, int], Slot] = {}
    head = _windows(costs.head, num_layers, costs.contention) if has_head else []
    seen: list[Slot] = [w for _, w in head]
    claimed: set[Slot] = set()
    for layer in reversed(list(layers)):
        windows = _windows(costs.layer, layer, costs.contention)
        for seg, at in sorted(need.items(), key=lambda kv: -kv[1]):
            before = seen + [slot for idx, slot in windows if idx < at]
            free = [slot for slot in before if slot not in claimed]
            chosen = free[-1] if free else (before[-1] if before else None)
            if chosen is not None:
                slots[(layer, seg)] = chosen
                claimed.add(chosen)
        seen += [slot for _, slot in windows]
    return slots


def exposure(option: LayerOption, slots: dict[int, Slot], contention: float) -> float:
    """Exposed recompute of one layer's tasks placed in their natural windows (per mb)."""
    load: dict[Slot, float] = {}
    exposed = 0.0
    for seg, ms in option.seg_ms.items():
        slot = slots.get(seg) if seg >= 0 else None
        if slot is None:
            exposed += ms
        else:
            load[slot] = load.get(slot, 0.0) + ms
    for slot, ms in load.items():
        exposed += max(0.0, ms - contention * slot.capacity_ms)
    return exposed
