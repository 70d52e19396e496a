"""Helpers for the user-block tests: a block lynxpipe has never seen (attention + a top-k
mixture-of-experts MLP, dropout on), a one-process driver of a plan's pipeline order (every rank
in turn, RECV windows where the order has them), and a meter of the storages a forward leaves
alive (mechanism-independent: it measures autograd, the engine and torch checkpointing alike).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lynxpipe.plan.types import Plan
from lynxpipe.runtime.engine.tracer import is_alias
from lynxpipe.schedule.actions import Window


class MoEBlock(nn.Module):
    """Pre-norm causal attention (SDPA) and a top-k MoE MLP whose experts all run, weighted by
    a dense gate matrix that is zero off the top k (static shapes)."""

    def __init__(self, h: int = 16, heads: int = 2, experts: int = 4, k: int = 2,
                 p: float = 0.1) -> None:
        super().__init__()
        self.heads, self.k = heads, k
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.router = nn.Linear(h, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(),
                                                   nn.Linear(2 * h, h)) for _ in range(experts))
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, s, h)))
        y = self.norm2(x)
        gates = torch.softmax(self.router(y), dim=-1)
        top, idx = gates.topk(self.k, dim=-1)
        dense = torch.zeros_like(gates).scatter(-1, idx, top)
        out = sum(dense[..., e:e + 1] * expert(y) for e, expert in enumerate(self.experts))
        return x + self.drop(out)


def drive(plan: Plan, stages: Sequence[Callable[[torch.Tensor], torch.Tensor]],
          batches: Sequence[torch.Tensor], engines: Sequence[Any] | None = None,
          after_forward: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """One training step of `plan.order` in this process: the ranks take turns, each running
    its next action once its message has arrived; RECV actions open the engine's RECV window.
    `stages[s]` maps a stage input to its output; the last stage's loss is its mean square."""
    order, last = plan.order, plan.order.num_stages - 1
    box: dict[tuple[str, int, int], torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    pos = [0] * order.pp

    def ctx(rank: int, phase: str, mb: int, stage: int) -> Any:
        if engines is None:
            return contextlib.nullcontext()
        return getattr(engines[rank], phase)(mb, stage)

    def ready(a: Any) -> bool:
        kind = {"RECV_F": "sent_f", "RECV_B": "sent_b"}.get(a.kind)
        return kind is None or (kind, a.mb, a.stage) in box

    def run(rank: int, a: Any) -> None:
        key = (a.mb, a.stage)
        if a.kind == "F":
            x = batches[a.mb] if a.stage == 0 else box[("in", *key)]
            with ctx(rank, "forward", *key):
                out = stages[a.stage](x)
            if a.stage == last:
                losses[a.mb] = out.square().mean()
            else:
                box[("out", *key)] = out
            if after_forward is not None:
                after_forward(*key)
        elif a.kind == "B":
            with ctx(rank, "backward", *key):
                if a.stage == last:
                    losses[a.mb].backward()
                else:
                    box.pop(("out", *key)).backward(box.pop(("grad", *key)))
        elif a.kind == "SEND_F":
            box[("sent_f", a.mb, a.stage + 1)] = box[("out", *key)].detach()
        elif a.kind == "SEND_B":
            box[("sent_b", a.mb, a.stage - 1)] = box.pop(("in", *key)).grad
        elif a.kind in ("RECV_F", "RECV_B"):
            if engines is not None:
                engines[rank].run_tasks(Window("recv", a.mb, a.stage, recv=a.kind))
            got = box.pop(("sent_f" if a.kind == "RECV_F" else "sent_b", *key))
            if a.kind == "RECV_F":
                box[("in", *key)] = got.requires_grad_()
            else:
                box[("grad", *key)] = got

    while any(pos[r] < len(order.ranks[r]) for r in range(order.pp)):
        moved = False
        for r in range(order.pp):
            while pos[r] < len(order.ranks[r]) and ready(order.ranks[r][pos[r]]):
                run(r, order.ranks[r][pos[r]])
                pos[r] += 1
                moved = True
        assert moved, f"deadlock at {pos}"
    return [losses[m].detach() for m in sorted(losses)]


class AliveMeter(TorchDispatchMode):
    """Per layer: bytes of its input plus every storage its forward created that is still alive
    afterwards (its output excepted, which is the next layer's input)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layer: int | None = None
        self.made: dict[int, dict[int, tuple[StorageWeakRef, int]]] = {}
        self.inputs: dict[int, int] = {}
        self.outputs: dict[int, int] = {}
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._pre(i), with_kwargs=True)
            block.register_forward_hook(self._post(i), with_kwargs=True)

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(_: Any, args: Any, kwargs: Any) -> None:
            self.layer, self.made[i] = i, {}
            self.inputs[i] = args[0].untyped_storage().nbytes()
        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(_: Any, args: Any, kwargs: Any, out: Any) -> None:
            self.layer, self.outputs[i] = None, out.untyped_storage()._cdata
        return hook

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.layer is not None and not is_alias(func):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    self.made[self.layer].setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out

    def held(self, i: int) -> int:
        """Bytes layer i holds now."""
        return self.inputs[i] + sum(n for key, (ref, n) in self.made[i].items()
                                    if not ref.expired() and key != self.outputs[i])


def moe_source(model: Any, par: Any) -> Callable[[int, int], Any]:
    """`--module tests/userblocks.py:moe_source`: the MoE block at (batch, seq)."""
    from lynxpipe.profile.trace import BlockCall

    def call(batch: int, seq: int) -> BlockCall:
        torch.manual_seed(0)
        return BlockCall(MoEBlock(model.hidden_size).train(),
                         (torch.randn(batch, seq, model.hidden_size),), {})

    return call


def replayed_ops(graph: Any, policy: Any, segment: int) -> list[str]:
    """Ops a recompute of `policy` runs: the graph's closure, or for a whole-layer recompute
    every op up to the last that writes a saved tensor (the replay stops once they exist)."""
    if not policy.full:
        return list(graph.recompute_ops(policy.dropped, segment))
    saved = {t.name for t in graph.tensors}
    last = max(i for i, op in enumerate(graph.ops) if set(op.outputs) & saved)
    return [op.name for op in graph.ops[:last + 1]]
