"""Parallel layout (TP, PP, DP, micro-batching, schedule) and its validation against a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lynxpipe.checks import integer
from lynxpipe.errors import LynxError
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec

Schedule = Literal["gpipe", "1f1b", "interleaved"]
SCHEDULES = ("gpipe", "1f1b", "interleaved")

# Size limits. Planning and simulating take time and memory linear in layers x micro-batches
# (every F/B of every layer of every micro-batch is an event): `compare` of all eight policies
# measured 2-3 ms per (layer, micro-batch) on 2 shared cores, so at the product limit it ends
# in 60-90 s and ~300 MB (256 x 128 and 32 x 1024), one policy's plan or simulate within ~30 s.
# Past 256 layers lynx-opt's MILP and full-block's search grow faster than linearly (1920
# layers took 10 GB).
MAX_LAYERS = 256
"""Most transformer layers planned (the largest published models have ~130)."""
MAX_MICROBATCHES = 1024
"""Most micro-batches per step planned."""
MAX_LAYER_MICROBATCHES = 32768
"""Most layers x micro-batches per step (e.g. 48 x 682, 256 x 128)."""


@dataclass(frozen=True)
class ParallelSpec:
    """How one training step is laid out over devices."""

    tp: int = 1
    """Tensor-parallel degree t (Megatron column/row-parallel layers)."""
    pp: int = 1
    """Pipeline-parallel degree p (number of pipeline ranks)."""
    dp: int = 1
    """Data-parallel degree d."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards norms/dropout over TP; AG/RS instead of AR)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch b."""
    num_microbatches: int = 8
    """Micro-batches per step m (per DP replica)."""
    seq_len: int = 2048
    """Sequence length s."""
    schedule: Schedule = "1f1b"
    """Pipeline order: gpipe, 1f1b (PipeDream-flush) or interleaved 1F1B."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved only; 1 otherwise)."""
    distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam state over DP (Megatron distributed optimizer)."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "micro_batch_size", "num_microbatches", "seq_len",
                    "virtual_stages"):
            integer(getattr(self, key), key)
        for key in ("sequence_parallel", "distributed_optimizer"):
            if not isinstance(getattr(self, key), bool):
                raise LynxError(f"{key}={getattr(self, key)!r} must be true or false")
        if self.schedule not in SCHEDULES:
            raise LynxError(f"schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise LynxError(f"virtual_stages={self.virtual_stages} needs schedule=interleaved")
        if self.schedule == "interleaved":
            if self.virtual_stages < 2:
                raise LynxError("schedule=interleaved needs virtual_stages >= 2")
            if self.num_microbatches % self.pp:
                raise LynxError(f"interleaved 1F1B needs num_microbatches={self.num_microbatches} "
                                f"to be a multiple of pp={self.pp}")
        if self.sequence_parallel and self.tp == 1:
            raise LynxError("sequence_parallel needs tp > 1")

    @property
    def devices(self) -> int:
        """Total devices tp * pp * dp."""
        return self.tp * self.pp * self.dp

    @property
    def boundary_rows(self) -> int:
        """Sequence rows of one rank's share of a tensor crossing pipeline stages (s, or s/t
        with sequence parallelism)."""
        return self.seq_len // self.tp if self.sequence_parallel else self.seq_len

    @property
    def num_chunks(self) -> int:
        """Pipeline model chunks in all (pp * virtual_stages)."""
        return self.pp * self.virtual_stages


def validate_layout(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
                    devices: int | None = None) -> None:
    """Raise LynxError with the rule that `par` breaks for this model/cluster, if any."""
    check_size(model, par)
    if model.num_heads % par.tp:
        raise LynxError(f"tp={par.tp} does not divide num_heads={model.num_heads} of {model.name}; "
                        f"choose tp among the divisors of {model.num_heads}")
    if model.num_kv_heads % par.tp:
        raise LynxError(f"tp={par.tp} does not divide num_kv_heads={model.num_kv_heads} of "
                        f"{model.name}; each TP rank needs whole key/value heads")
    if model.ffn_hidden_size % par.tp or model.vocab_size % par.tp:
        raise LynxError(f"tp={par.tp} must divide ffn_hidden_size={model.ffn_hidden_size} "
                        f"and vocab_size={model.vocab_size}")
    if par.num_chunks > model.num_layers:
        raise LynxError(f"pp*virtual_stages={par.num_chunks} is larger than num_layers="
                        f"{model.num_layers} of {model.name}; every stage needs a layer")
    if par.sequence_parallel and par.seq_len % par.tp:
        raise LynxError(f"sequence_parallel needs seq_len={par.seq_len} divisible by tp={par.tp}")
    if devices is not None and devices != par.devices:
        raise LynxError(f"devices={devices} does not match tp*pp*dp = {par.tp}*{par.pp}*{par.dp}"
                        f" = {par.devices}")
    if par.tp > cluster.devices_per_node:
        raise LynxError(f"tp={par.tp} exceeds devices_per_node={cluster.devices_per_node} of "
                        f"{cluster.name}; keep tensor parallelism inside a node")


def check_size(model: ModelSpec, par: ParallelSpec) -> None:
    """Refuse, before any work, sizes whose planning would run for minutes or exhaust memory."""
    why = ("planning and simulating take time and memory linear in layers x micro-batches; "
           "a step's figures scale, so plan a representative depth")
    if model.num_layers > MAX_LAYERS:
        raise LynxError(f"num_layers={model.num_layers} of {model.name} is over the limit of "
                        f"{MAX_LAYERS} layers: {why}")
    if par.num_microbatches > MAX_MICROBATCHES:
        raise LynxError(f"num_microbatches={par.num_microbatches} is over the limit of "
                        f"{MAX_MICROBATCHES}: {why}; the steady state repeats every pp "
                        f"micro-batches, so a few times pp is representative")
    if model.num_layers * par.num_microbatches > MAX_LAYER_MICROBATCHES:
        raise LynxError(f"num_layers x num_microbatches = {model.num_layers} x "
                        f"{par.num_microbatches} is over the limit of {MAX_LAYER_MICROBATCHES}: "
                        f"{why}; use fewer micro-batches (at most "
                        f"{MAX_LAYER_MICROBATCHES // model.num_layers})")
