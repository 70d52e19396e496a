"""Overlapped recomputation for your own transformer blocks (public user-model API).

With a plan (SPEC §11)
----------------------
`blocks = wrap_blocks(model.model.layers, plan=load_plan("plan.json"))` drops, in every block,
exactly the saved tensors the plan drops, named as `lynxpipe profile --module` named them
(`runtime.engine.tracer`): no segments to write, no per-architecture code. `blocks.engine` is
the `RecomputeEngine` of pipeline rank `pp_rank` (its planned windows; run them with
`engine.run_tasks(window)` where your loop waits; everything else recomputes on demand). A block
whose forward depends on tensor values, writes a saved tensor in place, or gets a KV cache is
refused with a message naming the cause.

Without a plan (segments)
-------------------------
1. A *block* is an `nn.Module` called as `block(hidden, *args, **kwargs)`; a stack of them is
   wrapped with `wrap_blocks(blocks, engine, first_layer=0, segments=None)`. Layer indices are
   `first_layer + i`; the engine's policy and tasks refer to them.
2. Optionally split a block into *segments*: `segments(block)` returns callables
   `fn(hidden, *args, **kwargs) -> hidden` whose composition is the block's forward (e.g.
   attention + residual, then MLP + residual; cut where your collectives are). Segment `i` is
   named `seg<i>`. Without `segments` the block is one segment, `seg0`.
3. Policy (on the `RecomputeEngine`): `dropped={layer: {"seg0", ...}}` drops everything
   autograd saves inside those segments except their input (kept by the engine);
   `full_layers={layer}` keeps only the block input and replays the whole block (segment -1).
   Tasks `(mb, layer, segment)` pinned to a window run there; others run on demand.
4. Windows: call `engine.window(kind, layer, step)` between issuing and waiting one of your
   collectives, or `engine.run_tasks(Window(...))` at any idle point (a RECV wait).
5. A recomputed segment must be deterministic given its input, its extra arguments (which it
   must not mutate: no KV cache in training, e.g. `use_cache=False`) and the global torch RNG
   (CPU and the input's CUDA device), which the engine saves at the segment start and restores
   for the replay, so dropout replays exactly. Autograd must save the same
   tensors in the same order on replay (the engine matches them by order, like
   `torch.utils.checkpoint`). Parameters are never dropped.
6. Drive it as the built-in model: `with engine.forward(mb, stage): loss = model(...)`,
   `with engine.backward(mb, stage): loss.backward()`, then `engine.end_step()`.
   Only tensors saved inside wrapped blocks are dropped and metered.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lynxpipe.errors import LynxError
from lynxpipe.runtime.engine.recompute import RecomputeEngine
from lynxpipe.runtime.engine.records import RecordBase, Region, Saved
from lynxpipe.runtime.engine.traced import TracedRecord
from lynxpipe.runtime.engine.tracer import path_tracker

if TYPE_CHECKING:
    from lynxpipe.plan.types import Plan

SegmentFn = Callable[..., Any]
Segments = Callable[[nn.Module], Sequence[SegmentFn]]
SEGMENT_NAME = re.compile(r"seg\d+")


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class BlockRecord(RecordBase):
    """Record of one wrapped block's forward: saved tensors are matched by order per segment."""

    def __init__(self, engine: RecomputeEngine, mb: int, layer: int, fns: Sequence[SegmentFn],
                 extra: tuple[tuple[Any, ...], dict[str, Any]], dropped: Iterable[int],
                 full: bool) -> None:
        super().__init__(engine, mb, layer)
        self.fns, self.extra, self.full = list(fns), extra, full
        if full:
            self.regions[-1] = Region(self, -1, frozenset(), ())
        for seg in dropped:
            self.regions[seg] = Region(self, seg, frozenset({f"seg{seg}"}), ())
        self._seg, self._count = 0, [0] * len(self.fns)
        self._input_ptr = -1
        self._rng: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._grad: dict[int, bool] = {}

    def run(self, hidden: Any) -> Any:
        """The block's forward, segment by segment, remembering what a replay needs."""
        args, kwargs = self.extra
        for i, fn in enumerate(self.fns):
            self._seg = i
            if i in self.regions or (self.full and i == 0):
                self.hold_input(f"seg{i}_in", (hidden,))
                self._rng[i] = _rng_state(hidden.device)
                self._grad[i] = hidden.requires_grad
            if i == 0 or not self.full:
                self._input_ptr = hidden.untyped_storage().data_ptr()
            hidden = fn(hidden, *args, **kwargs)
        return hidden

    def finish(self) -> None:
        """The forward is over."""
        self.engine.closed(self)
        self.close()

    def pack(self, t: Tensor, ptr: int) -> Saved:
        saved = Saved(t, self.engine)
        key = (self._seg, self._count[self._seg])
        self._count[self._seg] += 1
        region = self.regions.get(-1) or self.regions.get(self._seg)
        if region is None or ptr == self._input_ptr:
            saved.keep(self.key, f"seg{self._seg}")
        else:
            saved.drop(region, key, None)
        return saved

    def regenerate(self, region: Region) -> Mapping[Hashable, Tensor]:
        segs = range(len(self.fns)) if region.segment == -1 else [region.segment]
        first = segs[0]
        (hidden,) = self._inputs[f"seg{first}_in"]
        hidden = hidden.detach().requires_grad_(self._grad[first])
        out: dict[Hashable, Tensor] = {}
        seg, count = [first], [0] * len(self.fns)
        params = self.engine.param_storages

        def collect(t: Tensor) -> None:
            ptr = t.untyped_storage().data_ptr()
            if ptr == 0 or ptr in params:
                return None
            key = (seg[0], count[seg[0]])
            count[seg[0]] += 1
            if key in region.live:
                out[key] = t.detach()
            return None

        current = _rng_state(hidden.device)
        args, kwargs = self.extra
        try:
            _set_rng_state(hidden.device, self._rng[first])
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(collect, _never):
                for i in segs:
                    seg[0] = i
                    hidden = self.fns[i](hidden, *args, **kwargs)
        finally:
            _set_rng_state(hidden.device, current)
        return out


