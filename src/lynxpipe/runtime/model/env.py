"""What a layer's forward talks to: named tensors (`Env`), the runtime hooks (`OpRuntime`) and
the dropout generators (`ModelRng`).

A layer is a table of ops named as in the cost graph. Each op reads named tensors from an `Env`
and puts its outputs back; saved tensors are announced to the runtime with `tag` (so the
recompute engine can tell which named tensor autograd is saving), collectives call `window`
between issue and wait, and dropout draws its mask through `mask` (so the engine can replay it).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Mapping, Protocol

import torch
from torch import Tensor

from lynxpipe.errors import LynxError
from lynxpipe.runtime.model.ops import draw_keep_mask


class Env:
    """Named tensors of one layer forward; a name may have several parts (dropout: out, mask)."""

    def __init__(self, values: Mapping[str, tuple[Tensor, ...]] | None = None,
                 track: bool = False) -> None:
        self._values: dict[str, tuple[Tensor, ...]] = dict(values or {})
        self._track, self._op = track, ""
        self.reads: dict[str, set[str]] = {}
        """Per op: the names it read (only when tracking)."""
        self.writes: dict[str, set[str]] = {}
        """Per op: the names it put (only when tracking)."""

    def __getitem__(self, name: str) -> Tensor:
        return self.parts(name)[0]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def parts(self, name: str) -> tuple[Tensor, ...]:
        """All parts of `name`."""
        if self._op:
            self.reads[self._op].add(name)
        try:
            return self._values[name]
        except KeyError:
            raise LynxError(f"op {self._op or '?'} needs tensor {name!r}, which is neither kept "
                            f"nor regenerated here") from None

    def put(self, name: str, *parts: Tensor) -> None:
        """Store `name`."""
        if self._op:
            self.writes[self._op].add(name)
        self._values[name] = parts

    @contextmanager
    def op(self, name: str) -> Iterator[None]:
        """Attribute reads and writes inside the block to op `name` (when tracking)."""
        if not self._track:
            yield
            return
        self._op = name
        self.reads.setdefault(name, set())
        self.writes.setdefault(name, set())
        try:
            yield
        finally:
            self._op = ""


class OpRuntime(Protocol):
    """Hooks a layer forward calls; see `PlainRuntime` for the no-engine behaviour."""

    def tag(self, name: str, *parts: Tensor) -> None:
        """Announce that `parts` are the named tensor `name` (before or after autograd saves it)."""

    def window(self, kind: str, step: int) -> None:
        """A collective of this layer is in flight (kind fwd_coll/bwd_coll, step in the graph)."""

    def mask(self, op: str, shape: tuple[int, ...], p: float,
             generator: torch.Generator) -> Tensor:
        """Dropout keep-mask of op `op`."""

    def finish(self, env: Env, reads: Mapping[str, frozenset[str]],
               writes: Mapping[str, frozenset[str]]) -> None:
        """The layer forward is over; `reads`/`writes` are its ops' data dependencies."""


class PlainRuntime:
    """No engine: nothing is tagged, windows are empty, masks are fresh draws."""

    def tag(self, name: str, *parts: Tensor) -> None:
        return None

    def window(self, kind: str, step: int) -> None:
        return None

    def mask(self, op: str, shape: tuple[int, ...], p: float,
             generator: torch.Generator) -> Tensor:
        return draw_keep_mask(shape, p, generator)

    def finish(self, env: Env, reads: Mapping[str, frozenset[str]],
               writes: Mapping[str, frozenset[str]]) -> None:
        return None


PLAIN = PlainRuntime()


def _mix(*key: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ModelRng:
    """Dropout generators of one model replica on one TP rank.

    `shared` gives the same masks on every TP rank (replicated activations: residual dropout
    without SP); `local` differs per TP rank (sharded attention heads, SP token shards), as
    Megatron's model-parallel RNG tracker. Each layer reseeds both from (seed, key, layer), so
    masks do not depend on the order layers run in (pipeline schedules, stage splits); set
    `key` (e.g. (step, micro-batch)) before each forward so micro-batches differ.
    """

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu") -> None:
        self.seed, self.tp_rank = seed, tp_rank
        self.key: tuple[int, ...] = ()
        self.shared = torch.Generator(device=device)
        self.local = torch.Generator(device=device)

    def set_key(self, *key: int) -> None:
        """Set the per-forward key, e.g. (step, micro_batch)."""
        self.key = tuple(key)

    def for_layer(self, layer: int) -> None:
        """Reseed both generators for `layer` under the current key."""
        self.shared.manual_seed(_mix(self.seed, layer, -1, *self.key))
        self.local.manual_seed(_mix(self.seed, layer, self.tp_rank, *self.key))
