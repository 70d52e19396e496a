"""What profiling measures, as plain data: the job (what to time), the samples (medians per
op, message series) and the measurement; written by the timing ranks, read by `assemble`.
Pure (no torch), so fitting and assembling are testable on synthetic numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

MIN_OP_MS = 1e-4
"""Floor of a measured op time: below the timer's resolution, but the table needs > 0."""
GROUP_SEP = "+"
"""Joins the graph ops of one timed piece (e.g. `logits+ce_max`)."""
Progress = Callable[[str, int, int], None]
"""`progress(what, done, total)`."""


@dataclass(frozen=True)
class ProfileJob:
    """What to measure; sent as JSON to every launched rank."""

    model: ModelSpec
    """The model with the runtime's dtype_bytes (fingerprinted into the profile)."""
    par: ParallelSpec
    """Parallel layout; tp, sequence_parallel, seq_len and micro_batch_size shape the ops."""
    dtype: str
    """torch dtype name of parameters and activations, e.g. `float32`."""
    device: str
    """`cpu` or `cuda`."""
    ranks: int
    """Processes launched (1: measured in-process, no communication)."""
    repeats: int
    """Timed repetitions per measurement (the median is kept)."""
    warmup: int
    """Untimed repetitions before them."""
    coll_sizes_bytes: tuple[int, ...]
    """Collective sizes to time (full, unsharded tensor bytes, as `Collective.size_bytes`)."""
    p2p_sizes_bytes: tuple[int, ...]
    """Point-to-point message sizes to time."""
    window_bytes: int
    """All-reduce size the contention probe starts from (grown until the window is long enough)."""
    seed: int = 1234
    """Weight and data seed."""


@dataclass(frozen=True)
class KindTimes:
    """Measured times of one graph (layer, embed or head); keys are ops or `op1+op2` pieces."""

    fwd_ms: dict[str, float]
    """Forward time per op, or per piece when several ops were timed together."""
    bwd_ms: dict[str, float]
    """Backward shares per op or piece (rescaled so they add up to `bwd_total_ms`)."""
    bwd_total_ms: float
    """Whole backward (median)."""


@dataclass(frozen=True)
class OpSamples:
    """Everything timed on the compute side."""

    layer: KindTimes
    """The transformer layer."""
    embed: KindTimes
    """The embedding."""
    head: KindTimes
    """Final norm, LM head and loss."""
    optimizer_ms_per_param: float
    """AdamW step time per parameter."""


@dataclass(frozen=True)
class Series:
    """Median times of one message kind at several sizes."""

    sizes_bytes: tuple[int, ...]
    """Message sizes (collectives: full tensor bytes)."""
    times_ms: tuple[float, ...]
    """Median time at each size (slowest rank)."""


@dataclass(frozen=True)
class CommSamples:
    """Everything timed on the communication side."""

    collectives: dict[str, Series]
    """Per collective kind (`all_reduce`, `all_gather`, `reduce_scatter`); empty when tp == 1."""
    p2p: Series | None
    """One-way send times between ranks 0 and 1 (None with a single rank)."""
    contention: float | None
    """Usable fraction of a window (see `profile.comm.contention_probe`); None if not probed."""
    window_ms: float
    """Alone-time of the all-reduce the contention was probed with."""
    window_bytes: int
    """Its size."""
    backend: str
    """torch.distributed backend the messages went through."""
    sync_ms: float | None = None
    """In-loop cost of one blocking TP collective beyond its compute and its own time (see
    `profile.comm.sync_probe`); None if not probed (tp == 1, older profiles)."""


@dataclass(frozen=True)
class Measurement:
    """One `profile --measure` run: what rank 0 sends back."""

    ops: OpSamples
    """Compute side."""
    comm: CommSamples | None
    """Communication side (None when only one rank was launched)."""
    device: str
    """Device the ops ran on, e.g. `cpu` or `cuda:0 (NVIDIA H100)`."""
    concurrent_ranks: int
    """Ranks that timed their ops at the same time (sharing the CPU cores)."""


# -- timing helpers -------------------------------------------------------------------------