def _never(_: Any) -> Tensor:
    raise LynxError("a recompute's own autograd graph was used for backward")


class RecomputedBlock(nn.Module):
    """A user block under a `RecomputeEngine` (see the module docstring for the contract)."""

    def __init__(self, block: nn.Module, layer: int, engine: RecomputeEngine | None = None,
                 segments: Segments | None = None) -> None:
        super().__init__()
        self.block, self.layer, self.segments = block, layer, segments
        self.engine = engine
        """The engine in use; replace it to change policy (None: plain forward)."""

    def __getattr__(self, name: str) -> Any:
        """Attributes the model reads off its layers (e.g. Hugging Face's `attention_type`)
        come from the wrapped block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None:
                raise
            return getattr(block, name)

    def _fns(self) -> list[SegmentFn]:
        return list(self.segments(self.block)) if self.segments is not None else [self.block]

    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        if engine is None or not engine.recording:
            for fn in self._fns():
                hidden = fn(hidden, *args, **kwargs)
            return hidden
        refuse_kv_cache(self.layer, args, kwargs)
        engine.register_params(self.block.parameters())
        mb = engine.begin(self.layer)
        dropped = engine.dropped.get(self.layer, frozenset())
        if self.segments is not None or (dropped and all(SEGMENT_NAME.fullmatch(n)
                                                         for n in dropped)):
            return self._by_segments(engine, mb, hidden, args, kwargs)
        rec = TracedRecord(engine, mb, self.layer, self.block, path_tracker(self.block),
                           (hidden, *args), kwargs, dropped, self.layer in engine.full_layers)
        engine.open(rec)
        try:
            out = rec.run()
        except BaseException:
            engine.closed(rec)
            raise
        rec.finish()
        return out

    def _by_segments(self, engine: RecomputeEngine, mb: int, hidden: Any,
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fns = self._fns()
        names = {f"seg{i}": i for i in range(len(fns))}
        dropped = engine.dropped.get(self.layer, frozenset())
        bad = sorted(set(dropped) - set(names))
        if bad:
            raise LynxError(f"block {self.layer}: cannot drop {bad}; its segments are "
                            f"{sorted(names)}")
        rec = BlockRecord(engine, mb, self.layer, fns, (args, kwargs),
                          sorted(names[n] for n in dropped), self.layer in engine.full_layers)
        engine.open(rec)
        try:
            return rec.run(hidden)
        finally:
            rec.finish()


def refuse_kv_cache(layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A KV cache is state the block appends to: a recompute would append again."""
    values = (*args, *kwargs.values())
    if kwargs.get("use_cache") is True or any(
            v is not None and type(v).__name__.endswith("Cache") and hasattr(v, "update")
            for v in values):
        raise LynxError(f"block {layer} was called with a KV cache (use_cache=True, Hugging "
                        f"Face's default): each recompute would append to it again and backward "
                        f"fails with a shape mismatch; call the model with use_cache=False (or "
                        f"set model.config.use_cache = False) when training")


