"""Profiling orchestration: from a planning request to a measured profile (SPEC §2, first
arrow). Chooses what to measure (`make_job`), checks that the machine can take it
(`check_memory`, `check_buildable`), runs it here or on launched ranks (`measure`) and assembles
the CostTable (`run_profile`). torch is imported only when measuring.

The profile is made for the model *at the runtime's dtype* (fp32 on CPU: dtype_bytes=4), as
`lynxpipe train` runs it; `workflow.model_for_profile` finds that model again from plain flags.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lynxpipe.cost.layers import embed_graph, head_graph, layer_graph
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

if TYPE_CHECKING:
    from lynxpipe.profile.samples import Measurement, ProfileJob

Progress = Callable[[str, int, int], None]
"""(what, done, total) callback for progress displays."""
MIN_REPEATS = 5
"""Fewest timed repetitions per measurement (medians of fewer are noise)."""

RUNTIME_DTYPES = {4: "float32", 2: "bfloat16"}
"""torch dtype the runtime uses for each --dtype-bytes."""
MIN_FIT_SPAN_BYTES = 1 << 20
"""Largest message of every fit is at least this (1 MiB)."""
SIZES_PER_FIT = 6
"""Message sizes per alpha-beta fit."""
MEMORY_HEADROOM = 0.8
"""Fraction of the available memory a profile may plan to use."""


def profile_ranks(par: ParallelSpec) -> int:
    """Processes to launch: the TP group, or a pipeline pair for p2p, or just this one."""
    if par.tp > 1:
        return par.tp
    return 2 if par.pp > 1 else 1


def geometric_sizes(lo: float, hi: float, count: int = 5, quantum: int = 64) -> tuple[int, ...]:
    """`count` sizes spaced evenly in log from `lo` to `hi`, multiples of `quantum` bytes."""
    lo, hi = max(quantum, lo), max(2 * quantum, hi)
    ratio = (hi / lo) ** (1 / (count - 1))
    sizes = {max(quantum, round(lo * ratio ** i / quantum) * quantum) for i in range(count)}
    while len(sizes) < 4:  # a narrow range: widen upwards so the fit has >= 4 distinct sizes
        sizes.add(2 * max(sizes))
    return tuple(sorted(sizes))


def make_job(base: CostTable, model: ModelSpec, par: ParallelSpec, dtype: str, device: str,
             repeats: int) -> ProfileJob:
    """What to measure: collective sizes from half the model's smallest to twice its largest,
    p2p sizes around the stage-boundary message, both reaching at least `MIN_FIT_SPAN_BYTES`
    (else a small model's sizes all sit in the latency regime and leave the bandwidth
    unresolved); the layer's largest collective is where the contention probe starts."""
    from lynxpipe.profile.samples import ProfileJob

    graphs = (base.layer.graph, base.embed.graph, base.head.graph)
    colls = [c.size_bytes for g in graphs for c in g.collectives]
    quantum = 16 * par.tp * model.dtype_bytes
    layer_max = max(c.size_bytes for c in base.layer.graph.collectives)
    p2p = base.p2p_bytes
    return ProfileJob(model, par, dtype, device, profile_ranks(par), repeats, 2,
                      geometric_sizes(min(colls) / 2, max(2 * max(colls), MIN_FIT_SPAN_BYTES),
                                      SIZES_PER_FIT, quantum),
                      geometric_sizes(min(p2p / 8, 1024), max(4 * p2p, MIN_FIT_SPAN_BYTES),
                                      SIZES_PER_FIT, model.dtype_bytes),
                      layer_max)


