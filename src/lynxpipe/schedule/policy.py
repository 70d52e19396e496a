"""Per-layer recomputation decisions and the stage partition they apply to: the vocabulary the
planners produce and the simulator, the runtime and the reports consume."""

from __future__ import annotations

from dataclasses import dataclass

FULL_SEGMENT = -1
"""Segment id of Megatron full recompute (the whole layer, collectives replayed)."""


@dataclass(frozen=True)
class LayerPolicy:
    """What one transformer layer keeps for backward."""

    dropped: frozenset[str] = frozenset()
    """Saved tensors dropped in forward and regenerated (by segment, no collective replay)."""
    full: bool = False
    """Megatron full recompute: keep only the layer input and replay the whole layer forward,
    collectives included, right before its backward."""

    def label(self) -> str:
        """Short human description."""
        if self.full:
            return "full"
        return "keep all" if not self.dropped else "drop " + ",".join(sorted(self.dropped))


KEEP_ALL = LayerPolicy()
FULL = LayerPolicy(full=True)


def stage_layers(partition: tuple[int, ...]) -> list[range]:
    """Global layer indices of each virtual stage, given layer counts per stage."""
    out, start = [], 0
    for count in partition:
        out.append(range(start, start + count))
        start += count
    return out


def uniform_partition(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Megatron's split: equal counts, the remainder on the earliest stages."""
    base, extra = divmod(num_layers, num_stages)
    return tuple(base + (1 if s < extra else 0) for s in range(num_stages))
