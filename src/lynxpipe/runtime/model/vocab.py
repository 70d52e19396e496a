"""Vocab-parallel embedding and cross-entropy (Megatron), with window hooks at their collectives.

Both functions return their integer bookkeeping tensors (and the CE softmax) as extra,
non-differentiable outputs, so the caller can name every tensor autograd saves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lynxpipe.runtime.model.tp import (
    NO_STEPS,
    CollSteps,
    TPContext,
    WindowHook,
    call_window,
    issue_all_gather,
    issue_all_reduce,
    reduce_in_window,
    wait,
)
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL


def _local_ids(ids: Tensor, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Ids shifted into this rank's vocabulary shard (0 where outside) and the outside mask."""
    outside = (ids < start) | (ids >= start + count)
    return (ids - start).masked_fill_(outside, 0), outside


class _VocabEmbedding(torch.autograd.Function):
    """Lookup in the local vocabulary shard, then all-reduce (reduce-scatter with SP)."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, tp: TPContext, hook: WindowHook | None,
                steps: CollSteps) -> tuple[Tensor, Tensor, Tensor]:
        local, outside = _local_ids(ids, tp.rank * weight.shape[0], weight.shape[0])
        out = torch.nn.functional.embedding(local, weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        out = reduce_in_window(out, tp, hook, steps)
        ctx.save_for_backward(local, outside)
        ctx.mark_non_differentiable(local, outside)
        ctx.tp, ctx.hook, ctx.steps, ctx.vocab = tp, hook, steps, weight.shape[0]
        return out, local, outside

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        local, outside = ctx.saved_tensors
        if ctx.tp.sequence_parallel:
            grad, work = issue_all_gather(grad, ctx.tp)
            call_window(ctx.hook, BWD_COLL, ctx.steps.at("bwd", 0))
            wait(work)
        grad = grad.masked_fill(outside.unsqueeze(-1), 0.0)
        grad_w = grad.new_zeros((ctx.vocab, grad.shape[-1]))
        # index_put_ with accumulate has a deterministic CUDA path (index_add_ uses atomics)
        grad_w.index_put_((local.reshape(-1),), grad.reshape(-1, grad.shape[-1]), accumulate=True)
        return None, grad_w, None, None, None


def vocab_parallel_embedding(ids: Tensor, weight: Tensor, tp: TPContext,
                             hook: WindowHook | None = None,
                             steps: CollSteps = NO_STEPS) -> tuple[Tensor, Tensor, Tensor]:
    """Embed `ids` [s, b] with a vocabulary-sharded `weight`; returns (out, local_ids, outside)."""
    return _VocabEmbedding.apply(ids, weight, tp, hook, steps)


class _VocabCrossEntropy(torch.autograd.Function):
    """Per-token loss over vocabulary-sharded logits: all-reduce max, then (sum exp, target)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, tp: TPContext,
                hook: WindowHook | None, steps: CollSteps) -> tuple[Tensor, ...]:
        vocab, ctx.in_dtype = logits.shape[-1], logits.dtype
        logits = logits.float()
        peak = logits.max(dim=-1).values
        work = issue_all_reduce(peak, tp, dist.ReduceOp.MAX)
        call_window(hook, FWD_COLL, steps.at("fwd", 0))
        wait(work)
        shifted = logits - peak.unsqueeze(-1)
        local, outside = _local_ids(target, tp.rank * vocab, vocab)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill_(outside, 0.0)
        exp = shifted.exp_()
        # one all-reduce carries both per-token sums (the cost graph's ar_ce_sum: 8 bytes/token)
        sums = torch.stack([exp.sum(dim=-1), picked])
        work = issue_all_reduce(sums, tp)
        call_window(hook, FWD_COLL, steps.at("fwd", 1))
        wait(work)
        loss = sums[0].log() - sums[1]
        softmax = exp.div_(sums[0].unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        ctx.mark_non_differentiable(softmax, local, outside)
        return loss, softmax, local, outside

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp: TPContext,
                                 hook: WindowHook | None = None, steps: CollSteps = NO_STEPS
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss of fp32 softmax over sharded logits; returns (loss, softmax, local, outside).

    `steps.fwd` holds the forward steps of the max and the sum all-reduces.
    """
    return _VocabCrossEntropy.apply(logits, target, tp, hook, steps)
