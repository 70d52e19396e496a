"""Trace one call of a block, forward and backward, into a `LayerGraph` (SPEC §11).

The forward runs under a `Recorder` (`runtime.engine.tracer`: ops named by module path and aten
op, storages named by the op that wrote them) and `saved_tensors_hooks`, so the graph's tensors
are exactly those autograd saves, by unique storage, as the recompute engine's meter counts
them; parameters, buffers and the block's other arguments are not the layer's. FLOPs use torch's
FlopCounterMode formulas per op; bytes are what each op reads and writes. The backward runs
under a dispatch mode that charges each op to the forward op whose autograd node is running
(`torch._C._current_autograd_node`), and records the collectives it issues.

A saved tensor is droppable when regenerating it, with every other droppable tensor dropped
too, re-runs no collective and stays in its segment (the fixpoint in `_droppable`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lynxpipe.cost.graph import Collective, CollKind, LayerGraph, Op, Step
from lynxpipe.cost.graph import Tensor as SavedTensor
from lynxpipe.errors import LynxError
from lynxpipe.runtime.engine.tracer import (
    COLLECTIVE_HELPERS,
    INPUT,
    ForwardLog,
    Namer,
    OpEvent,
    Recorder,
    is_alias,
    is_collective,
    op_flops,
    op_name,
    path_tracker,
    storage_key,
)


@dataclass(frozen=True)
class BlockCall:
    """One call of a block: the module and its arguments (the first is the hidden state)."""

    block: nn.Module
    """The block (a decoder layer)."""
    args: tuple[Any, ...]
    """Positional arguments; `args[0]` is the hidden state (the layer input `x`)."""
    kwargs: dict[str, Any]
    """Keyword arguments (masks, position embeddings, ...), as the model passes them."""


def _nbytes(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(values)[0]
               if isinstance(t, Tensor))


class _Forward(Recorder):
    """The recorder plus FLOPs, bytes and the autograd node of each op's outputs."""

    def __init__(self, log: ForwardLog) -> None:
        super().__init__(log)
        self.flops: list[int] = []
        self.nbytes: list[int] = []
        self.sizes: list[int] = []
        self.nodes: dict[Any, int] = {}
        self._pending: tuple[int, list[Tensor]] | None = None
        self.packs: list[tuple[int, str]] = []
        """Saved (storage key, name) not yet charged to the op that saved it."""
        self.used_by: dict[str, list[str]] = defaultdict(list)
        """Saved name -> ops whose backward reads it."""

    def observe(self, event: OpEvent, func: Any, args: Any, kwargs: dict[str, Any],
                out: Any) -> None:
        self.settle()
        # autograd saves an op's inputs before it runs and its outputs after: a tensor saved
        # since the previous op is this op's input, or the previous op's output
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        self.charge(len(self.log.ops) - 1, inputs)
        self.flops.append(op_flops(func, args, kwargs, out))
        moved = bool(event.writes)  # an op that only re-views its input (_unsafe_view) moves none
        self.nbytes.append(_nbytes((args, kwargs)) + _nbytes(out) if moved else 0)
        self.sizes.append(max(_nbytes((args, kwargs)), _nbytes(out)))
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        self._pending = (len(self.log.ops) - 1, leaves)

    def charge(self, index: int, inputs: set[int]) -> None:
        """Charge pending packs to op `index` (its inputs) or the op before it."""
        for key, name in self.packs:
            saver = index if key in inputs or index == 0 else index - 1
            op = self.log.ops[saver].name
            if op not in self.used_by[name]:
                self.used_by[name].append(op)
        self.packs = []

    def settle(self) -> None:
        """Autograd sets an op's node after the op returns: read the previous op's now."""
        if self._pending is not None:
            index, leaves = self._pending
            for t in leaves:
                try:
                    node = t.grad_fn
                except RuntimeError:  # a no-grad view of a base written in place since
                    continue
                if node is not None:
                    self.nodes.setdefault(node, index)
            self._pending = None


class _Backward(TorchDispatchMode):
    """Charges backward ops (FLOPs, bytes, collectives) to the forward op of their node."""

    def __init__(self, nodes: dict[Any, int], count: int) -> None:
        super().__init__()
        self.nodes, self.last = nodes, count - 1
        self.flops, self.nbytes = [0] * count, [0] * count
        self.colls: list[tuple[int, str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        node = torch._C._current_autograd_node()
        index = self.nodes.get(node, self.last) if node is not None else self.last
        self.last = index
        if is_alias(func):
            return out  # a view moves no data
        if is_collective(func):
            if op_name(func) not in COLLECTIVE_HELPERS:
                self.colls.append((index, op_name(func), max(_nbytes(args), _nbytes(out))))
        else:
            self.flops[index] += op_flops(func, args, kwargs, out)
            self.nbytes[index] += _nbytes((args, kwargs)) + _nbytes(out)
        return out


def trace_call(call: BlockCall) -> LayerGraph:
    """The layer graph of one call of `call.block` at the shapes of its arguments."""
    block = call.block
    x = call.args[0]
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise LynxError(f"{type(block).__name__}: the first argument must be the hidden-state "
                        f"tensor, got {type(x).__name__}")
    x = x.detach().requires_grad_(True)
    log = ForwardLog(Namer(path_tracker(block)))
    log.external(call.args[1:], call.kwargs, list(block.buffers()))
    log.input(x)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    fwd = _Forward(log)

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() in params:
            return t
        store = log.store_of(t)
        if store.name:
            store.packed = True
            fwd.packs.append((storage_key(t), store.name))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fwd:
        out = block(x, *call.args[1:], **call.kwargs)
    fwd.settle()
    fwd.charge(len(log.ops), set())  # what the last op saved after it ran
    hidden = next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor)), None)
    if hidden is None or hidden.grad_fn is None:
        raise LynxError(f"{type(block).__name__}: the block returned no tensor with a gradient")
    bwd = _Backward(fwd.nodes, len(log.ops))
    grads = [(p, p.grad) for p in block.parameters()]
    for p, _ in grads:  # a fresh gradient, not an accumulation into an earlier one
        p.grad = None
    try:
        with bwd:
            torch.autograd.backward(hidden, torch.ones_like(hidden))
    finally:
        for p, grad in grads:
            p.grad = grad
    return _graph(log, fwd, bwd, fwd.used_by)


