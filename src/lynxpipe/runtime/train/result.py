"""The RunResult artifact (run.json): what a real training run measured, beside the plan's
prediction (SPEC §2, §7). Pure: no torch, so reports can read it anywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lynxpipe.artifact import load_artifact, save_artifact
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

RUN_VERSION = 1


@dataclass(frozen=True)
class ActionTime:
    """Mean wall time of one action of a rank's order over the measured steps."""

    action: str
    """The action, e.g. `RECV_B(mb0,s1)`."""
    mean_ms: float
    """Mean wall time of the action."""
    wait_ms: float
    """Mean time blocked on the message (RECV, after its window's recompute)."""
    recompute_ms: float
    """Mean recompute time run inside it."""


@dataclass(frozen=True)
class RankRun:
    """One rank's measurements over the run."""

    rank: int
    """Global rank."""
    tp_rank: int
    """Index in its TP group."""
    dp_rank: int
    """Index in its DP group."""
    pp_rank: int
    """Pipeline rank."""
    step_ms: tuple[float, ...]
    """Wall time of each step on this rank."""
    peak_activation_bytes: tuple[int, ...]
    """Per step, the meter's peak: saved tensors + recomputed buffers + receive buffers."""
    predicted_peak_activation_bytes: int
    """The plan's prediction for this rank's pipeline rank."""
    cuda_peak_bytes: tuple[int, ...] | None
    """Per step torch.cuda.max_memory_allocated (None on CPU)."""
    recompute_hidden_ms: tuple[float, ...]
    """Per step recompute run inside windows."""
    recompute_exposed_ms: tuple[float, ...]
    """Per step recompute run on demand."""
    recompute_counts: dict[str, int]
    """Tasks that ran per window kind (fwd_coll, bwd_coll, recv, on_demand), per step."""
    planned_counts: dict[str, int]
    """Tasks the plan pins to each window kind on this rank, per step."""
    recv_wait_ms: tuple[float, ...]
    """Per step time blocked in RECV waits."""
    dp_sync_ms: tuple[float, ...]
    """Per step SP/DP gradient synchronisation."""
    optimizer_ms: tuple[float, ...]
    """Per step optimizer time."""
    actions: tuple[ActionTime, ...]
    """Per action mean times (steps after the first when there are several)."""


@dataclass(frozen=True)
class RunResult:
    """A training run: per-step losses and times, per-rank memory and recompute, predictions."""

    policy: str
    """Policy of the plan."""
    plan_fingerprint: str
    """Fingerprint of the plan's model/cluster/layout/budget."""
    model: ModelSpec
    """Model trained (dtype_bytes as run)."""
    parallel: ParallelSpec
    """Layout."""
    cluster: str
    """Cluster preset the plan was made for (its predictions use it)."""
    budget_bytes: int
    """Per-device budget the plan was made under."""
    device: str
    """cpu or cuda."""
    backend: str
    """torch.distributed backend (gloo, nccl)."""
    emulate: str
    """`--emulate` value ("" when the ranks used plain loopback / the real network)."""
    data: str
    """synthetic or corpus."""
    seed: int
    """Seed of weights, data and dropout."""
    first_step: int
    """Index of the first step of this run (> 0 after --resume)."""
    losses: tuple[float, ...]
    """Global mean loss of each step run."""
    step_ms: tuple[float, ...]
    """Each step's wall time (slowest rank)."""
    tokens_per_s: float
    """Global tokens per second over the steps after the first (all steps when only one)."""
    predicted_step_ms: float
    """The plan's predicted step time (for the cluster it was planned for)."""
    recompute_hidden_ms: float
    """Median over steps of the largest per-rank hidden recompute."""
    recompute_exposed_ms: float
    """Median over steps of the largest per-rank exposed recompute."""
    predicted_recompute_hidden_ms: float
    """The plan's largest per-rank hidden recompute."""
    predicted_recompute_exposed_ms: float
    """The plan's largest per-rank exposed recompute."""
    ranks: tuple[RankRun, ...]
    """Per rank details, by global rank."""
    notes: tuple[str, ...] = ()
    """Remarks (what was measured how)."""


def save_run(path: str | Path, result: RunResult) -> Path:
    """Write run.json atomically."""
    return save_artifact(path, "lynxpipe.run", RUN_VERSION, result)


def load_run(path: str | Path) -> RunResult:
    """Read run.json, checking kind and version."""
    return load_artifact(path, "lynxpipe.run", RUN_VERSION, RunResult)
