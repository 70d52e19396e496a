"""Megatron-style tensor parallelism with explicit async collectives and window hooks (SPEC §7).

Every TP collective is issued with `async_op=True`; between issue and wait the layer calls a
*window hook* `hook(kind, step)` (kind `fwd_coll` or `bwd_coll`, `step` = index of that
collective in the cost graph's `fwd_steps` / `bwd_steps`). That interval is where the compute
stream would idle, so the recompute engine runs planned tasks there.

Backward follows Megatron's overlap: a column-parallel linear computes dgrad, issues the
input-gradient all-reduce, computes wgrad, calls the hook, then waits; with sequence parallelism
it re-all-gathers its (sharded) input overlapped with dgrad and reduce-scatters the input
gradient overlapped with wgrad. Process groups are passed in (`TPContext`); nothing is global.
tp == 1 needs no process group and issues no collective, but still calls the hooks at the same
steps, so plans made for tp == 1 run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lynxpipe.errors import LynxError
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL

WindowHook = Callable[[str, int], None]
"""`hook(kind, step)`: called after a collective is issued and before it is waited for."""

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class TPContext:
    """A tensor-parallel group as the layers see it."""

    group: Any = None
    """`torch.distributed` process group of the TP ranks; None when size == 1."""
    size: int = 1
    """TP degree t."""
    rank: int = 0
    """This process's rank inside the group."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norm/dropout regions sharded along the sequence."""

    def __post_init__(self) -> None:
        if self.size > 1 and self.group is None:
            raise LynxError(f"TPContext: tp={self.size} needs a process group")
        if self.sequence_parallel and self.size == 1:
            raise LynxError("TPContext: sequence_parallel needs tp > 1")
        if not 0 <= self.rank < self.size:
            raise LynxError(f"TPContext: rank={self.rank} is outside tp={self.size}")

    @staticmethod
    def from_group(group: Any, sequence_parallel: bool = False) -> TPContext:
        """Context for this process inside `group` (None: tp == 1)."""
        if group is None:
            return TPContext(sequence_parallel=sequence_parallel)
        return TPContext(group, dist.get_world_size(group), dist.get_rank(group),
                         sequence_parallel)


@dataclass(frozen=True)
class CollSteps:
    """Where a TP module's collectives sit in its layer's step programs (-1: no window)."""

    fwd: tuple[int, ...] = ()
    """Forward step indices of the module's collectives, in issue order."""
    bwd: tuple[int, ...] = ()
    """Backward step indices of the module's collectives, in issue order."""

    def at(self, which: str, i: int) -> int:
        """Step index `i` of `which` ('fwd'/'bwd'), or -1 when the graph has no such step."""
        steps = self.fwd if which == "fwd" else self.bwd
        return steps[i] if i < len(steps) else -1


NO_STEPS = CollSteps()
"""A module whose collectives have no window in the graph."""


def call_window(hook: WindowHook | None, kind: str, step: int) -> None:
    """Run the window hook, if any, for a step the graph knows."""
    if hook is not None and step >= 0:
        hook(kind, step)


def reduce_in_window(out: Tensor, tp: TPContext, hook: WindowHook | None,
                     steps: CollSteps) -> Tensor:
    """Reduce a row-parallel output (reduce-scatter with SP), running the forward window
    between issuing the collective and waiting for it."""
    if tp.sequence_parallel:
        out, work = issue_reduce_scatter(out, tp)
    else:
        work = issue_all_reduce(out, tp)
    call_window(hook, FWD_COLL, steps.at("fwd", 0))
    wait(work)
    return out


def wait(work: Any) -> None:
    """Wait for an async collective (None: nothing was issued)."""
    if work is not None:
        work.wait()


def issue_all_reduce(t: Tensor, tp: TPContext, op: Any = None) -> Any:
    """In-place all-reduce of `t` across TP; returns the work handle (None at tp == 1)."""
    if tp.size == 1:
        return None
    return dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=tp.group, async_op=True)


def issue_all_gather(shard: Tensor, tp: TPContext) -> tuple[Tensor, Any]:
    """All-gather along dim 0; returns (output buffer, work). The buffer is valid after wait."""
    if tp.size == 1:
        return shard, None
    shard = shard.contiguous()
    out = shard.new_empty((shard.shape[0] * tp.size, *shard.shape[1:]))
    return out, _all_gather(out, shard, group=tp.group, async_op=True)


