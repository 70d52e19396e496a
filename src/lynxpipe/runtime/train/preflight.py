"""What `lynxpipe train` checks before it starts a single rank (pure: no torch).

A run that cannot finish should fail in the first second, not after the ranks filled the
machine's memory or trained for an hour: the host memory all ranks will take against what is
available, a model too big for CPU ranks, outputs that cannot be written, and a `--resume` whose
checkpoint was trained with other values. Each refusal is one line with the numbers and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lynxpipe.artifact import fingerprint
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.units import format_bytes

RANK_RUNTIME_BYTES = 256 << 20
"""Host memory of one CPU rank beyond what the plan predicts: torch, gloo buffers, the
interpreter (a forked gpt-tiny rank measured 90-145 MiB proportional set size)."""
LAUNCHER_BYTES = 256 << 20
"""The fork server that imported torch (measured ~220 MiB resident)."""
MEMORY_HEADROOM = 0.8
"""Fraction of the available memory a run may plan to use (the rest: the OS, other users)."""
CPU_MAX_PARAMS = 100_000_000
"""Largest model trained on CPU ranks without --force: past it a step takes minutes."""
RECORDED = ("seed", "data", "lr")
"""Run values a checkpoint records: resuming with others changes the run (not only its speed)."""


def require_torch(what: str) -> None:
    """torch must be installed for `what` (the planner itself never needs it)."""
    if importlib.util.find_spec("torch") is None:
        raise LynxError(f"{what} runs the model with torch, which is not installed here; "
                        f"install it with `pip install -c constraints.txt -e \".[torch]\"`")


def check_device(device: str, ranks: int) -> None:
    """--device cuda needs CUDA devices for the ranks of this machine (torch is imported for
    this question only: the launcher otherwise never imports it)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise LynxError("--device cuda: torch sees no CUDA device on this machine; train with "
                        "--device cpu")
    if torch.cuda.device_count() < ranks:
        raise LynxError(f"--device cuda: {ranks} ranks need {ranks} GPUs on this machine, "
                        f"torch sees {torch.cuda.device_count()}; use fewer ranks "
                        f"(--tp/--pp/--dp) or torchrun across machines")


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (a very large number where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def host_bytes_per_rank(plan: Plan) -> list[int]:
    """Host memory of every pipeline rank on CPU: the plan's predicted peak (weights, grads,
    optimizer state and activations) plus the runtime's own."""
    return [peak + RANK_RUNTIME_BYTES for peak in plan.predicted.peak_memory_bytes]


def check_machine(plan: Plan, device: str, force: bool,
                  available: int | None = None) -> None:
    """Refuse a CPU run whose ranks would not fit in host memory, or (without --force) whose
    model is too big to train on CPU."""
    if device != "cpu":
        return
    model, par = plan.model, plan.parallel
    params = model.total_params()
    if params > CPU_MAX_PARAMS and not force:
        raise LynxError(f"{model.name} has {params / 1e6:,.0f}M parameters: training it on CPU "
                        f"ranks takes minutes per step and {_total(plan)} of memory; train a "
                        f"CPU-sized model (--model gpt-tiny or gpt-small-cpu), use --device "
                        f"cuda, or give --force")
    have = available_host_bytes() if available is None else available
    need = _need(plan)
    if need > MEMORY_HEADROOM * have:
        per_rank = host_bytes_per_rank(plan)
        raise LynxError(f"training {model.name} on {par.devices} CPU ranks needs about "
                        f"{format_bytes(need)} of host memory ({par.devices} ranks of up to "
                        f"{format_bytes(max(per_rank))}) but {format_bytes(have)} is available "
                        f"(at most {MEMORY_HEADROOM:.0%} of it is used); train a smaller model "
                        f"(--model gpt-tiny), fewer ranks (--tp/--pp/--dp) or a shorter "
                        f"--seq-len / --micro-batch-size")


def _need(plan: Plan) -> int:
    par = plan.parallel
    return sum(host_bytes_per_rank(plan)) * par.tp * par.dp + LAUNCHER_BYTES


def _total(plan: Plan) -> str:
    return format_bytes(_need(plan))


def check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Create `path`'s directory (or `path` itself, a directory) and write a scratch file in it,
    so an unwritable --out or --checkpoint-dir fails now, not after the last step."""
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise LynxError(f"{what} {path}: is a directory; give a file path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise LynxError(f"{what} {path}: cannot write there ({exc.strerror or exc}); choose a "
                        f"writable location") from None


@dataclass(frozen=True)
class CheckpointMeta:
    """What latest.json records besides the step: the values that shape the weights and the
    run, so a resume with other values is caught before launching."""

    step: int
    """Steps completed."""
    values: dict[str, object]
    """seed, data and lr the checkpoint was trained with (missing in old checkpoints)."""
    weights: str
    """`weights_key` of the plan: model, layout and partition (what a rank file holds)."""
    partition: tuple[int, ...]
    """Layers per stage of the plan it ran (for messages)."""
    budget_bytes: int | None
    """Budget of the plan it ran (changing it leaves the weights alone)."""
    cluster: str
    """Cluster of the plan it ran."""


def step_dir(root: Path, step: int) -> Path:
    """Directory of the checkpoint after `step` steps."""
    return root / f"step-{step:08d}"


def weights_key(plan: Plan) -> str:
    """Fingerprint of what a rank's checkpoint file holds: the model, the layout and which
    layers each stage has; budget and cluster only change recompute decisions."""
    return fingerprint(plan.model, plan.parallel, list(plan.partition))


def meta_json(plan: Plan, step: int, seed: int, data: str, lr: float) -> dict[str, object]:
    """latest.json of a checkpoint after `step` steps."""
    return {"step": step, "seed": seed, "data": data, "lr": lr, "weights": weights_key(plan),
            "partition": list(plan.partition), "budget_bytes": plan.budget_bytes,
            "cluster": plan.cluster.name}


def read_latest(root: Path) -> CheckpointMeta:
    """latest.json of the newest complete checkpoint under `root`."""
    path = root / "latest.json"
    try:
        data = json.loads(path.read_text())
        step = int(data["step"])
    except FileNotFoundError:
        raise LynxError(f"--resume: no checkpoint in {root} (no latest.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LynxError(f"--resume: {path} is malformed ({exc})") from None
    values = {k: data[k] for k in RECORDED if k in data}
    return CheckpointMeta(step, values, str(data.get("weights", "")),
                          tuple(data.get("partition", ())), data.get("budget_bytes"),
                          str(data.get("cluster", "")))


def check_resume(root: Path, plan: Plan, steps: int, run: dict[str, object],
                 allow_changes: bool) -> list[str]:
    """Refuse a resume that cannot continue the checkpoint's run; return notes to print (what
    --allow-changes let change, budget or cluster changes, which leave the weights alone)."""
    meta = read_latest(root)
    where = f"--resume: the checkpoint in {root} (step {meta.step})"
    if meta.step >= steps:
        raise LynxError(f"{where} is already at or past --steps {steps}, the total to reach; "
                        f"give --steps > {meta.step}")
    if meta.weights and meta.weights != weights_key(plan):
        raise LynxError(f"{where} holds weights of another model, layout or partition "
                        f"(partition {meta.partition} vs {tuple(plan.partition)}); resume with "
                        f"the model, layout and partition it was trained with")
    changed = [(k, meta.values[k], run[k]) for k in RECORDED
               if k in meta.values and meta.values[k] != run[k]]
    notes = []
    if changed:
        if not allow_changes:
            old = " ".join(f"--{k} {v}" for k, v, _ in changed)
            new = " ".join(f"--{k} {v}" for k, _, v in changed)
            raise LynxError(f"{where} was trained with {old}, this run gives {new}: resuming "
                            f"with other values changes the run (the loss jumps); give the "
                            f"same values, or --allow-changes to resume anyway")
        said = ", ".join(f"--{k} {old} -> {new}" for k, old, new in changed)
        notes.append(f"note: resuming with {said} (--allow-changes)")
    elif not meta.values:
        notes.append("note: the checkpoint records no seed, data or lr (an older lynxpipe "
                     "wrote it): they are not checked")
    if meta.budget_bytes is not None and meta.budget_bytes != plan.budget_bytes:
        notes.append(f"note: budget {format_bytes(meta.budget_bytes)} -> "
                     f"{format_bytes(plan.budget_bytes)} since the checkpoint: recompute "
                     f"decisions change, the weights do not")
    if meta.cluster and meta.cluster != plan.cluster.name:
        notes.append(f"note: cluster {meta.cluster} -> {plan.cluster.name} since the "
                     f"checkpoint: predictions change, the weights do not")
    return notes