def _graph(log: ForwardLog, fwd: _Forward, bwd: _Backward,
           used_by: dict[str, list[str]]) -> LayerGraph:
    events = log.ops
    compute = [i for i, e in enumerate(events) if not e.collective]
    saved = {s.name: s for s in log.stores.values() if s.packed and s.name}
    ops = tuple(Op(e.name, e.segment, e.reads,
                   next((n for _, n in e.writes if n in saved), ""),
                   float(fwd.flops[i]), float(fwd.nbytes[i]),
                   float(bwd.flops[i]), float(bwd.nbytes[i]),
                   outputs=tuple(n for _, n in e.writes))
                for i, e in ((i, events[i]) for i in compute))
    names = {op.name for op in ops}
    droppable = _droppable(events, saved)
    tensors = []
    for name in sorted(saved, key=lambda n: (saved[n].op, n)):
        store = saved[name]
        writer = events[store.op] if store.op >= 0 else None
        producer = writer.name if writer is not None and not writer.collective else ""
        users = tuple(u for u in used_by[name] if u in names) or ((producer,) if producer
                                                                   else (ops[0].name,))
        tensors.append(SavedTensor(name, writer.segment if writer else 0, store.nbytes,
                                   producer, name in droppable, users[0], users))
    colls, fwd_steps = _forward_steps(events, names, fwd.sizes)
    bwd_colls = [Collective(f"{events[i].name}_bwd_{kind}#{n}", _coll_kind(kind), size)
                 for n, (i, kind, size) in enumerate(bwd.colls)]
    return LayerGraph("layer", ops, tuple(tensors), tuple(colls + bwd_colls), tuple(fwd_steps),
                      tuple(_backward_steps(events, compute, bwd.colls, bwd_colls)))


def _droppable(events: list[OpEvent], saved: dict[str, Any]) -> set[str]:
    """Saved activations whose regeneration, with every other candidate dropped too, re-runs
    no collective and leaves its segment for none."""
    made_by = {n: i for i, e in enumerate(events) for _, n in e.writes}
    cand = {n for n, s in saved.items() if n != INPUT and s.op >= 0
            and not events[s.op].collective}
    changed = True
    while changed:
        changed = False
        for name in sorted(cand):
            seg, todo, seen = events[made_by[name]].segment, [made_by[name]], set()
            ok = True
            while todo and ok:
                i = todo.pop()
                if i in seen:
                    continue
                seen.add(i)
                if events[i].collective or events[i].segment != seg:
                    ok = False
                    break
                todo += [made_by[r] for r in events[i].reads
                         if r in made_by and (r not in saved or r in cand)]
            if not ok:
                cand.discard(name)
                changed = True
    return cand


def _coll_kind(op: str) -> CollKind:
    if "gather" in op:
        return "all_gather"
    if "reduce_scatter" in op:
        return "reduce_scatter"
    return "all_reduce"


def _forward_steps(events: list[OpEvent], names: set[str], sizes: list[int]
                   ) -> tuple[list[Collective], list[Step]]:
    colls: list[Collective] = []
    steps: list[Step] = []
    for e, size in zip(events, sizes):
        if e.name in names:
            if steps and steps[-1].kind == "compute":
                steps[-1] = Step("compute", steps[-1].ops + (e.name,), "fwd")
            else:
                steps.append(Step("compute", (e.name,), "fwd"))
        elif op_name(e.func) not in COLLECTIVE_HELPERS:
            colls.append(Collective(e.name, _coll_kind(op_name(e.func)), size))
            steps.append(Step("coll", coll=e.name))
    return colls, steps


def _backward_steps(events: list[OpEvent], compute: list[int],
                    raw: list[tuple[int, str, int]], colls: list[Collective]) -> list[Step]:
    after: dict[int, list[str]] = defaultdict(list)
    for (i, _, _), coll in zip(raw, colls):
        after[i].append(coll.name)
    steps: list[Step] = []
    compute_set = set(compute)
    for i in reversed(range(len(events))):
        if i not in compute_set:
            steps += [Step("coll", coll=name) for name in after.get(i, ())]
            continue
        if steps and steps[-1].kind == "compute":
            steps[-1] = Step("compute", steps[-1].ops + (events[i].name,), "bwd")
        else:
            steps.append(Step("compute", (events[i].name,), "bwd"))
        steps += [Step("coll", coll=name) for name in after.get(i, ())]
    return steps