def issue_reduce_scatter(full: Tensor, tp: TPContext) -> tuple[Tensor, Any]:
    """Reduce-scatter along dim 0; returns (output buffer, work)."""
    if tp.size == 1:
        return full, None
    full = full.contiguous()
    if full.shape[0] % tp.size:
        raise LynxError(f"reduce-scatter: dim 0 ({full.shape[0]}) not divisible by tp={tp.size}")
    out = full.new_empty((full.shape[0] // tp.size, *full.shape[1:]))
    return out, _reduce_scatter(out, full, group=tp.group, async_op=True)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _ColumnLinear(torch.autograd.Function):
    """y = gather(x) W^T + b with W split by output rows; saves the (sharded) input only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, tp: TPContext,
                hook: WindowHook | None, steps: CollSteps) -> Tensor:
        full = x
        if tp.sequence_parallel:
            full, work = issue_all_gather(x, tp)
            call_window(hook, FWD_COLL, steps.at("fwd", 0))
            wait(work)
        ctx.save_for_backward(x, weight)
        ctx.tp, ctx.hook, ctx.steps, ctx.has_bias = tp, hook, steps, bias is not None
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        tp, hook, steps = ctx.tp, ctx.hook, ctx.steps
        full, gather = (issue_all_gather(x, tp) if tp.sequence_parallel else (x, None))
        grad_in = grad.matmul(weight)
        if tp.sequence_parallel:
            call_window(hook, BWD_COLL, steps.at("bwd", 0))
            wait(gather)
            grad_in, reduce = issue_reduce_scatter(grad_in, tp)
            last = steps.at("bwd", 1)
        else:
            reduce = issue_all_reduce(grad_in, tp)
            last = steps.at("bwd", 0)
        grad2 = _flat(grad)
        grad_w = grad2.t().matmul(_flat(full))
        grad_b = grad2.sum(0) if ctx.has_bias else None
        call_window(hook, BWD_COLL, last)
        wait(reduce)
        return grad_in, grad_w, grad_b, None, None, None


class _RowLinear(torch.autograd.Function):
    """y = reduce(x W^T) with W split by input columns: all-reduce, or reduce-scatter with SP."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, tp: TPContext, hook: WindowHook | None,
                steps: CollSteps) -> Tensor:
        out = reduce_in_window(F.linear(x, weight), tp, hook, steps)
        ctx.save_for_backward(x, weight)
        ctx.tp, ctx.hook, ctx.steps = tp, hook, steps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        tp = ctx.tp
        if tp.sequence_parallel:
            # the gradient of a reduce-scatter is an all-gather; nothing to overlap it with
            grad, work = issue_all_gather(grad, tp)
            call_window(ctx.hook, BWD_COLL, ctx.steps.at("bwd", 0))
            wait(work)
        grad_in = grad.matmul(weight)
        grad_w = _flat(grad).t().matmul(_flat(x))
        return grad_in, grad_w, None, None, None


def shard(full: Tensor, dim: int, tp: TPContext) -> Tensor:
    """This rank's contiguous slice of `full` along `dim`."""
    if full.shape[dim] % tp.size:
        raise LynxError(f"cannot split dim {dim} of size {full.shape[dim]} over tp={tp.size}")
    return full.chunk(tp.size, dim)[tp.rank].contiguous()


class ColumnParallelLinear(nn.Module):
    """Linear whose output features are split over TP (QKV, FC1, LM head)."""

    def __init__(self, full_weight: Tensor, full_bias: Tensor | None, tp: TPContext,
                 steps: CollSteps = NO_STEPS, **factory: Any) -> None:
        super().__init__()
        self.tp, self.steps = tp, steps
        self.weight = nn.Parameter(shard(full_weight, 0, tp).to(**factory))
        self.bias = (nn.Parameter(shard(full_bias, 0, tp).to(**factory))
                     if full_bias is not None else None)

    def forward(self, x: Tensor, hook: WindowHook | None = None) -> Tensor:
        return _ColumnLinear.apply(x, self.weight, self.bias, self.tp, hook, self.steps)


class RowParallelLinear(nn.Module):
    """Linear whose input features are split over TP (out-proj, FC2); no bias (added later)."""

    def __init__(self, full_weight: Tensor, tp: TPContext, steps: CollSteps = NO_STEPS,
                 **factory: Any) -> None:
        super().__init__()
        self.tp, self.steps = tp, steps
        self.weight = nn.Parameter(shard(full_weight, 1, tp).to(**factory))

    def forward(self, x: Tensor, hook: WindowHook | None = None) -> Tensor:
        return _RowLinear.apply(x, self.weight, self.tp, hook, self.steps)


def mark_sequence_parallel(*params: nn.Parameter) -> None:
    """Flag replicated params that see only their token shard under SP (grads need a TP sum)."""
    for p in params:
        p.lynx_sequence_parallel = True  # type: ignore[attr-defined]


def reduce_sequence_parallel_grads(params: Iterable[nn.Parameter], tp: TPContext) -> None:
    """All-reduce the grads of SP-flagged params over TP (Megatron does this before the step)."""
    if not tp.sequence_parallel:
        return
    for p in params:
        if getattr(p, "lynx_sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=tp.group)
