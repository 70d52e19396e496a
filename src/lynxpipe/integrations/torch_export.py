"""The plan as torch selective activation checkpointing can run it (`lynxpipe export --to
torch`): per layer, the ops whose outputs `torch.utils.checkpoint` should cache (MUST_SAVE);
everything else is recomputed on demand (`lynxpipe.integrations.torch_sac` turns it into a
`policy_fn`).

Selective checkpointing caches whole op outputs, so the nearest plan it can express keeps the
tensors of *cacheable* ops (every output of the op is a saved tensor, since an op with an
unsaved output would cost bytes no plan counts; not in place) when the plan keeps all of them,
and drops the rest.
The checkpoint also holds its input `x`. Layers that keep everything are not checkpointed;
fully recomputed ones are checkpointed with no op cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lynxpipe.artifact import load_artifact, save_artifact
from lynxpipe.cost.graph import LayerGraph, op_kind
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan

TORCH_EXPORT_VERSION = 1


@dataclass(frozen=True)
class SacLayer:
    """One layer under selective activation checkpointing."""

    layer: int
    """Global layer index."""
    mode: Literal["keep", "full", "selective"]
    """keep: no checkpoint; full: checkpoint, nothing cached; selective: cache `save_ops`."""
    save_ops: tuple[str, ...]
    """Traced op names whose outputs are cached (MUST_SAVE)."""
    kept: tuple[str, ...]
    """Saved tensors held from forward to backward (the nearest plan's keep set)."""
    saved_bytes: int
    """Their bytes per micro-batch (the checkpoint input `x` included)."""


@dataclass(frozen=True)
class TorchExport:
    """Selective-checkpointing policies of every layer of a plan."""

    policy: str
    """The lynxpipe policy the plan came from."""
    plan_fingerprint: str
    """Fingerprint of that plan."""
    block: str
    """The traced block the names refer to."""
    layers: tuple[SacLayer, ...]
    """Per global layer."""


def cacheable_ops(graph: LayerGraph) -> dict[str, tuple[str, ...]]:
    """Ops every output of which autograd saves, in-place ops excepted (torch caches an op's
    output inside the dispatcher, before an in-place op bumps the version counter, and then
    refuses the entry as mutated): op -> those outputs."""
    saved = {t.name for t in graph.tensors}
    return {op.name: op.outputs for op in graph.ops
            if op.outputs and all(n in saved for n in op.outputs)
            and not op_kind(op.name).endswith("_")}


def sac_layer(graph: LayerGraph, layer: int, full: bool, dropped: frozenset[str]) -> SacLayer:
    """The nearest selective-checkpointing form of one layer's policy."""
    inputs = ("x",) if any(t.name == "x" for t in graph.tensors) else ()  # the checkpoint's
    size = {t.name: t.size_bytes for t in graph.tensors}
    if full:
        return SacLayer(layer, "full", (), inputs, sum(size[n] for n in inputs))
    if not dropped:
        return SacLayer(layer, "keep", (), tuple(size), graph.saved_bytes())
    ops = tuple(op for op, outs in cacheable_ops(graph).items() if not set(outs) & dropped)
    kept = inputs + tuple(n for op in ops for n in cacheable_ops(graph)[op])
    return SacLayer(layer, "selective", ops, kept, sum(size[n] for n in set(kept)))


def torch_export(plan: Plan, graph: LayerGraph, block: str) -> TorchExport:
    """Every layer of `plan` as selective checkpointing (its graph must be traced)."""
    if not block:
        raise LynxError("--to torch names ops as the tracer does: plan with a profile from "
                        "`lynxpipe profile --module` (e.g. --module reference for lynxpipe's "
                        "own layer)")
    return TorchExport(plan.policy, plan.fingerprint, block,
                       tuple(sac_layer(graph, g, p.full, p.dropped)
                             for g, p in enumerate(plan.layers)))


def save_torch_export(path: str | Path, export: TorchExport) -> Path:
    """Write sac.json."""
    return save_artifact(path, "lynxpipe.torch_sac", TORCH_EXPORT_VERSION, export)


def load_torch_export(path: str | Path) -> TorchExport:
    """Read sac.json."""
    return load_artifact(path, "lynxpipe.torch_sac", TORCH_EXPORT_VERSION, TorchExport)
