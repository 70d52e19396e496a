"""Rank layout and process groups of one training job (no global state).

Ranks are laid out as Megatron does (and as the emulated cluster shapes its links): tensor
parallel fastest, then data parallel, then pipeline, i.e.
`rank = base + tp_i + tp * (dp_i + dp * pp_i)`. A job may occupy a slice of the world
(`base`), so several jobs can share one launch (the tests run configurations side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lynxpipe.errors import LynxError


@dataclass(frozen=True)
class RankLayout:
    """Where each (tp, dp, pp) coordinate lives among the world's ranks."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline-parallel degree."""
    dp: int
    """Data-parallel degree."""
    base: int = 0
    """Global rank of coordinate (0, 0, 0); the job uses ranks base .. base + size - 1."""

    @property
    def size(self) -> int:
        """Ranks in the job."""
        return self.tp * self.pp * self.dp

    def rank(self, tp_i: int, dp_i: int, pp_i: int) -> int:
        """Global rank of a coordinate."""
        return self.base + tp_i + self.tp * (dp_i + self.dp * pp_i)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_i, dp_i, pp_i) of a global rank of the job."""
        local = rank - self.base
        if not 0 <= local < self.size:
            raise LynxError(f"rank {rank} is not in this job (ranks {self.base}.."
                            f"{self.base + self.size - 1})")
        return local % self.tp, local // self.tp % self.dp, local // (self.tp * self.dp)

    def members(self) -> range:
        """Global ranks of the job."""
        return range(self.base, self.base + self.size)


@dataclass(frozen=True)
class ProcessGroups:
    """One rank's view of its job: coordinates, peers and process groups (None when size 1)."""

    layout: RankLayout
    """The job's layout."""
    rank: int
    """This process's global rank."""
    tp_rank: int
    """Index in the TP group."""
    dp_rank: int
    """Index in the DP group."""
    pp_rank: int
    """Pipeline rank (hosts virtual stages pp_rank, pp_rank + pp, ...)."""
    tp: Any
    """TP process group (None when tp == 1)."""
    dp: Any
    """DP process group (None when dp == 1)."""
    pp: Any
    """Pipeline process group (None when pp == 1); p2p goes through it."""
    pp_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, by pipeline rank."""

    def pipeline_peer(self, pp_rank: int) -> int:
        """Global rank of pipeline rank `pp_rank` in this rank's pipeline."""
        return self.pp_ranks[pp_rank]


def _new(ranks: list[int], timeout_s: float | None, backend: str | None) -> Any:
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    return dist.new_group(ranks, backend=backend, **kwargs)


def make_groups(layout: RankLayout, timeout_s: float | None = None,
                backend: str | None = None) -> ProcessGroups | None:
    """Create every TP, DP and PP group of `layout`; returns this rank's, or None when this
    process is not in the job.

    Collective over the *world*: every process must call it with the same layouts in the same
    order (torch's `new_group` contract), members or not.
    """
    if layout.base + layout.size > dist.get_world_size():
        raise LynxError(f"layout needs ranks up to {layout.base + layout.size - 1}, world has "
                        f"{dist.get_world_size()}")
    me = dist.get_rank()
    mine: dict[str, Any] = {"tp": None, "dp": None, "pp": None}
    pp_ranks: tuple[int, ...] = ()
    lay = layout
    families = {
        "tp": [[lay.rank(t, d, p) for t in range(lay.tp)] for p in range(lay.pp)
               for d in range(lay.dp)],
        "dp": [[lay.rank(t, d, p) for d in range(lay.dp)] for p in range(lay.pp)
               for t in range(lay.tp)],
        "pp": [[lay.rank(t, d, p) for p in range(lay.pp)] for d in range(lay.dp)
               for t in range(lay.tp)],
    }
    for kind, groups in families.items():
        for ranks in groups:
            if me in ranks and kind == "pp":
                pp_ranks = tuple(ranks)
            if len(ranks) == 1:
                continue
            group = _new(ranks, timeout_s, backend)
            if me in ranks:
                mine[kind] = group
    if me not in layout.members():
        return None
    tp_i, dp_i, pp_i = layout.coords(me)
    return ProcessGroups(layout, me, tp_i, dp_i, pp_i, mine["tp"], mine["dp"], mine["pp"],
                         pp_ranks)