def resolve_runtime(device: str, dtype_bytes: int | None) -> tuple[str, str, int]:
    """(device, torch dtype name, bytes per element) from --device and --dtype-bytes: the CPU
    runtime is fp32; CUDA defaults to bf16 (--dtype-bytes 4: fp32)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise LynxError(f"--device {device!r} must be cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise LynxError("--device cuda: torch sees no CUDA device here")
    nbytes = dtype_bytes or (4 if device == "cpu" else 2)
    if device == "cpu" and nbytes != 4:
        raise LynxError(f"--dtype-bytes {nbytes}: the CPU runtime is fp32 (4 bytes)")
    if nbytes not in RUNTIME_DTYPES:
        raise LynxError(f"--dtype-bytes {nbytes}: the runtime runs 4 (fp32) or 2 (bf16) bytes")
    return device, RUNTIME_DTYPES[nbytes], nbytes


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


def estimate_rank_bytes(model: ModelSpec, par: ParallelSpec) -> int:
    """Rough peak bytes of one profiling rank: weights, grads and Adam state of one layer,
    the embedding and the head; a layer's activations three times over (reference forward,
    standalone copies, gradients); the fp32 logits thrice; and ~0.4 GiB of torch runtime."""
    e, t = model.dtype_bytes, par.tp
    params = (model.layer_params() // t + 2 * model.vocab_size * model.hidden_size // t
              + par.seq_len * model.hidden_size)
    acts = sum(g(model, par).saved_bytes() for g in (layer_graph, embed_graph, head_graph))
    logits = 4 * par.seq_len * par.micro_batch_size * model.vocab_size // t
    return 4 * e * params + 3 * acts + 3 * logits + (400 << 20)


def check_memory(model: ModelSpec, par: ParallelSpec, device: str, ranks: int) -> None:
    """Refuse, with the numbers, a profile that would not fit in this machine's memory."""
    per_rank = estimate_rank_bytes(model, par)
    sharing = ranks if device == "cpu" else 1
    need, have = per_rank * sharing, _available_bytes(device)
    if need > MEMORY_HEADROOM * have:
        raise LynxError(f"profiling {model.name} at seq_len={par.seq_len}, micro-batch "
                        f"{par.micro_batch_size}, tp={par.tp} needs about {need / 2**30:.1f} GiB "
                        f"({sharing} rank(s) x {per_rank / 2**30:.1f} GiB) but {device} has "
                        f"{have / 2**30:.1f} GiB available; lower --seq-len or "
                        f"--micro-batch-size, or raise --tp")


def check_buildable(model: ModelSpec, par: ParallelSpec) -> None:
    """The runtime's own shape rules (BuildConfig), before anything is launched."""
    from lynxpipe.runtime.model.layer import BuildConfig
    from lynxpipe.runtime.model.tp import TPContext

    group = object() if par.tp > 1 else None  # only its presence is checked here
    tp = TPContext(group, par.tp, 0, par.sequence_parallel)
    BuildConfig(model, par, tp)


def measure(job: ProfileJob, emulate: tuple[float, float] | None, timeout_s: float,
            progress: Progress) -> Measurement:
    """Run the job in this process (one rank) or on launched ranks, reporting progress as
    (what, done, total) through `progress`."""
    import torch

    from lynxpipe.profile.launch import launch
    from lynxpipe.profile.measure import run_local
    from lynxpipe.runtime.model.layer import BuildConfig
    from lynxpipe.runtime.model.tp import TPContext

    if job.ranks == 1:
        cfg = BuildConfig(job.model, job.par, TPContext(), getattr(torch, job.dtype),
                          job.device, job.seed)
        return run_local(cfg, job, progress)
    return launch(job, emulate, timeout_s, progress)


def run_profile(model: ModelSpec, par: ParallelSpec, base: CostTable, device: str,
                repeats: int, emulate: tuple[float, float] | None, timeout_s: float,
                progress: Progress) -> tuple[Measurement, CostTable]:
    """Measure `model` (its dtype already the runtime's) under `par` on this machine and return
    the measurement with the measured CostTable (`base`: the analytic one, whose fingerprint
    the profile keeps); refuses, before launching anything, layouts the runtime cannot build
    and sizes that would not fit in memory."""
    from lynxpipe.profile.assemble import assemble

    if repeats < MIN_REPEATS:
        raise LynxError(f"--repeats {repeats} must be >= {MIN_REPEATS}")
    check_buildable(model, par)
    if emulate is not None and profile_ranks(par) == 1:
        raise LynxError("--emulate needs something to send: tp > 1 or pp > 1")
    check_memory(model, par, device, profile_ranks(par))
    dtype = RUNTIME_DTYPES[model.dtype_bytes]
    m = measure(make_job(base, model, par, dtype, device, repeats), emulate, timeout_s, progress)
    return m, assemble(base, m, model, par)
