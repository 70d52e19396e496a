"""The Plan artifact (plan.json) and the inputs every planner receives."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lynxpipe.artifact import fingerprint, load_artifact, save_artifact
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import PipelineOrder
from lynxpipe.schedule.policy import LayerPolicy
from lynxpipe.sim.result import RankStats
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

PLAN_VERSION = 3
"""2: actions as compact text; reserve, partition mode and solver limit stored."""


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """Everything a planner needs: specs, memory budget, costs and knobs."""

    model: ModelSpec
    """The model."""
    cluster: ClusterSpec
    """The cluster (for reporting; times come from `costs`)."""
    parallel: ParallelSpec
    """The parallel layout."""
    budget_bytes: int
    """Per-device memory budget: static state + activations must fit in it."""
    costs: CostTable
    """Op/collective times and memory constants."""
    partition: Literal["uniform", "balanced", "default"] = "default"
    """Stage partition; `default` = balanced for lynx-*/adapipe, uniform otherwise."""
    reserve_bytes: int = 0
    """Memory held back for workspace and fragmentation."""
    time_limit_s: float = 30.0
    """MILP time limit (lynx-opt, checkmate)."""


@dataclass(frozen=True)
class Prediction:
    """Simulated outcome of a plan."""

    step_time_ms: float
    """Step time."""
    tokens_per_s: float
    """Global tokens per second."""
    model_tflops_per_device: float
    """Model FLOP/s per device (recompute not counted), in TFLOP/s."""
    peak_activation_bytes: tuple[int, ...]
    """Per pipeline rank, peak activations (kept + regenerated)."""
    peak_memory_bytes: tuple[int, ...]
    """Per pipeline rank, static state + peak activations."""
    recompute_exposed_ms: float
    """Largest per-rank exposed recompute."""
    recompute_hidden_ms: float
    """Largest per-rank hidden recompute."""
    fits_budget: bool
    """Every rank's peak memory fits the budget."""
    ranks: tuple[RankStats, ...]
    """Per-rank breakdown."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A recomputation plan: partition, keep/drop per layer, placed tasks, predictions."""

    policy: str
    """Policy that produced it."""
    model: ModelSpec
    """Model it is for."""
    cluster: ClusterSpec
    """Cluster it is for."""
    parallel: ParallelSpec
    """Layout it is for."""
    budget_bytes: int
    """Per-device memory budget it was planned under."""
    reserve_bytes: int
    """Memory held back per device (workspace, fragmentation) when it was planned."""
    partition_mode: Literal["uniform", "balanced", "default"]
    """The partition the request asked for (`partition` holds the one chosen)."""
    time_limit_s: float
    """MILP time limit it was planned with."""
    fingerprint: str
    """Hash of model, cluster, layout and budget; the runtime refuses a mismatch."""
    cost_source: str
    """analytic or measured."""
    partition: tuple[int, ...]
    """Layers per virtual stage."""
    layers: tuple[LayerPolicy, ...]
    """Per global layer keep/drop decision."""
    order: PipelineOrder
    """Per-rank actions including R tasks pinned to windows."""
    predicted: Prediction
    """Simulator's prediction."""
    planner_ms: float
    """Wall time the planner took."""
    mip_gap: float | None = None
    """Relative MIP gap of the solver, when a MILP was solved."""
    notes: tuple[str, ...] = ()
    """Human-readable remarks (what the planner decided and why)."""
    chosen_from: str = ""
    """Which candidate won when the planner returns the fastest of several (lynx-opt: MILP,
    lynx-heu, checkmate or full; lynx-heu: its own keep sets or checkmate's, refined into
    windows); empty for planners with one path."""
    recv_ahead: bool = False
    """The runtime posts each pipeline receive one RECV ahead, and the plan's static memory
    counts that buffer (from `CostTable.recv_ahead`; old plans, and analytic costs: no)."""


@functools.lru_cache(maxsize=64)
def plan_fingerprint(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
                     budget_bytes: int) -> str:
    """The fingerprint stored in plan.json and checked by the runtime (cached: the specs are
    frozen, and a planner assembles tens of plans of one request)."""
    return fingerprint(model, cluster, par, budget_bytes)


def save_plan(path: str | Path, plan: Plan) -> Path:
    """Write plan.json atomically."""
    return save_artifact(path, "lynxpipe.plan", PLAN_VERSION, plan)


def load_plan(path: str | Path) -> Plan:
    """Read plan.json, checking kind, version and that its fingerprint matches its specs."""
    plan = load_artifact(path, "lynxpipe.plan", PLAN_VERSION, Plan)
    expect = plan_fingerprint(plan.model, plan.cluster, plan.parallel, plan.budget_bytes)
    if plan.fingerprint != expect:
        raise LynxError(f"{path}: fingerprint {plan.fingerprint} does not match its own specs "
                        f"({expect}); the file was edited or is corrupt — regenerate it")
    return plan
