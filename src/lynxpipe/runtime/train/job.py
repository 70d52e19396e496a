"""The training job description (job.json) shared by the launcher and the ranks. Pure (no
torch): the launcher writes it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lynxpipe.artifact import load_artifact, save_artifact
from lynxpipe.checks import integer, number
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.runtime.limits import check_runnable
from lynxpipe.units import format_bytes

JOB_VERSION = 1
MAX_TIMEOUT_S = 1e6
"""Longest --timeout (11 days); collectives take 3/4 of it as a timedelta, which has limits."""


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a rank needs to train (job.json, written by the launcher)."""

    plan: Plan
    """The plan to run (its specs, order and predictions)."""
    steps: int
    """Train until this many steps are done (with --resume: the total, not the extra steps)."""
    seed: int = 1234
    """Seed of weights, data and dropout."""
    data: str = "synthetic"
    """synthetic or corpus."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    checkpoint_dir: str = ""
    """Where checkpoints go ("" = none)."""
    checkpoint_every: int = 0
    """Checkpoint every K steps (0 = never)."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoint_dir."""
    out: str = ""
    """run.json path written by rank 0 ("" = none)."""
    timeout_s: float = 120.0
    """A stuck rank ends the job within this; collectives time out after 3/4 of it."""
    device: str = "cpu"
    """cpu or cuda."""
    emulate: str = ""
    """The --emulate value, for the record."""
    progress: bool = True
    """Rich progress bar on rank 0."""


def save_job(path: str | Path, job: TrainJob) -> Path:
    """Write job.json."""
    return save_artifact(path, "lynxpipe.job", JOB_VERSION, job)


def load_job(path: str | Path) -> TrainJob:
    """Read job.json."""
    return load_artifact(path, "lynxpipe.job", JOB_VERSION, TrainJob)


def collective_timeout_s(timeout_s: float) -> float:
    """Collectives give up after 3/4 of --timeout, leaving the launcher time to clean up."""
    return max(1.0, 0.75 * timeout_s)


def training_plan(plan: Plan, source: str, device: str) -> Plan:
    """Check that the runtime can run `plan` on `device` (its specs were checked on load)."""
    where = f"{source}: " if source else ""
    check_runnable(plan.model)
    if device == "cpu" and plan.model.dtype_bytes != 4:
        raise LynxError(f"{where}the plan was made for {plan.model.dtype_bytes}-byte "
                        f"activations, but the CPU runtime is fp32; make it with `lynxpipe plan "
                        f"--dtype-bytes 4 ...`, or let `lynxpipe train` plan with --policy")
    if not plan.predicted.fits_budget:
        peak = max(plan.predicted.peak_memory_bytes)
        raise LynxError(f"{where}the plan does not fit its budget: it peaks at "
                        f"{format_bytes(peak)} per device against {format_bytes(plan.budget_bytes)}"
                        f" (`lynxpipe simulate --plan` shows the same); make one that fits with "
                        f"`lynxpipe plan`")
    return plan


def check_options(*, steps: int, seed: int, lr: float, data: str, device: str,
                  timeout_s: float, checkpoint_every: int, resume: bool, checkpoint_dir: object,
                  emulate: str | None) -> None:
    """Validate `lynxpipe train` flags that the specs do not cover."""
    integer(steps, "--steps")
    integer(seed, "--seed", 0)  # job.json carries it to the ranks: at most 2**53
    number(lr, "--lr", 0.0, lo_open=True)
    if data not in ("synthetic", "corpus"):
        raise LynxError(f"--data {data!r} must be synthetic or corpus")
    if device not in ("cpu", "cuda"):
        raise LynxError(f"--device {device!r} must be cpu or cuda")
    number(timeout_s, "--timeout", 0.0, MAX_TIMEOUT_S, lo_open=True)
    integer(checkpoint_every, "--checkpoint-every", 0)
    if (resume or checkpoint_every) and not checkpoint_dir:
        raise LynxError("--resume and --checkpoint-every need --checkpoint-dir")
    if emulate is not None:
        from lynxpipe.testbed import parse_emulate

        parse_emulate(emulate)
