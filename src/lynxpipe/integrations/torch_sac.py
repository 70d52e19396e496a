"""A plan as `torch.utils.checkpoint` selective activation checkpointing (on demand).

    export = load_torch_export("sac.json")          # lynxpipe export --to torch --out sac.json
    fn = policy(export, layer=3, block=blocks[3])   # a policy_fn for that layer
    ctx = functools.partial(create_selective_checkpoint_contexts, fn)
    out = checkpoint(blocks[3], x, use_reentrant=False, context_fn=ctx)
    # or, for a whole stack: model.model.layers = wrap(export, model.model.layers)

The policy names every op as `lynxpipe profile --module` did (module path + aten op, counted
per forward; `runtime.engine.tracer`) and caches (MUST_SAVE) the outputs of the layer's
`save_ops`; everything else is recomputed when backward first needs it. Stock checkpointing
cannot recompute early (SPEC §7), so a plan's windows become on-demand recompute here.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from lynxpipe.errors import LynxError
from lynxpipe.integrations.torch_export import SacLayer, TorchExport, load_torch_export
from lynxpipe.runtime.engine.blocks import refuse_kv_cache
from lynxpipe.runtime.engine.tracer import Namer, is_alias, path_tracker

PolicyFn = Callable[..., CheckpointPolicy]


class _Names:
    """Op names of the running forward of one block (reset by a pre-hook on each call)."""

    def __init__(self, block: nn.Module) -> None:
        tracker = path_tracker(block)
        self.namer = Namer(tracker)
        block.register_forward_pre_hook(lambda *_: setattr(self, "namer", Namer(tracker)))


_NAMES: "weakref.WeakKeyDictionary[nn.Module, _Names]" = weakref.WeakKeyDictionary()


def layer_spec(export: TorchExport | str | Path, layer: int) -> SacLayer:
    """One layer's entry of an export (or of the sac.json at a path)."""
    if not isinstance(export, TorchExport):
        export = load_torch_export(export)
    found = next((s for s in export.layers if s.layer == layer), None)
    if found is None:
        raise LynxError(f"the export has no layer {layer} (it has 0..{len(export.layers) - 1})")
    return found


def policy(export: TorchExport | str | Path, layer: int, block: nn.Module) -> PolicyFn:
    """`policy_fn` for `create_selective_checkpoint_contexts`: MUST_SAVE for the layer's
    `save_ops`, PREFER_RECOMPUTE for every other op."""
    save = frozenset(layer_spec(export, layer).save_ops)
    names = _NAMES.get(block)
    if names is None:
        names = _NAMES[block] = _Names(block)

    def policy_fn(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func in SAC_IGNORED_OPS or is_alias(func):
            return CheckpointPolicy.PREFER_RECOMPUTE
        name = names.namer.name(func)
        return (CheckpointPolicy.MUST_SAVE if name in save
                else CheckpointPolicy.PREFER_RECOMPUTE)

    return policy_fn


def context_fn(export: TorchExport | str | Path, layer: int, block: nn.Module
               ) -> Callable[[], Any]:
    """`context_fn` for `checkpoint(..., use_reentrant=False, context_fn=...)`."""
    return functools.partial(create_selective_checkpoint_contexts, policy(export, layer, block))


class SacBlock(nn.Module):
    """A block checkpointed as its layer's entry says (not at all for `keep` layers)."""

    def __init__(self, block: nn.Module, spec: SacLayer, export: TorchExport) -> None:
        super().__init__()
        self.block, self.spec = block, spec
        self._context = (context_fn(export, spec.layer, block) if spec.mode == "selective"
                         else None)

    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        if self.spec.mode == "keep" or not self.training:
            return self.block(hidden, *args, **kwargs)
        refuse_kv_cache(self.spec.layer, args, kwargs)
        if self._context is None:  # full: plain checkpointing, every op recomputed
            return checkpoint(self.block, hidden, *args, use_reentrant=False, **kwargs)
        return checkpoint(self.block, hidden, *args, use_reentrant=False,
                          context_fn=self._context, **kwargs)


def wrap(export: TorchExport | str | Path, blocks: Iterable[nn.Module],
         first_layer: int = 0) -> nn.ModuleList:
    """Every block under its layer's selective checkpointing (block i is layer
    `first_layer + i`)."""
    if not isinstance(export, TorchExport):
        export = load_torch_export(export)
    return nn.ModuleList(SacBlock(b, layer_spec(export, first_layer + i), export)
                         for i, b in enumerate(blocks))