class WrappedBlocks(nn.ModuleList):
    """`RecomputedBlock`s; `engine` is the engine they use (the plan's, when given one)."""

    engine: RecomputeEngine | None


def wrap_blocks(blocks: Iterable[nn.Module], engine: RecomputeEngine | None = None,
                first_layer: int | None = None, segments: Segments | None = None, *,
                plan: Plan | None = None, pp_rank: int = 0) -> WrappedBlocks:
    """Wrap a stack of blocks; block i becomes layer `first_layer + i` of the engine's policy.

    With `plan`, the blocks are pipeline rank `pp_rank`'s layers of that plan (all of them when
    pp = 1), `first_layer` defaults to the first of them, and `engine` to the plan's engine for
    that rank; the returned list's `.engine` is the engine in use.
    """
    blocks = list(blocks)
    if plan is not None:
        layers = plan_layers(plan, pp_rank)
        if len(blocks) != len(layers):
            raise LynxError(f"the plan puts {len(layers)} layers ({layers[0]}..{layers[-1]}) "
                            f"on pipeline rank {pp_rank}; got {len(blocks)} blocks")
        _check_dtype(plan, blocks)
        if engine is None:
            from lynxpipe.runtime.pipeline.from_plan import engine_for

            engine = engine_for(plan, pp_rank)
        first_layer = layers[0] if first_layer is None else first_layer
    first = 0 if first_layer is None else first_layer
    out = WrappedBlocks(RecomputedBlock(b, first + i, engine, segments)
                        for i, b in enumerate(blocks))
    out.engine = engine
    return out


def plan_layers(plan: Plan, pp_rank: int) -> list[int]:
    """Global layers of pipeline rank `pp_rank` (its virtual stages in model order)."""
    from lynxpipe.schedule.policy import stage_layers

    if not 0 <= pp_rank < plan.parallel.pp:
        raise LynxError(f"pp_rank={pp_rank}: the plan has {plan.parallel.pp} pipeline ranks")
    ranges = stage_layers(plan.partition)
    return [g for s in range(pp_rank, len(ranges), plan.parallel.pp) for g in ranges[s]]


def _check_dtype(plan: Plan, blocks: list[nn.Module]) -> None:
    """The plan's bytes are the blocks' bytes only at the same activation width."""
    param = next((p for b in blocks for p in b.parameters()), None)
    if param is not None and param.element_size() != plan.model.dtype_bytes:
        raise LynxError(f"the plan was made for {plan.model.dtype_bytes}-byte activations but "
                        f"the blocks run {param.dtype} ({param.element_size()} bytes); profile "
                        f"and plan them at their own dtype")


def use_engine(wrapped: Iterable[nn.Module], engine: RecomputeEngine | None) -> None:
    """Point every `RecomputedBlock` in `wrapped` at `engine`."""
    if isinstance(wrapped, WrappedBlocks):
        wrapped.engine = engine
    for block in wrapped:
        if isinstance(block, RecomputedBlock):
            block.engine = engine
