"""The action IR (SPEC §4): small frozen records interpreted by the simulator and the runtime.

Stages are *virtual* stages numbered 0..pp*v-1 along the model; virtual stage `s` lives on
pipeline rank `s % pp` (Megatron's interleaved placement; with v = 1 stage == rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActionKind = Literal["F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "R"]
WindowKind = Literal["fwd_coll", "bwd_coll", "recv", "on_demand"]


@dataclass(frozen=True)
class Window:
    """Where a recompute task runs: an idle interval of the rank's compute stream."""

    kind: WindowKind
    """fwd_coll / bwd_coll: a TP collective inside F or B; recv: a RECV wait; on_demand: right
    before the backward that needs the tensors (exposed)."""
    mb: int = -1
    """Micro-batch of the F/B or RECV hosting the window."""
    stage: int = -1
    """Virtual stage of the F/B or RECV hosting the window."""
    layer: int = -1
    """Global layer index hosting the collective: -1 for the embedding, num_layers for the LM
    head (and -1 for recv/on_demand windows)."""
    step: int = -1
    """Index of the collective step in that layer's forward/backward program."""
    recv: Literal["", "RECV_F", "RECV_B"] = ""
    """For kind == recv: which receive."""


@dataclass(frozen=True)
class Action:
    """One entry of a rank's order."""

    kind: ActionKind
    """F/B compute a micro-batch on a virtual stage; SEND_*/RECV_* move activations/gradients;
    R recomputes (layer, segment) of a micro-batch in `window`."""
    mb: int
    """Micro-batch index."""
    stage: int
    """Virtual stage index (for SEND/RECV: the stage that sends/receives on this rank)."""
    layer: int = -1
    """R only: global layer index."""
    segment: int = -1
    """R only: segment of the layer to regenerate (-1: whole layer with collective replay,
    Megatron full recompute)."""
    window: Window | None = None
    """R only: the window the task is pinned to."""

    def __str__(self) -> str:
        if self.kind == "R":
            w = self.window
            where = f"{w.kind}" if w else "?"
            return f"R(mb{self.mb},L{self.layer},seg{self.segment},{where})"
        return f"{self.kind}(mb{self.mb},s{self.stage})"


@dataclass(frozen=True)
class PipelineOrder:
    """Per-rank action lists of one training step."""

    schedule: str
    """Generator that produced it (gpipe, 1f1b, interleaved)."""
    pp: int
    """Pipeline ranks."""
    virtual_stages: int
    """Chunks per rank."""
    num_microbatches: int
    """Micro-batches per step."""
    ranks: tuple[tuple[Action, ...], ...]
    """ranks[r] is the ordered action list of pipeline rank r."""

    @property
    def num_stages(self) -> int:
        """Virtual stages in all."""
        return self.pp * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """Pipeline rank hosting a virtual stage."""
        return stage % self.pp
