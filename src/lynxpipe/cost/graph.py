"""Data types of a layer's op graph: ops, saved tensors, collectives and step programs.

A layer is split into *segments* by its forward collectives. A saved tensor is droppable when
its producer reads only saved tensors of the same layer, so regenerating it never re-issues a
collective (SPEC §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lynxpipe.errors import LynxError

CollKind = Literal["all_reduce", "all_gather", "reduce_scatter", "p2p"]


@dataclass(frozen=True)
class Op:
    """One forward op of a layer with the work of its forward and backward (per TP rank)."""

    name: str
    """Unique within the layer."""
    segment: int
    """Index of the collective-delimited segment the op belongs to."""
    inputs: tuple[str, ...]
    """Saved tensors the op reads (its dependencies when recomputing)."""
    output: str
    """Saved tensor the op produces, or '' when its output is not saved for backward."""
    fwd_flops: float
    """Forward floating-point operations."""
    fwd_bytes: float
    """Forward memory traffic (bytes read + written)."""
    dgrad_flops: float
    """Backward FLOPs for the input gradient (all of backward for non-GEMM ops)."""
    dgrad_bytes: float
    """Backward memory traffic for the input gradient."""
    wgrad_flops: float = 0.0
    """Backward FLOPs for the weight gradient (GEMMs only)."""
    wgrad_bytes: float = 0.0
    """Backward memory traffic for the weight gradient."""
    kernel_recompute_flops: float = 0.0
    """Part of `dgrad_flops` that re-runs forward work inside the backward kernel (fused
    attention recomputes its scores): time, but not model FLOPs."""
    outputs: tuple[str, ...] = ()
    """Every tensor the op writes, saved or not (traced graphs, where an op may read an
    intermediate no one saves); empty means just `output`."""


@dataclass(frozen=True)
class Tensor:
    """A tensor autograd keeps for backward (Korthikanti's accounting unit)."""

    name: str
    """Unique within the layer."""
    segment: int
    """Segment whose backward consumes it; its recompute task is (layer, segment)."""
    size_bytes: int
    """Bytes held (per TP rank)."""
    producer: str
    """Op that produces it ('' for the layer input)."""
    droppable: bool
    """True when it can be regenerated from saved tensors of the layer without a collective."""
    last_use: str
    """Op whose backward uses it last (earliest in forward order); it is freed after that."""
    used_by: tuple[str, ...] = ()
    """Ops whose backward reads it; it must be present before the first of them runs."""


@dataclass(frozen=True)
class Collective:
    """A TP collective of the layer (forward or backward)."""

    name: str
    """Unique within the layer."""
    kind: CollKind
    """Collective type; its time follows the ring alpha-beta model."""
    size_bytes: int
    """Bytes of the full (unsharded) tensor."""


@dataclass(frozen=True)
class Step:
    """One entry of a forward or backward program: compute, or a collective (with overlap)."""

    kind: Literal["compute", "coll"]
    """`compute`: run `ops`' `part` in order; `coll`: wait for collective `coll`."""
    ops: tuple[str, ...] = ()
    """Ops computed by this step (for `coll`, those computed concurrently with it)."""
    part: Literal["fwd", "dgrad", "wgrad", "bwd"] = "fwd"
    """Which work of `ops` runs: forward, input grad, weight grad, or both grads."""
    coll: str = ""
    """Collective name (kind == coll)."""


@dataclass(frozen=True)
class LayerGraph:
    """Everything the planners and simulator need to know about one kind of layer."""

    kind: str
    """'layer' (a transformer layer), 'embed' (first stage extra) or 'head' (last stage extra)."""
    ops: tuple[Op, ...]
    """Forward ops in execution order."""
    tensors: tuple[Tensor, ...]
    """Saved-for-backward tensors."""
    collectives: tuple[Collective, ...]
    """Forward and backward TP collectives."""
    fwd_steps: tuple[Step, ...]
    """Forward program."""
    bwd_steps: tuple[Step, ...]
    """Backward program (reverse order; `coll` steps overlap the compute named in them)."""

    @property
    def num_segments(self) -> int:
        """Number of collective-delimited segments."""
        return 1 + max((op.segment for op in self.ops), default=0)

    def op(self, name: str) -> Op:
        """Look an op up by name (a LynxError naming the known ones if there is none)."""
        found = next((o for o in self.ops if o.name == name), None)
        if found is None:
            raise LynxError(f"the {self.kind} has no op {name!r}; its ops are "
                            f"{', '.join(o.name for o in self.ops)}")
        return found

    def tensor(self, name: str) -> Tensor:
        """Look a saved tensor up by name (a LynxError naming the known ones if there is none)."""
        found = next((t for t in self.tensors if t.name == name), None)
        if found is None:
            raise LynxError(f"the {self.kind} saves no tensor {name!r}; it saves "
                            f"{', '.join(t.name for t in self.tensors)}")
        return found

    def droppable(self) -> tuple[Tensor, ...]:
        """Tensors a policy may drop."""
        return tuple(t for t in self.tensors if t.droppable)

    def saved_bytes(self, kept: frozenset[str] | None = None) -> int:
        """Bytes held after forward: all tensors, or pinned ones plus those in `kept`."""
        return sum(t.size_bytes for t in self.tensors
                   if kept is None or not t.droppable or t.name in kept)

    def recompute_ops(self, dropped: frozenset[str], segment: int) -> tuple[str, ...]:
        """Ops to re-run (forward order) to regenerate `dropped` tensors of `segment`: their
        producers (an op may save several tensors, as fused attention saves its output and the
        row logsumexp), and, transitively, the producers of every input they read that is not
        a kept saved tensor (a traced block's unsaved intermediates, or other dropped tensors).
        Inputs no op of the layer writes (the layer input) are available."""
        kept = {t.name for t in self.tensors if t.name not in dropped}
        made_by = {name: op.name for op in self.ops for name in (op.outputs or (op.output,))
                   if name}
        by_name = {op.name: op for op in self.ops}
        need = {t.producer for t in self.tensors
                if t.name in dropped and t.segment == segment and t.producer}
        todo = list(need)
        while todo:
            for name in by_name[todo.pop()].inputs:
                producer = made_by.get(name)
                if name not in kept and producer is not None and producer not in need:
                    need.add(producer)
                    todo.append(producer)
        return tuple(op.name for op in self.ops if op.segment == segment and op.name in need)

    def attention_core(self) -> frozenset[str]:
        """Droppable tensors Megatron's selective recompute drops: the explicit attention's
        probabilities (and their dropout); in a traced graph, what the ops from a softmax up to
        the next matrix product save (probabilities, dropout mask, dropped probabilities)."""
        names = {"probs", "probs_dropped"}
        inside = False
        for op in self.ops:
            kind = op_kind(op.name)
            if kind in SOFTMAX_OPS:
                inside = True
            elif kind in MATMUL_OPS:
                inside = False
            if inside:
                names.update(op.outputs or (op.output,))
        return frozenset(t.name for t in self.droppable() if t.name in names)


SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_safe_softmax"})
"""aten ops that start an attention core in a traced graph."""
MATMUL_OPS = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul"})
"""aten ops that end it."""


def op_kind(name: str) -> str:
    """The aten op of a traced op name (`mlp.act/gelu#2` -> `gelu`); the name itself for the
    analytic graph's ops."""
    return name.rsplit("/", 1)[-1].split("#", 1)[0]
