"""The action IR (SPEC §4): small immutable records interpreted by the simulator and the runtime.

Stages are *virtual* stages numbered 0..pp*v-1 along the model; virtual stage `s` lives on
pipeline rank `s % pp` (Megatron's interleaved placement; with v = 1 stage == rank). Every
action and window has a compact text form that parses back (`schedule.text`), e.g.
`R(mb3,L7,seg1,s0)@bwd_coll(mb3,s0,L8,2)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from lynxpipe.errors import LynxError
from lynxpipe.schedule.windows import WINDOW_KINDS, WindowKind, window_kind

ActionKind = Literal["F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "R"]
ACTION_KINDS: tuple[str, ...] = ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "R")


_HOST_OF = {name: info.host for name, info in WINDOW_KINDS.items()}
"""Window kind -> kind of the action hosting it ('' for on demand)."""


class Window(NamedTuple):
    """Where a recompute task runs: an idle interval of the rank's compute stream.

    A named tuple, not a dataclass: the simulator opens thousands of windows per step and keys
    its tables by them, and a tuple builds and hashes several times faster.
    """

    kind: WindowKind
    """A kind of `schedule.windows.WINDOW_KINDS` (fwd_coll, bwd_coll, recv, on_demand)."""
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

    def host(self) -> tuple[str, int, int] | None:
        """(action kind, micro-batch, stage) of the action containing the window; None for
        on demand (the task then runs right before the backward that needs it)."""
        host = _HOST_OF.get(self.kind)  # asked per task by every simulation: no call
        if host is None:
            host = window_kind(self.kind).host  # an unknown kind: raises, naming the known
        if not host:
            return None
        return (self.recv if host == "RECV" else host, self.mb, self.stage)

    def __str__(self) -> str:
        from lynxpipe.schedule.text import format_window

        return format_window(self)

    def __json__(self) -> str:
        """JSON form: the compact text."""
        return str(self)

    @classmethod
    def __from_json__(cls, data: object, where: str) -> Window:
        """Inverse of `__json__`."""
        from lynxpipe.schedule.text import parse_window

        if not isinstance(data, str):
            raise LynxError(f"{where}: a window is written as text, e.g. bwd_coll(mb3,s0,L8,2)")
        return parse_window(data)


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
        from lynxpipe.schedule.text import format_action

        return format_action(self)


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
    """ranks[r] is the ordered action list of pipeline rank r (stored as compact text)."""

    @property
    def num_stages(self) -> int:
        """Virtual stages in all."""
        return self.pp * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """Pipeline rank hosting a virtual stage."""
        return stage % self.pp

    def __json__(self) -> dict[str, object]:
        """plan.json form: one compact text line per action (diffable, ~8x smaller)."""
        from lynxpipe.schedule.text import format_action

        return {"schedule": self.schedule, "pp": self.pp, "virtual_stages": self.virtual_stages,
                "num_microbatches": self.num_microbatches,
                "ranks": [[format_action(a) for a in r] for r in self.ranks]}

    @classmethod
    def __from_json__(cls, data: object, where: str) -> PipelineOrder:
        """Inverse of `__json__`; a malformed entry is a LynxError naming it."""
        from lynxpipe.schedule.text import parse_order_json

        return parse_order_json(data, where)
