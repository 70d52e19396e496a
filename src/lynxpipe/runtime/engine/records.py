"""Per-(micro-batch, layer) bookkeeping of the recompute engine.

A *record* is created when a layer's forward starts. It decides, for every tensor autograd
packs, whether to keep it or drop it; dropped tensors belong to a *region* (layer, segment) that
can regenerate them from kept tensors. A region is `open` (tensors dropped), `ready`
(regenerated, buffers held) or `done` (every dropped tensor's backward has run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Mapping

import torch
from torch import Tensor

from lynxpipe.errors import LynxError
from lynxpipe.runtime.model.env import Env
from lynxpipe.runtime.model.ops import draw_keep_mask

if TYPE_CHECKING:
    from lynxpipe.runtime.engine.recompute import RecomputeEngine

UNTAGGED = "?untagged"
"""Name of saved tensors the forward never tagged (kept; a built-in layer has none)."""


class Saved:
    """What autograd holds for one saved tensor: the tensor (kept, or pending until tagged), or,
    once dropped, its region, key and view geometry. Freeing it (autograd releases saved tensors
    after their node's backward) releases its memory in the meter."""

    __slots__ = ("tensor", "meter_ptr", "region", "key", "geom", "engine")

    def __init__(self, tensor: Tensor, engine: "RecomputeEngine") -> None:
        self.tensor: Tensor | None = tensor
        self.meter_ptr: int | None = None
        self.region: Region | None = None
        self.key: Hashable = None
        self.geom: tuple[tuple[int, ...], tuple[int, ...], int] | None = None
        self.engine = engine

    def keep(self, owner: tuple[int, int], name: str) -> None:
        """Keep the tensor; count its storage."""
        assert self.tensor is not None
        self.meter_ptr = self.engine.meter.hold(self.tensor, owner, name, "saved")

    def drop(self, region: "Region", key: Hashable, offset0: int | None) -> None:
        """Forget the tensor; remember how to find it again (view geometry when offset0 given)."""
        t = self.tensor
        assert t is not None
        if offset0 is not None:
            self.geom = (tuple(t.shape), tuple(t.stride()), t.storage_offset() - offset0)
        self.region, self.key, self.tensor = region, key, None
        region.add(key)

    def __del__(self) -> None:
        try:
            if self.region is not None:
                self.region.release(self.key)
            elif self.meter_ptr is not None:
                self.engine.meter.release(self.meter_ptr)
        except Exception:  # interpreter shutdown: nothing left to account for
            pass


class Region:
    """The dropped tensors of one (micro-batch, layer, segment) and their regenerated buffers."""

    def __init__(self, record: "RecordBase", segment: int, names: frozenset[str],
                 ops: tuple[str, ...]) -> None:
        self.record, self.segment, self.names, self.ops = record, segment, names, ops
        self.state = "open"
        self.dropped_any = False
        self.live: dict[Hashable, int] = {}
        self.buffers: dict[Hashable, Tensor] = {}
        self._ptrs: dict[Hashable, int] = {}

    def add(self, key: Hashable) -> None:
        """One more saved tensor of this region was dropped."""
        self.dropped_any = True
        self.live[key] = self.live.get(key, 0) + 1

    def set_ready(self, buffers: Mapping[Hashable, Tensor]) -> int:
        """Hold regenerated buffers for the live keys; returns their (unique) bytes."""
        meter, owner = self.record.engine.meter, self.record.key
        before = meter.current_bytes
        for key in self.live:
            if key not in buffers:
                raise LynxError(f"recompute of layer {owner[1]} segment {self.segment} did not "
                                f"regenerate {key}")
            self.buffers[key] = buffers[key]
            self._ptrs[key] = meter.hold(buffers[key], owner, _name(key), "recomputed")
        self.state = "ready"
        return meter.current_bytes - before

    def release(self, key: Hashable) -> None:
        """A dropped saved tensor was freed by autograd (its backward ran, or the graph died)."""
        self.live[key] -= 1
        if self.live[key]:
            return
        del self.live[key]
        self.buffers.pop(key, None)
        ptr = self._ptrs.pop(key, None)
        if ptr is not None:
            self.record.engine.meter.release(ptr)
        if not self.live and self.record.complete:
            self.finish()

    def finish(self) -> None:
        """Nothing of this region is needed any more."""
        self.state = "done"
        self.record.region_done()


def _name(key: Hashable) -> str:
    return str(key[0]) if isinstance(key, tuple) else str(key)


class RecordBase:
    """Shared part of named-layer and user-block records."""

    def __init__(self, engine: "RecomputeEngine", mb: int, layer: int) -> None:
        self.engine, self.key, self.layer = engine, (mb, layer), layer
        self.regions: dict[int, Region] = {}
        self.complete = False
        self._inputs: dict[str, tuple[Tensor, ...]] = {}
        self._input_ptrs: list[int] = []

    def alive(self) -> bool:
        """True while a region still has dropped tensors waiting for their backward."""
        return any(r.state != "done" for r in self.regions.values())

    def hold_input(self, name: str, parts: tuple[Tensor, ...]) -> None:
        """Keep `parts` (a regeneration input) until every region is done."""
        if name in self._inputs:
            return
        self._inputs[name] = parts
        for t in parts:
            self._input_ptrs.append(self.engine.meter.hold(t, self.key, name, "input"))

    def close(self) -> None:
        """The forward is over: regions with nothing dropped are done at once."""
        self.complete = True
        for region in self.regions.values():
            if not region.live and region.state == "open":
                region.state = "done"
        self.region_done()

    def region_done(self) -> None:
        """Release the regeneration inputs once no region needs them."""
        if self.complete and not self.alive():
            for ptr in self._input_ptrs:
                self.engine.meter.release(ptr)
            self._input_ptrs, self._inputs = [], {}

    def pack(self, t: Tensor, ptr: int) -> Saved:
        """Decide what autograd keeps for `t` (storage `ptr`)."""
        raise NotImplementedError

    def regenerate(self, region: Region) -> Mapping[Hashable, Tensor]:
        """Recompute `region`'s dropped tensors; keys as given to `Saved.drop`."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Tag:
    name: str
    part: int
    offset: int


class LayerRecord(RecordBase):
    """Record of a layer whose forward tags graph-named tensors (the built-in model).

    It is the `OpRuntime` of that forward: `tag` names storages, `mask` remembers each dropout
    generator state the regions will need, `window` forwards to the engine.
    """

    def __init__(self, engine: "RecomputeEngine", mb: int, layer: int, program: Any,
                 dropped: frozenset[str], full: bool) -> None:
        super().__init__(engine, mb, layer)
        self.program, self.full, self.dropped = program, full, dropped
        graph = program.graph
        if full:
            self.regions[-1] = Region(self, -1, frozenset(), tuple(program.op_names))
        for seg in sorted({graph.tensor(n).segment for n in dropped}):
            names = frozenset(n for n in dropped if graph.tensor(n).segment == seg)
            self.regions[seg] = Region(self, seg, names, graph.recompute_ops(names, seg))
        self._rerun = {op for r in self.regions.values() for op in r.ops}
        self._tags: dict[int, _Tag] = {}
        self._pending: dict[int, list[Saved]] = {}
        self.rng: dict[str, Tensor] = {}

    def region_of(self, name: str) -> Region | None:
        """Region that regenerates `name`, or None when it is kept."""
        if self.full:
            return self.regions[-1] if name != "x" else None
        if name in self.dropped:
            return self.regions[self.program.graph.tensor(name).segment]
        return None

    # --- OpRuntime -------------------------------------------------------------------------
    def tag(self, name: str, *parts: Tensor) -> None:
        for i, t in enumerate(parts):
            ptr = t.untyped_storage().data_ptr()
            old = self._tags.get(ptr)
            if old is not None and old.name != name:
                raise LynxError(f"layer {self.layer}: {name!r} shares storage with {old.name!r}")
            tag = self._tags[ptr] = _Tag(name, i, t.storage_offset())
            for saved in self._pending.pop(ptr, []):
                self._resolve(saved, tag)

    def window(self, kind: str, step: int) -> None:
        self.engine.window(kind, self.layer, step)

    def mask(self, op: str, shape: tuple[int, ...], p: float,
             generator: torch.Generator) -> Tensor:
        if op in self._rerun:
            self.rng[op] = generator.get_state()
        return draw_keep_mask(shape, p, generator)

    def finish(self, env: Env, reads: Mapping[str, frozenset[str]],
               writes: Mapping[str, frozenset[str]]) -> None:
        for saved_list in self._pending.values():
            for saved in saved_list:
                saved.keep(self.key, UNTAGGED)
        self._pending = {}
        for region in self.regions.values():
            self._hold_inputs(region, env, reads, writes)
        self.engine.closed(self)
        self.close()

    def _hold_inputs(self, region: Region, env: Env, reads: Mapping[str, frozenset[str]],
                     writes: Mapping[str, frozenset[str]]) -> None:
        needed = set().union(*(reads.get(op, frozenset()) for op in region.ops))
        needed -= set().union(*(writes.get(op, frozenset()) for op in region.ops))
        tagged = {t.name for t in self._tags.values()}
        for name in sorted(needed):
            if name not in tagged or self.region_of(name) is not None:
                raise LynxError(f"layer {self.layer}: recomputing {region.ops} needs {name!r}, "
                                f"which is not a kept saved tensor of the layer")
            self.hold_input(name, env.parts(name))

    # --- engine side -----------------------------------------------------------------------
    def pack(self, t: Tensor, ptr: int) -> Saved:
        saved = Saved(t, self.engine)
        tag = self._tags.get(ptr)
        if tag is None:  # produced inside the op that saves it: wait for its tag
            self._pending.setdefault(ptr, []).append(saved)
        else:
            self._resolve(saved, tag)
        return saved

    def _resolve(self, saved: Saved, tag: _Tag) -> None:
        region = self.region_of(tag.name)
        if region is None:
            saved.keep(self.key, tag.name)
        else:
            saved.drop(region, (tag.name, tag.part), tag.offset)

    def regenerate(self, region: Region) -> Mapping[Hashable, Tensor]:
        env = Env(self._inputs)
        with torch.no_grad():
            self.program.run_ops(env, _Replay(self, region.segment == -1), region.ops)
        return {key: env.parts(key[0])[key[1]] for key in region.live}


class _Replay:
    """OpRuntime of a recompute: replays recorded dropout states; no tags; collectives only in
    a whole-layer (-1) replay, where windows stay empty."""

    def __init__(self, record: LayerRecord, collectives: bool) -> None:
        self.record, self.collectives = record, collectives

    def tag(self, name: str, *parts: Tensor) -> None:
        return None

    def window(self, kind: str, step: int) -> None:
        if not self.collectives:
            raise LynxError(f"layer {self.record.layer}: a segment recompute reached a collective "
                            f"(step {step}); segments must not span collectives")

    def mask(self, op: str, shape: tuple[int, ...], p: float,
             generator: torch.Generator) -> Tensor:
        state = self.record.rng.get(op)
        if state is None:
            raise LynxError(f"layer {self.record.layer}: no recorded RNG state for {op}")
        current = generator.get_state()
        generator.set_state(state)
        try:
            return draw_keep_mask(shape, p, generator)
        finally:
            generator.set_state(current)

    def finish(self, env: Env, reads: Mapping[str, frozenset[str]],
               writes: Mapping[str, frozenset[str]]) -> None:
        return None
