"""Compile a layer's op graph + times + policy into flat step lists the simulator runs fast."""

from __future__ import annotations

from dataclasses import dataclass

from lynxpipe.cost.memo import per_cost
from lynxpipe.cost.table import LayerCost
from lynxpipe.schedule.policy import FULL_SEGMENT, LayerPolicy


@dataclass(frozen=True)
class FwdStep:
    """Forward: compute `compute_ms` then, if `coll_ms` >= 0, block on a collective."""

    compute_ms: float
    """Compute before the collective."""
    alloc_bytes: int
    """Saved bytes that become held during this compute."""
    coll_ms: float
    """Blocking collective time, or -1 when the step has none."""
    step: int
    """Index of the collective step in the layer's fwd program (window id), or -1."""


@dataclass(frozen=True)
class BwdStep:
    """Backward: recompute `needs` if not done, compute, then optionally a collective window."""

    needs: tuple[int, ...]
    """Segments whose recompute must have finished before this step starts."""
    compute_ms: float
    """Compute on the critical path before the collective (or the whole step)."""
    overlap_ms: float
    """Compute running concurrently with the collective."""
    coll_ms: float
    """Collective time (-1: no collective)."""
    free_bytes: int
    """Bytes released after the step (tensors whose last use is here)."""
    step: int
    """Index of this step in the layer's bwd program (a window id when it has a collective)."""


@dataclass(frozen=True)
class Task:
    """Recompute task of one segment (or the whole layer) of a layer."""

    duration_ms: float
    """Compute time (plus replayed collectives for full recompute)."""
    alloc_bytes: int
    """Bytes the regenerated tensors occupy until their backward."""


@dataclass(frozen=True)
class Program:
    """A layer under a policy, ready to simulate."""

    fwd: tuple[FwdStep, ...]
    """Forward steps."""
    bwd: tuple[BwdStep, ...]
    """Backward steps."""
    tasks: dict[int, Task]
    """Recompute tasks by segment (FULL_SEGMENT for Megatron full)."""
    kept_bytes: int
    """Bytes held per micro-batch between this layer's forward and backward."""


def compile_program(cost: LayerCost, policy: LayerPolicy) -> Program:
    """Flatten `cost` under `policy` into forward/backward steps and recompute tasks.

    Memoised per (cost object, policy) (`cost.memo`: a planner run simulates tens of plans over
    the same LayerCost, and compiling dominated simulator set-up). The Program is shared, so
    callers must not mutate it.
    """
    return per_cost(cost, ("program", policy), lambda: _compile(cost, policy))


def _compile(cost: LayerCost, policy: LayerPolicy) -> Program:
    graph = cost.graph
    if policy.full:
        kept = {t.name for t in graph.tensors if not t.producer}
    else:
        kept = {t.name for t in graph.tensors if t.name not in policy.dropped}
    fwd = _fwd_steps(cost, kept)
    tasks: dict[int, Task] = {}
    if policy.full:
        regen = sum(t.size_bytes for t in graph.tensors if t.name not in kept)
        tasks[FULL_SEGMENT] = Task(cost.fwd_ms() + cost.fwd_coll_ms(), regen)
    else:
        for seg in sorted({graph.tensor(n).segment for n in policy.dropped}):
            names = frozenset(n for n in policy.dropped if graph.tensor(n).segment == seg)
            tasks[seg] = Task(cost.recompute_ms(names, seg),
                              sum(graph.tensor(n).size_bytes for n in names))
    bwd = _bwd_steps(cost, tasks)
    kept_bytes = sum(t.size_bytes for t in graph.tensors if t.name in kept)
    return Program(tuple(fwd), tuple(bwd), tasks, kept_bytes)


def _fwd_steps(cost: LayerCost, kept: set[str]) -> list[FwdStep]:
    graph = cost.graph
    produced_by: dict[str, int] = {}
    for t in graph.tensors:
        if t.name in kept:
            op = t.producer or t.last_use  # the layer input is held from the op that reads it
            produced_by[op] = produced_by.get(op, 0) + t.size_bytes
    steps: list[FwdStep] = []
    ms, alloc = 0.0, 0
    for idx, step in enumerate(graph.fwd_steps):
        if step.kind == "compute":
            ms += sum(cost.op_ms[o].fwd_ms for o in step.ops)
            alloc += sum(produced_by.get(o, 0) for o in step.ops)
        else:
            steps.append(FwdStep(ms, alloc, cost.coll_ms[step.coll], idx))
            ms, alloc = 0.0, 0
    if ms or alloc or not steps:
        steps.append(FwdStep(ms, alloc, -1.0, -1))
    return steps


def _need_ops(cost: LayerCost, tasks: dict[int, Task]) -> dict[str, set[int]]:
    """For each op, the task segments whose tensors its backward reads."""
    graph = cost.graph
    need: dict[str, set[int]] = {}
    for t in graph.tensors:
        seg = FULL_SEGMENT if FULL_SEGMENT in tasks else t.segment
        if seg in tasks and (seg == FULL_SEGMENT or t.droppable):
            for op in t.used_by:
                need.setdefault(op, set()).add(seg)
    return need


def _bwd_steps(cost: LayerCost, tasks: dict[int, Task]) -> list[BwdStep]:
    graph = cost.graph
    free_at: dict[str, int] = {}
    for t in graph.tensors:
        free_at[t.last_use] = free_at.get(t.last_use, 0) + t.size_bytes
    need_ops = _need_ops(cost, tasks)
    pending = set(tasks)
    steps: list[BwdStep] = []
    for idx, step in enumerate(graph.bwd_steps):
        needs: list[int] = []
        if FULL_SEGMENT in pending:
            needs.append(FULL_SEGMENT)
            pending.discard(FULL_SEGMENT)
        for op in step.ops:
            for seg in sorted(need_ops.get(op, ())):
                if seg in pending:
                    needs.append(seg)
                    pending.discard(seg)
        frees = step.part in ("bwd", "wgrad")
        freed = sum(free_at.get(o, 0) for o in step.ops) if frees else 0
        work = cost.part_ms(step.ops, step.part)
        if step.kind == "compute":
            steps.append(BwdStep(tuple(needs), work, 0.0, -1.0, freed, idx))
        else:
            steps.append(BwdStep(tuple(needs), 0.0, work, cost.coll_ms[step.coll], freed, idx))
    if pending:  # a dropped tensor nobody reads cannot happen for well-formed graphs
        raise ValueError(f"segments {sorted(pending)} have no backward consumer")
    return steps
