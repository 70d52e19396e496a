"""From a Plan to what one rank runs: its model chunks, its recompute engine, p2p tags/shapes.

Pure glue between `plan` (no torch) and `runtime`: the executor (`runtime.pipeline.executor`) calls
these once per job.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.runtime.engine.recompute import RecomputeEngine
from lynxpipe.runtime.model.layer import BuildConfig
from lynxpipe.runtime.model.stage import Stage
from lynxpipe.runtime.model.tp import TPContext
from lynxpipe.runtime.pipeline.groups import ProcessGroups
from lynxpipe.schedule.actions import PipelineOrder, Window
from lynxpipe.schedule.policy import stage_layers
from lynxpipe.schedule.windows import ON_DEMAND, is_planned


def rank_stages(plan: Plan, pp_rank: int) -> list[int]:
    """Virtual stages hosted by pipeline rank `pp_rank`, in model order."""
    return list(range(pp_rank, plan.order.num_stages, plan.order.pp))


def check_dtype(plan: Plan, dtype: torch.dtype) -> None:
    """The planner's memory model must count the bytes the runtime holds."""
    size = torch.empty((), dtype=dtype).element_size()
    if plan.model.dtype_bytes != size:
        raise LynxError(f"the plan was made for {plan.model.dtype_bytes}-byte activations but the "
                        f"runtime runs {dtype} ({size} bytes); re-plan with dtype_bytes={size} "
                        f"(`lynxpipe train` does this on CPU)")


def build_chunks(plan: Plan, groups: ProcessGroups, *, seed: int, dtype: torch.dtype,
                 device: str) -> dict[int, Stage]:
    """This rank's model chunks, one `Stage` per virtual stage it hosts."""
    check_dtype(plan, dtype)
    tp = TPContext.from_group(groups.tp, plan.parallel.sequence_parallel)
    cfg = BuildConfig(plan.model, plan.parallel, tp, dtype, device, seed)
    ranges = stage_layers(plan.partition)
    last = plan.order.num_stages - 1
    return {s: Stage(cfg, ranges[s], embed=s == 0, head=s == last)
            for s in rank_stages(plan, groups.pp_rank)}


def planned_tasks(plan: Plan, pp_rank: int) -> dict[Window, list[tuple[int, int, int]]]:
    """Recompute tasks pinned to a window (not on demand) in `pp_rank`'s order."""
    tasks: dict[Window, list[tuple[int, int, int]]] = defaultdict(list)
    for a in plan.order.ranks[pp_rank]:
        if a.kind == "R" and a.window is not None and is_planned(a.window.kind):
            tasks[a.window].append((a.mb, a.layer, a.segment))
    return dict(tasks)


def planned_where(plan: Plan, pp_rank: int) -> dict[tuple[int, int, int], str]:
    """Window kind of every recompute task of `pp_rank` ((mb, layer, segment) -> kind)."""
    return {(a.mb, a.layer, a.segment): a.window.kind if a.window else ON_DEMAND
            for a in plan.order.ranks[pp_rank] if a.kind == "R"}


def engine_for(plan: Plan, pp_rank: int, *, sync_cuda: bool = False) -> RecomputeEngine:
    """A recompute engine with the plan's drop sets and pinned tasks for one pipeline rank."""
    mine = [g for s in rank_stages(plan, pp_rank) for g in stage_layers(plan.partition)[s]]
    dropped = {g: plan.layers[g].dropped for g in mine
               if plan.layers[g].dropped and not plan.layers[g].full}
    full = [g for g in mine if plan.layers[g].full]
    return RecomputeEngine(dropped, planned_tasks(plan, pp_rank), full, sync_cuda=sync_cuda)


def boundary_shape(plan: Plan) -> tuple[int, int, int]:
    """Shape of activations and gradients crossing stages: [s, b, h] ([s/t, b, h] with SP)."""
    par = plan.parallel
    return par.boundary_rows, par.micro_batch_size, plan.model.hidden_size


def p2p_tag(mb: int, recv_stage: int, direction: str, num_stages: int) -> int:
    """Tag of a message, named by its receiver: (micro-batch, receiving stage, F or B)."""
    return (mb * num_stages + recv_stage) * 2 + (direction == "B")


def p2p_order_problems(order: PipelineOrder) -> list[str]:
    """Pairs of ranks whose send order differs from the receive order.

    gloo matches messages by tag, so any order works there; NCCL ignores tags and pairs
    messages by posting order, so there the orders must agree.
    """
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    received: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    for r, actions in enumerate(order.ranks):
        for a in actions:
            if a.kind in ("SEND_F", "SEND_B"):
                dest = a.stage + (1 if a.kind == "SEND_F" else -1)
                sent[(r, order.rank_of(dest))].append((a.kind[-1], a.mb, dest))
            elif a.kind in ("RECV_F", "RECV_B"):
                src = a.stage + (-1 if a.kind == "RECV_F" else 1)
                received[(order.rank_of(src), r)].append((a.kind[-1], a.mb, a.stage))
    return [f"rank {s} sends to rank {d} in the order {sent[(s, d)][:4]}..., which receives "
            f"{received[(s, d)][:4]}..."
            for (s, d) in sorted(sent) if sent[(s, d)] != received[(s, d)]]
