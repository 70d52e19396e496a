"""The training job description (job.json) shared by the launcher and the ranks. Pure (no
torch): the launcher writes it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from lynxpipe.artifact import load_artifact, save_artifact
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan, PlanRequest, plan_fingerprint
from lynxpipe.runtime.limits import check_runnable

JOB_VERSION = 1


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


def _field_diff(old: object, new: object) -> str:
    """`name old vs new` for every dataclass field that differs."""
    return ", ".join(f"{f.name} {getattr(old, f.name)!r} vs {getattr(new, f.name)!r}"
                     for f in fields(old) if getattr(old, f.name) != getattr(new, f.name))


def _differences(plan: Plan, req: PlanRequest) -> str:
    parts = []
    if plan.model != req.model:
        parts.append(f"model ({_field_diff(plan.model, req.model)})")
    if plan.cluster != req.cluster:
        parts.append(f"cluster ({plan.cluster.name} vs {req.cluster.name})")
    if plan.parallel != req.parallel:
        parts.append(f"layout ({_field_diff(plan.parallel, req.parallel)})")
    if plan.budget_bytes != req.budget_bytes:
        parts.append(f"budget ({plan.budget_bytes} vs {req.budget_bytes} bytes)")
    return "; ".join(parts) or "specs"


def training_plan(plan: Plan, req: PlanRequest | None, source: str, device: str) -> Plan:
    """Check a plan against the command line (when spec flags were given) and the device."""
    where = f"{source}: " if source else ""
    if req is not None:
        expect = plan_fingerprint(req.model, req.cluster, req.parallel, req.budget_bytes)
        if plan.fingerprint != expect:
            cpu = " (on CPU with 4-byte activations)" if device == "cpu" else ""
            raise LynxError(f"{where}plan fingerprint {plan.fingerprint} does not match the "
                            f"command line's {expect}{cpu}: they differ in "
                            f"{_differences(plan, req)}; give the flags the plan was made "
                            f"with, or no spec flags to run the plan's own")
    check_runnable(plan.model)
    if device == "cpu" and plan.model.dtype_bytes != 4:
        raise LynxError(f"{where}the plan was made for {plan.model.dtype_bytes}-byte "
                        f"activations, but the CPU runtime is fp32; make it with `lynxpipe plan "
                        f"--dtype-bytes 4 ...`, or let `lynxpipe train` plan with --policy")
    return plan


def check_options(*, steps: int, data: str, device: str, timeout_s: float,
                  checkpoint_every: int, resume: bool, checkpoint_dir: object,
                  emulate: str | None) -> None:
    """Validate `lynxpipe train` flags that the specs do not cover."""
    if steps < 1:
        raise LynxError(f"--steps {steps} must be >= 1")
    if data not in ("synthetic", "corpus"):
        raise LynxError(f"--data {data!r} must be synthetic or corpus")
    if device not in ("cpu", "cuda"):
        raise LynxError(f"--device {device!r} must be cpu or cuda")
    if not timeout_s > 0:
        raise LynxError(f"--timeout {timeout_s} must be > 0 seconds")
    if checkpoint_every < 0:
        raise LynxError(f"--checkpoint-every {checkpoint_every} must be >= 0")
    if (resume or checkpoint_every) and not checkpoint_dir:
        raise LynxError("--resume and --checkpoint-every need --checkpoint-dir")
    if emulate is not None:
        from lynxpipe.testbed import parse_emulate

        parse_emulate(emulate)
