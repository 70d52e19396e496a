"""The recompute engine (SPEC §7): drop planned tensors in forward, regenerate them in windows.

`torch.autograd.graph.saved_tensors_hooks` route every tensor autograd saves during a layer's
forward to that layer's record. The forward tags its named tensors; a saved tensor whose
storage carries a dropped name is released at once, and autograd keeps only a small handle.
What regeneration needs is kept: the kept tensors the recompute ops read, and the dropout
generator state before each op that will be replayed (so masks replay bit-exactly).

Tasks `(mb, layer, segment)` pinned to a `Window` run when the model reaches that window
(`engine.window(kind, layer, step)`, called between issuing and waiting a collective) or when an
executor calls `engine.run_tasks(window)` (RECV waits). A dropped tensor still missing when
backward unpacks it is regenerated then, with its whole region, and counted as exposed.
Segment `-1` is Megatron's full recompute: only the layer input `x` is kept and the whole
layer forward is replayed, collectives included.

Usage, for one stage and one micro-batch:

    engine = RecomputeEngine(dropped={0: frozenset({"probs", "probs_dropped"})})
    with engine.forward(mb=0, stage=0):
        loss = stage(ids, targets, engine)
    with engine.backward(mb=0, stage=0):
        loss.backward()
    stats = engine.end_step()
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from lynxpipe.errors import LynxError
from lynxpipe.runtime.engine.meter import EngineStats, MemoryMeter, TaskRecord
from lynxpipe.runtime.engine.records import LayerRecord, RecordBase, Region, Saved
from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.windows import ON_DEMAND


class Task(NamedTuple):
    """A recompute task: regenerate the dropped tensors of (micro-batch, layer, segment)."""

    mb: int
    layer: int
    segment: int


@dataclass(frozen=True)
class _Context:
    mb: int
    stage: int
    phase: str


class RecomputeEngine:
    """Drops, regenerates and accounts saved activations of one pipeline rank.

    dropped: layer -> names of droppable graph tensors to drop (user blocks: `seg<i>`).
    tasks: window -> tasks to run there; tasks not listed anywhere run on demand.
    full_layers: layers recomputed whole with collective replay (also every layer that has a
        task with segment -1).
    sync_cuda: synchronise CUDA around each recompute so `time_s` is device time.
    """

    def __init__(self, dropped: Mapping[int, Iterable[str]] | None = None,
                 tasks: Mapping[Window, Sequence[tuple[int, int, int]]] | None = None,
                 full_layers: Iterable[int] = (), *, sync_cuda: bool = False) -> None:
        self.dropped = {int(k): frozenset(v) for k, v in (dropped or {}).items() if v}
        self.tasks = {w: tuple(Task(*t) for t in ts) for w, ts in (tasks or {}).items()}
        self.full_layers = frozenset(full_layers) | {
            t.layer for ts in self.tasks.values() for t in ts if t.segment == -1}
        both = self.full_layers & set(self.dropped)
        if both:
            raise LynxError(f"layers {sorted(both)} are both fully recomputed and selectively "
                            f"dropped; choose one policy per layer")
        self._planned: dict[Task, Window] = {}
        for window, ts in self.tasks.items():
            for task in ts:
                if task in self._planned:
                    raise LynxError(f"task {task} is pinned to two windows")
                self._planned[task] = window
        self.sync_cuda = sync_cuda
        self.meter = MemoryMeter()
        """Activation bytes held for backward (see `runtime.engine.meter`)."""
        self._params: set[int] = set()
        self._records: dict[tuple[int, int], RecordBase] = {}
        self._ctx: _Context | None = None
        self._active: RecordBase | None = None
        self._log: list[TaskRecord] = []
        self._opened: set[Window] = set()

    # --- driving ---------------------------------------------------------------------------
    def register_params(self, params: Iterable[Tensor]) -> None:
        """Storages autograd may save that are parameters (never counted, never dropped)."""
        self._params.update(p.untyped_storage().data_ptr() for p in params)

    @contextmanager
    def forward(self, mb: int, stage: int = 0) -> Iterator["RecomputeEngine"]:
        """Run a forward of micro-batch `mb` on virtual stage `stage` under the engine."""
        self._ctx = _Context(mb, stage, "fwd")
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._ctx, self._active = None, None

    @contextmanager
    def backward(self, mb: int, stage: int = 0) -> Iterator["RecomputeEngine"]:
        """Run the backward of micro-batch `mb` on `stage` (backward windows get its tasks)."""
        self._ctx = _Context(mb, stage, "bwd")
        try:
            yield self
        finally:
            self._ctx = None

    def record(self, layer: int, program: Any) -> LayerRecord:
        """Start the forward of `layer` (a module with `graph`, `op_names`, `run_ops`); the
        returned record is the layer's `OpRuntime`."""
        mb = self.begin(layer)
        dropped = self.dropped.get(layer, frozenset())
        full = layer in self.full_layers
        if dropped or full:
            _check_policy(layer, program, dropped)
        rec = LayerRecord(self, mb, layer, program, dropped, full)
        self.open(rec)
        return rec

    @property
    def recording(self) -> bool:
        """True inside `engine.forward(...)`."""
        return self._ctx is not None and self._ctx.phase == "fwd"

    @property
    def param_storages(self) -> frozenset[int]:
        """Storage pointers of registered parameters."""
        return frozenset(self._params)

    def begin(self, layer: int) -> int:
        """Check that a forward of `layer` may start now; returns its micro-batch."""
        ctx = self._ctx
        if ctx is None or ctx.phase != "fwd":
            raise LynxError("run the stage forward inside `with engine.forward(mb, stage):`")
        old = self._records.get((ctx.mb, layer))
        if old is not None and old.alive():
            raise LynxError(f"forward of micro-batch {ctx.mb}, layer {layer} ran again before "
                            f"its backward used the dropped tensors (call end_step per step)")
        return ctx.mb

    def open(self, rec: RecordBase) -> None:
        """Route saved tensors to `rec` until it is closed (used by `runtime.engine.blocks`)."""
        self._records[rec.key] = rec
        self._active = rec

    def closed(self, rec: RecordBase) -> None:
        """`rec`'s forward is over."""
        if self._active is rec:
            self._active = None

    # --- windows ---------------------------------------------------------------------------
    def window(self, kind: str, layer: int, step: int) -> None:
        """A collective of `layer` (step `step` of its program) is in flight: run its tasks."""
        ctx = self._ctx
        if ctx is not None:
            self.run_tasks(Window(kind, ctx.mb, ctx.stage, layer, step))  # type: ignore[arg-type]

    def run_tasks(self, window: Window) -> None:
        """Run the tasks pinned to `window` (executors call this for RECV waits)."""
        self._opened.add(window)
        for task in self.tasks.get(window, ()):
            region = self._region_for(task, window)
            if region is not None:
                self._run(region, window)

    def _region_for(self, task: Task, window: Window) -> Region | None:
        where = f"task R(mb{task.mb}, L{task.layer}, seg{task.segment}) in {window}"
        rec = self._records.get((task.mb, task.layer))
        if rec is None or not rec.complete:
            raise LynxError(f"{where}: the forward of that layer has not finished yet")
        region = rec.regions.get(task.segment)
        if region is None:
            if (task.segment == -1) != (task.layer in self.full_layers):
                raise LynxError(f"{where}: segment -1 is only for fully recomputed layers")
            return None  # nothing dropped in this segment
        if region.state == "ready":
            raise LynxError(f"{where}: already recomputed")
        if region.state == "done":
            if region.dropped_any:
                raise LynxError(f"{where}: runs after the backward that needed it")
            return None  # the forward saved nothing this region would drop
        return region

    def _run(self, region: Region, window: Window | None) -> None:
        rec = region.record
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffers = rec.regenerate(region)
        if self.sync_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        nbytes = region.set_ready(buffers)
        task = Task(rec.key[0], rec.layer, region.segment)
        self._log.append(TaskRecord(task.mb, task.layer, task.segment,
                                    window.kind if window else ON_DEMAND, window,
                                    self._planned.get(task), elapsed, nbytes,
                                    getattr(rec, "last_flops", 0)))

    # --- saved-tensor hooks ----------------------------------------------------------------
    def _pack(self, t: Tensor) -> Any:
        rec = self._active
        if rec is None:
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0 or ptr in self._params:
            return t
        return rec.pack(t, ptr)

    def _unpack(self, saved: Any) -> Tensor:
        if not isinstance(saved, Saved):
            return saved
        if saved.tensor is not None:
            return saved.tensor
        region = saved.region
        assert region is not None
        if region.state == "open":
            self._run(region, None)
        base = region.buffers[saved.key]
        if saved.geom is None:
            return base
        size, stride, offset = saved.geom
        return base.as_strided(size, stride, base.storage_offset() + offset)

    # --- results ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters since the last `end_step`."""
        hidden = sum(r.time_s for r in self._log if r.where != ON_DEMAND)
        exposed = sum(r.time_s for r in self._log if r.where == ON_DEMAND)
        missed = tuple(w for w in self.tasks if w not in self._opened
                       and any(t[:2] in self._records for t in self.tasks[w]))
        return EngineStats(tuple(self._log), hidden, exposed, self.meter.peak_bytes,
                           self.meter.current_bytes, missed)

    def end_step(self) -> EngineStats:
        """Check every dropped tensor was used, return the step's counters and reset them."""
        live = sorted(k for k, r in self._records.items() if r.alive())
        if live:
            raise LynxError(f"end_step: (micro-batch, layer) {live} still hold dropped tensors; "
                            f"run their backward first")
        stats = self.stats()
        self._records, self._log, self._opened = {}, [], set()
        self.meter.reset_peak()
        return stats


def _check_policy(layer: int, program: Any, dropped: frozenset[str]) -> None:
    """Dropped names must be droppable tensors of the layer's graph."""
    if not hasattr(program, "run_ops"):
        raise LynxError(f"layer {layer} (embedding/head) cannot be recomputed")
    droppable = {t.name for t in program.graph.droppable()}
    bad = sorted(dropped - droppable)
    if bad:
        raise LynxError(f"layer {layer}: cannot drop {bad}; droppable tensors are "
                        f"{sorted(droppable)} (the others need a collective to regenerate)")
