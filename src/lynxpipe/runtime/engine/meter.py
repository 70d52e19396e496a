"""Counters of the recompute engine: activation memory held for backward and recompute tasks.

The meter counts what the planner's memory model counts (SPEC §7): bytes of *unique storages*
autograd keeps for backward (views share a storage; a tensor saved by two ops counts once;
parameters are excluded; bool masks are 1 byte per element), plus buffers the engine itself
holds: recomputed tensors waiting for their backward and kept tensors it needs to regenerate
dropped ones. Each storage is attributed to an owner (micro-batch, layer) and a tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from lynxpipe.schedule.actions import Window

HeldKind = Literal["saved", "recomputed", "input", "recv"]
"""saved: kept by autograd; recomputed: regenerated, waiting for backward; input: kept by the
engine to regenerate; recv: pipeline receive buffers (counted by the executor)."""


@dataclass(frozen=True)
class TaskRecord:
    """One recompute of (micro-batch, layer, segment) that actually ran."""

    mb: int
    """Micro-batch."""
    layer: int
    """Global layer index."""
    segment: int
    """Segment of the layer (-1: the whole layer, collectives replayed)."""
    where: str
    """Window kind it ran in (fwd_coll, bwd_coll, recv) or `on_demand` (exposed)."""
    window: Window | None
    """The window it ran in; None on demand."""
    planned: Window | None
    """The window the plan pinned it to; None when planned on demand."""
    time_s: float
    """Wall time of the recompute (host time; see RecomputeEngine.sync_cuda)."""
    regenerated_bytes: int
    """Bytes of the dropped tensors it regenerated (held until their backward)."""
    flops: int = 0
    """FLOPs of the ops it re-ran (torch's FlopCounterMode formulas; traced blocks only)."""


@dataclass(frozen=True)
class EngineStats:
    """What the engine measured since the last `end_step` (or its creation)."""

    tasks: tuple[TaskRecord, ...]
    """Every recompute that ran, in order."""
    hidden_s: float
    """Recompute time spent inside windows (fwd_coll, bwd_coll, recv)."""
    exposed_s: float
    """Recompute time spent on demand, on the critical path of backward."""
    peak_bytes: int
    """Peak of bytes held for backward (saved + recomputed + engine-held inputs)."""
    current_bytes: int
    """Bytes held now."""
    missed: tuple[Window, ...]
    """Windows that had planned tasks but never opened (their tasks ran on demand)."""


@dataclass
class _Entry:
    nbytes: int
    count: int
    owner: tuple[int, int]
    name: str
    kind: HeldKind


class MemoryMeter:
    """Reference-counted bytes of unique storages held for backward, with the peak."""

    def __init__(self) -> None:
        self._held: dict[int, _Entry] = {}
        self.current_bytes = 0
        """Bytes held now."""
        self.peak_bytes = 0
        """Largest `current_bytes` since the last `reset_peak`."""

    def hold(self, t: Tensor, owner: tuple[int, int], name: str, kind: HeldKind) -> int:
        """Count `t`'s storage once more; returns the key to `release` it with."""
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        entry = self._held.get(ptr)
        if entry is None:
            self._held[ptr] = _Entry(storage.nbytes(), 1, owner, name, kind)
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry.count += 1
        return ptr

    def release(self, ptr: int) -> None:
        """Drop one reference taken by `hold`."""
        entry = self._held[ptr]
        entry.count -= 1
        if entry.count == 0:
            del self._held[ptr]
            self.current_bytes -= entry.nbytes

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current level."""
        self.peak_bytes = self.current_bytes

    def breakdown(self, kind: HeldKind | None = None) -> dict[tuple[int, int], dict[str, int]]:
        """Bytes held now per owner (micro-batch, layer) and tensor name."""
        out: dict[tuple[int, int], dict[str, int]] = {}
        for entry in self._held.values():
            if kind is None or entry.kind == kind:
                names = out.setdefault(entry.owner, {})
                names[entry.name] = names.get(entry.name, 0) + entry.nbytes
        return out
