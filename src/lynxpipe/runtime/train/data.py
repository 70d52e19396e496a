"""Training data: synthetic token sequences or the shipped text corpus, byte-level.

Every batch is a pure function of (seed, step, DP rank, micro-batch), so each rank builds the
batches it needs without any communication (the first stage needs ids, the last targets), and
the data position of a checkpoint is just the step count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

import torch
from torch import Tensor

from lynxpipe.errors import LynxError
from lynxpipe.runtime.model.env import _mix

DataKind = Literal["synthetic", "corpus"]
BYTE_VOCAB = 256


@dataclass(frozen=True)
class DataSpec:
    """Where one rank's batches come from."""

    kind: DataKind
    """synthetic: arithmetic token progressions (learnable, no file); corpus: shipped text."""
    seed: int
    """Seed of the synthetic sequences and of the corpus offsets."""
    vocab_size: int
    """Model vocabulary (the corpus needs >= 256: one token per byte)."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    num_microbatches: int
    """Micro-batches per step per DP replica."""
    dp: int
    """DP replicas (each gets its own sequences)."""

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "corpus"):
            raise LynxError(f"--data {self.kind!r} must be synthetic or corpus")
        if self.kind == "corpus" and self.vocab_size < BYTE_VOCAB:
            raise LynxError(f"--data corpus is byte-level and needs vocab_size >= {BYTE_VOCAB}, "
                            f"the model has {self.vocab_size}")

    def sequences_per_step(self) -> int:
        """Sequences all replicas consume in one step (the data position advances by this)."""
        return self.micro_batch_size * self.num_microbatches * self.dp


@lru_cache(maxsize=1)
def corpus_bytes() -> Tensor:
    """The shipped corpus as a uint8 tensor (one token per byte)."""
    data = resources.files("lynxpipe").joinpath("data/corpus.txt").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _synthetic(spec: DataSpec, gen: torch.Generator) -> Tensor:
    """[b, s+1] progressions start + stride * t (mod V): next tokens are learnable."""
    b, n, v = spec.micro_batch_size, spec.seq_len + 1, spec.vocab_size
    start = torch.randint(0, v, (b, 1), generator=gen)
    stride = torch.randint(1, 8, (b, 1), generator=gen)
    return (start + stride * torch.arange(n)) % v


def _corpus(spec: DataSpec, first_sequence: int) -> Tensor:
    """[b, s+1] consecutive windows of the corpus, wrapping around, from a seeded origin."""
    text = corpus_bytes()
    n = spec.seq_len + 1
    span = len(text) - n
    if span <= 0:
        raise LynxError(f"the corpus ({len(text)} bytes) is shorter than seq_len={spec.seq_len}")
    origin = _mix(spec.seed, 17) % span
    rows = [(origin + (first_sequence + j) * spec.seq_len) % span
            for j in range(spec.micro_batch_size)]
    return torch.stack([text[r:r + n] for r in rows]).long()


def batches(spec: DataSpec, step: int, dp_rank: int, device: str = "cpu"
            ) -> list[tuple[Tensor, Tensor]]:
    """(ids [b, s], targets [b, s]) for each micro-batch of `step` on replica `dp_rank`, on
    `device` (drawn on the CPU, so every device sees the same tokens)."""
    out = []
    for mb in range(spec.num_microbatches):
        if spec.kind == "synthetic":
            gen = torch.Generator().manual_seed(_mix(spec.seed, step, dp_rank, mb, 31))
            seq = _synthetic(spec, gen)
        else:
            index = (step * spec.dp + dp_rank) * spec.num_microbatches + mb
            seq = _corpus(spec, index * spec.micro_batch_size)
        out.append((seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)))
    return out
