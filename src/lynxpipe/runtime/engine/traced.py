"""Drop a user block's saved tensors by their traced names and regenerate them op by op.

A `TracedRecord` runs the block forward under a `Recorder` (`runtime.engine.tracer`), so every
tensor autograd saves has the name the profiler gave it. Tensors the plan drops are released at
once; the rest are kept. When the forward ends, each region (the dropped tensors of one
segment; -1 for a whole-layer recompute) learns which ops regenerate it: the producers of its
tensors and, transitively, of every unsaved intermediate they read, down to kept tensors and the
block input, which the record holds.

A recompute re-runs the block's Python forward under `_Replay`: ops of the region run for real
(random ones from the RNG state recorded before them, so dropout replays bit for bit); every
other op returns its recorded layout without computing (a kept tensor's own storage where one is
read, an uninitialised buffer otherwise), and nothing is issued on the network. It stops as soon
as the region's tensors exist. Views run for real (they cost nothing).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import SAC_IGNORED_OPS

from lynxpipe.errors import LynxError
from lynxpipe.runtime.engine.records import RecordBase, Region, Saved
from lynxpipe.runtime.engine.tracer import (
    INPUT,
    ForwardLog,
    Namer,
    OpEvent,
    PathTracker,
    Recorder,
    is_alias,
    op_flops,
    paused_recorders,
    storage_key,
)

FULL_SEGMENT = -1


class TracedRecord(RecordBase):
    """One forward of a wrapped block whose plan names traced tensors (or recomputes it whole)."""

    def __init__(self, engine: Any, mb: int, layer: int, block: nn.Module, tracker: PathTracker,
                 args: tuple[Any, ...], kwargs: dict[str, Any], dropped: frozenset[str],
                 full: bool) -> None:
        super().__init__(engine, mb, layer)
        self.block, self.args, self.kwargs = block, args, kwargs
        self.dropped, self.full = dropped, full
        self.log = ForwardLog(Namer(tracker))
        self.run_sets: dict[int, frozenset[int]] = {}
        self.last_flops = 0
        """FLOPs of the ops the latest `regenerate` ran."""
        self._kept: dict[str, Tensor] = {}
        x = args[0]
        self._x_layout = ((tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)
                          if isinstance(x, Tensor) else None)
        if full:
            self.regions[FULL_SEGMENT] = Region(self, FULL_SEGMENT, frozenset(), ())

    def run(self) -> Any:
        """The block forward, recorded."""
        x = self.args[0]
        if not isinstance(x, Tensor):
            raise LynxError(f"block {self.layer}: its first argument must be the hidden-state "
                            f"tensor, got {type(x).__name__}")
        self.log.external(self.args[1:], self.kwargs, list(self.block.buffers()))
        self.log.input(x)
        # a layer that keeps everything is never replayed: any forward will do
        with Recorder(self.log, strict=bool(self.dropped) or self.full):
            return self.block(*self.args, **self.kwargs)

    # --- engine side -----------------------------------------------------------------------
    def pack(self, t: Tensor, ptr: int) -> Any:
        store = self.log.store_of(t)
        if not store.name:
            return t  # an argument, buffer or constant: not this layer's activation
        store.packed = True
        saved, name = Saved(t, self.engine), store.name
        region = self._region_of(name, store.op)
        if region is None:
            saved.keep(self.key, name)
            self._kept.setdefault(name, t)
        else:
            saved.drop(region, name, store.offset)
        return saved

    def _region_of(self, name: str, op: int) -> Region | None:
        if name == INPUT:
            return None
        if self.full:
            return self.regions[FULL_SEGMENT]
        if name not in self.dropped:
            return None
        seg = self.log.ops[op].segment
        if seg not in self.regions:
            self.regions[seg] = Region(self, seg, self.dropped, ())
        return self.regions[seg]

    def finish(self) -> None:
        """The forward is over: check the plan against it, learn what each region re-runs."""
        self.engine.closed(self)
        packed = {s.name for s in self.log.stores.values() if s.packed}
        missing = sorted(self.dropped - packed)
        if missing:
            raise LynxError(f"block {self.layer}: the plan drops {missing[:4]}, which this block "
                            f"does not save (it saves {sorted(packed)[:6]}...); the plan was "
                            f"made for another block: re-run `lynxpipe profile --module` on "
                            f"this one and plan again")
        for seg, region in self.regions.items():
            run, reads = self._closure(region)
            self.run_sets[seg] = run
            for name in sorted(reads):
                self.hold_input(name, (self.args[0] if name == INPUT else self._kept[name],))
        needed = frozenset().union(*self.run_sets.values())
        for i, event in enumerate(self.log.ops):
            if i not in needed:
                event.rng = None  # only replayed random ops need their RNG state
        self._kept = {}
        self.close()

    def _closure(self, region: Region) -> tuple[frozenset[int], set[str]]:
        """Ops that regenerate `region` and the kept names they read."""
        ops = self.log.ops
        if region.segment == FULL_SEGMENT:
            return frozenset(range(len(ops))), {INPUT}
        avail = set(self._kept) | {INPUT}
        run = {self.log.made_by[n] for n in region.live}
        todo, reads = list(run), set()
        while todo:
            for name in ops[todo.pop()].reads:
                if name in avail:
                    reads.add(name)
                    continue
                j = self.log.made_by[name]
                if ops[j].collective:
                    raise LynxError(f"block {self.layer}: regenerating "
                                    f"{sorted(region.live)[:3]} needs `{name}`, the output of "
                                    f"collective {ops[j].name}, which a recompute never "
                                    f"re-issues: keep it (plan with the block's own profile)")
                if j not in run:
                    run.add(j)
                    todo.append(j)
        return frozenset(run), reads

    def regenerate(self, region: Region) -> Mapping[Hashable, Tensor]:
        shape, stride, dtype, device, grad = self._x_layout
        x = (self._inputs[INPUT][0].detach() if INPUT in self._inputs  # a region reads x
             else torch.empty_strided(shape, stride, dtype=dtype, device=device))
        x.requires_grad_(grad)
        held = {storage_key(t[0]): t[0] for name, t in self._inputs.items() if name != INPUT}
        replay = _Replay(self.log.ops, self.run_sets[region.segment], set(region.live), held,
                         self.layer)
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        try:
            with paused_recorders(), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(_discard, _never), replay:
                self.block(x, *self.args[1:], **self.kwargs)
        except _Done:
            pass
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, x.device)
        self.last_flops = replay.flops
        return replay.buffers


class _Done(Exception):
    """Every tensor of the region exists: stop the replay."""


def _discard(_: Tensor) -> None:
    return None


def _never(_: Any) -> Tensor:
    raise LynxError("a recompute's own autograd graph was used for backward")


class _Replay(TorchDispatchMode):
    """Re-runs the ops in `run`; every other op returns its recorded layout, uncomputed."""

    def __init__(self, ops: list[OpEvent], run: frozenset[int], want: set[str],
                 held: dict[int, Tensor], layer: int) -> None:
        super().__init__()
        self.ops, self.run, self.want, self.held, self.layer = ops, run, want, held, layer
        self.i = 0
        self.buffers: dict[Hashable, Tensor] = {}
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS or is_alias(func):
            return func(*args, **kwargs)
        if self.i >= len(self.ops) or self.ops[self.i].func != func:
            expected = self.ops[self.i].name if self.i < len(self.ops) else "the end"
            raise LynxError(f"block {self.layer}: on recompute the forward ran {func} where it "
                            f"had run {expected}: its ops depend on something that changed "
                            f"(data-dependent control flow, or state mutated by the forward)")
        event, index = self.ops[self.i], self.i
        self.i += 1
        if index not in self.run:
            return self._recorded(event, args, kwargs)
        out = _with_rng(event.rng, func, args, kwargs)
        self.flops += op_flops(func, args, kwargs, out)
        leaves = tree_flatten(out)[0]
        for leaf, name in event.writes:
            if name in self.want:
                self.buffers[name] = leaves[leaf]
        if self.want <= self.buffers.keys():
            raise _Done
        return out

    def _recorded(self, event: OpEvent, args: Any, kwargs: dict[str, Any]) -> Any:
        in_leaves = tree_flatten((args, kwargs))[0]
        values = []
        for kind, data in event.outs:
            if kind == "alias":  # in place (same geometry) or an unannotated view
                base, shape, stride, offset = in_leaves[data[0]], *data[1:]
                same = (tuple(base.shape), tuple(base.stride()), base.storage_offset()) == \
                    (shape, stride, offset)
                values.append(base if same else base.as_strided(shape, stride, offset))
            elif kind == "value":
                values.append(data)
            else:
                values.append(self._layout(*data))
        return tree_unflatten(values, event.spec)

    def _layout(self, key: int, shape: tuple[int, ...], stride: tuple[int, ...], offset: int,
                dtype: torch.dtype, device: torch.device) -> Tensor:
        held = self.held.get(key)
        if held is not None:
            return held.as_strided(shape, stride, offset)
        extent = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 \
            if all(shape) else 0
        base = torch.empty(max(extent, 0), dtype=dtype, device=device)
        return base.as_strided(shape, stride, offset)


def _with_rng(rng: tuple[Any, ...] | None, func: Any, args: Any, kwargs: dict[str, Any]
              ) -> Any:
    """Run a random op from the RNG state it drew from in forward."""
    if rng is None:
        return func(*args, **kwargs)
    cpu, cuda, gen, gen_state = rng
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])
    if gen is not None:
        saved = gen.get_state()
        gen.set_state(gen_state)
    try:
        return func(*args, **kwargs)
    finally:
        if gen is not None:
            gen.set_state(saved)
