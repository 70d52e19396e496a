"""`lynxpipe profile --measure`, communication side: launch the ranks (plain loopback or inside
the emulated cluster), time collectives, p2p and contention, and time ops on every rank.

Each rank runs `python -m lynxpipe.profile.comm JOB.json OUT.json`: a gloo (NCCL with a
GPU per rank) world for the messages, then a fake process group of the TP size for the ops
(`profile.time_ops`), so all ranks compute at once, as the job's would. Rank 0 reports progress
as JSON lines on stdout and writes the `Measurement`. A collective's time is the slowest rank's
median, each repetition after a barrier; p2p is a send answered by a one-element ack, minus half
the round trips' fitted intercept.

Contention (`CostTable.contention`, SPEC §4): the simulator runs compute of isolated length up
to c*W inside a window of length W and adds the rest to the step: elapsed = W + max(0, C - cW).
The probe measures just that: an all-reduce alone (W), a matmul loop alone (C ~ W, all ranks
computing) and both at once (T), each averaged over PROBE_CYCLES cycles; c = (C + W - T) / W,
clipped to [0.05, 1] (1: neither slowed the other; 0: they ran one after the other). On one CPU
core per rank it depends on the link: ~0.1 at 1 Gbit (the transfer burns the core), ~0.7 at
100 Mbit (the core mostly waits on the wire). Windows under `MIN_WINDOW_MS` are too short for a
loop of whole matmuls, so the all-reduce grows from the model's size until it lasts that long.

Sync (`CostTable.tp_sync_ms`, tp > 1): every TP collective is a meeting point of the TP ranks,
and in a loop the ranks reach it at different times (a segment's compute varies run to run and
core to core), so each one costs the early rank a wait that timing ops and messages apart (by
medians, after barriers) never sees. The probe runs the job's rhythm, K times a compute loop as
long as the layer's forward segment then a blocking all-reduce of the layer's size, and keeps
what a cycle costs beyond the two alone: s = T/K - C - W (the ranks' mean, >= 0). The ops are
timed first, so the segment length is the measured one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lynxpipe.artifact import from_dict, to_dict, write_json_atomic
from lynxpipe.cost.fit import fit_alpha_beta
from lynxpipe.cost.layers import layer_graph
from lynxpipe.errors import LynxError
from lynxpipe.profile.measure import describe_device, median, time_ops
from lynxpipe.profile.samples import (
    CommSamples,
    Measurement,
    OpSamples,
    ProfileJob,
    Progress,
    Series,
)
from lynxpipe.runtime.model.layer import BuildConfig
from lynxpipe.runtime.model.tp import (
    TPContext,
    issue_all_gather,
    issue_all_reduce,
    issue_reduce_scatter,
    wait,
)

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
MIN_WINDOW_MS = 5.0
"""Shortest all-reduce the contention probe uses."""
MAX_WINDOW_BYTES = 64 << 20
"""Largest all-reduce the contention probe grows to."""
MIN_CONTENTION, MAX_CONTENTION = 0.05, 1.0
"""Clip of the probed contention."""
PROBE_CYCLES = 8
"""Compute + all-reduce cycles per repetition of the contention and sync probes (one cycle's
estimate varied 0.05-0.3 for the contention between runs on 2 cores)."""
MESSAGE_REPEATS = 2
"""Messages are cheap and noisier than ops: they get this many times --repeats."""
COMM_TIMEOUT_S = 300.0
"""torch.distributed timeout of the profiling world."""


# -- timing on the ranks ----------------------------------------------------------------------

def _clock(sync: bool) -> float:
    """Milliseconds; waits for queued GPU work first so the interval covers it."""
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() * 1e3


def _issue(kind: str, x: torch.Tensor, ctx: TPContext) -> Any:
    """Issue one collective as the runtime does (its output buffers are allocated the same way)."""
    if kind == "all_reduce":
        return issue_all_reduce(x, ctx)
    if kind == "all_gather":
        return issue_all_gather(x, ctx)[1]
    return issue_reduce_scatter(x, ctx)[1]


def _input_numel(kind: str, size_bytes: int, elem: int, world: int) -> int:
    """Input elements for a collective of `size_bytes` full-tensor bytes (all-gather: a shard)."""
    full = max(world, round(size_bytes / elem / world) * world)
    return full // world if kind == "all_gather" else full


def _slowest(value: float, dev: str) -> float:
    """The largest of the ranks' values (a collective is done when its last rank is)."""
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_coll(kind: str, x: torch.Tensor, ctx: TPContext, reps: int, sync: bool) -> list[float]:
    """This rank's time of `reps` collectives, each started right after a barrier."""
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = _clock(sync)
        wait(_issue(kind, x, ctx))
        times.append(_clock(sync) - t0)
    return times


def _interleaved(timers: list[Callable[[], float]], job: ProfileJob,
                 emit: Callable[[int, int], None]) -> list[float]:
    """Median of each timer over the repeats, taken round-robin (a burst of load from elsewhere
    hits every size alike instead of skewing one, and the fit), starting each round one timer
    later (what ran just before, e.g. a big transfer, then differs too)."""
    reps, n = job.warmup + MESSAGE_REPEATS * job.repeats, len(timers)
    samples: list[list[float]] = [[] for _ in timers]
    for rep in range(reps):
        for i in [(rep + j) % n for j in range(n)]:
            ms = timers[i]()
            if rep >= job.warmup:
                samples[i].append(ms)
        emit(rep + 1, reps)
    return [median(s) for s in samples]


def collective_series(job: ProfileJob, ctx: TPContext, dev: str, sync: bool,
                      emit: Progress) -> dict[str, Series]:
    """Median (slowest rank's) time of every collective kind at every size."""
    dtype, elem = getattr(torch, job.dtype), job.model.dtype_bytes
    out = {}
    for k, kind in enumerate(KINDS):
        numels = [_input_numel(kind, size, elem, ctx.size) for size in job.coll_sizes_bytes]
        bufs = [torch.ones(n, dtype=dtype, device=dev) for n in numels]
        timers = [lambda x=x: _time_coll(kind, x, ctx, 1, sync)[0] for x in bufs]
        step = lambda done, reps, k=k: emit("collectives", k * reps + done,  # noqa: E731
                                            len(KINDS) * reps)
        times = [_slowest(ms, dev) for ms in _interleaved(timers, job, step)]
        scale = ctx.size if kind == "all_gather" else 1
        out[kind] = Series(tuple(n * scale * elem for n in numels), tuple(times))
    return out


def _ping_ms(buf: torch.Tensor, ack: torch.Tensor, rank: int, sync: bool) -> float:
    """Rank 0: send `buf` to rank 1 and wait for its one-element ack."""
    dist.barrier()
    if rank == 0:
        t0 = _clock(sync)
        dist.send(buf, 1)
        dist.recv(ack, 1)
        return _clock(sync) - t0
    if rank == 1:
        dist.recv(buf, 0)
        dist.send(ack, 0)
    return 0.0


def p2p_series(job: ProfileJob, rank: int, dev: str, sync: bool, emit: Progress) -> Series:
    """One-way time between ranks 0 and 1 at every p2p size (meaningful on rank 0).

    A round trip of `size` out and one element back is 2*alpha + size*beta: fit it (a
    one-element round trip included), then one-way = round trip - fitted intercept / 2.
    """
    dtype, elem = getattr(torch, job.dtype), job.model.dtype_bytes
    numels = [1] + [max(1, size // elem) for size in job.p2p_sizes_bytes]
    bufs = [torch.ones(n, dtype=dtype, device=dev) for n in numels]
    ack = torch.ones(1, dtype=dtype, device=dev)
    timers = [lambda b=b: _ping_ms(b, ack, rank, sync) for b in bufs]
    rtts = _interleaved(timers, job, lambda done, reps: emit("p2p", done, reps))
    sizes = [n * elem for n in numels]
    back = fit_alpha_beta(sizes, rtts).alpha_ms / 2 if rank == 0 else 0.0
    return Series(tuple(sizes[1:]), tuple(max(1e-6, rtt - back) for rtt in rtts[1:]))


def _grow(numel: int, job: ProfileJob, dev: str, time_ms: Callable[[torch.Tensor], float]
          ) -> tuple[torch.Tensor, float]:
    """A buffer whose message (timed by `time_ms`, slowest rank) lasts >= MIN_WINDOW_MS, grown
    2x at a time from `numel` elements (or the largest below MAX_WINDOW_BYTES)."""
    dtype, elem = getattr(torch, job.dtype), job.model.dtype_bytes
    while True:
        x = torch.ones(numel, dtype=dtype, device=dev)
        ms = _slowest(median([time_ms(x) for _ in range(4)][1:]), dev)
        if ms >= MIN_WINDOW_MS or 2 * numel * elem > MAX_WINDOW_BYTES:
            return x, ms
        numel *= 2


def _window(job: ProfileJob, ctx: TPContext, dev: str, sync: bool) -> tuple[torch.Tensor, float]:
    """The contention probe's all-reduce: the layer's, grown to last >= MIN_WINDOW_MS."""
    numel = _input_numel("all_reduce", job.window_bytes, job.model.dtype_bytes, ctx.size)
    return _grow(numel, job, dev, lambda x: _time_coll("all_reduce", x, ctx, 1, sync)[0])


def _compute_loop(job: ProfileJob, dev: str, sync: bool, window_ms: float) -> Callable[[], None]:
    """k matmuls lasting about `window_ms` alone; each about 1/16 of it (at least 0.2 ms).

    Every rank runs the same loop (size and count agreed over the ranks): a rank calibrated
    on a slow moment would otherwise do less work, and the probes would read that as waiting.
    """
    dtype = getattr(torch, job.dtype)
    m = 64
    while True:
        unit = _matmul_ms(m, dtype, dev, sync)
        if unit >= max(0.2, window_ms / 16) or m >= 4096:
            break
        m *= 2
    agreed = torch.tensor([float(m)], dtype=torch.float64, device=dev)  # NCCL: on the GPU
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    m = int(agreed.item())
    mean = torch.tensor([_matmul_ms(m, dtype, dev, sync)], dtype=torch.float64, device=dev)
    dist.all_reduce(mean)
    k = max(1, round(window_ms / (float(mean.item()) / dist.get_world_size())))
    a = torch.randn(m, m, device=dev).to(dtype)

    def loop() -> None:
        for _ in range(k):
            a @ a
    return loop


def _matmul_ms(m: int, dtype: torch.dtype, dev: str, sync: bool) -> float:
    """Time of one m x m matmul (mean of 4 after a warm-up)."""
    a = torch.randn(m, m, device=dev).to(dtype)
    a @ a
    t0 = _clock(sync)
    for _ in range(4):
        a @ a
    return (_clock(sync) - t0) / 4


def _probe(job: ProfileJob, ctx: TPContext, dev: str, sync: bool, loop: Callable[[], None],
           x: torch.Tensor, together: Callable[[], None], cycles: int,
           estimate: Callable[[float, float, float], float]) -> float:
    """The ranks' mean of the median over repetitions of `estimate(C, W, T)`, per cycle: C the
    compute `loop` alone, W the all-reduce of `x` alone (after a barrier each), T `together()`
    (all ranks at once), each over `cycles` cycles, so all three average the same noise."""
    estimates = []
    for rep in range(job.warmup + job.repeats):
        dist.barrier()
        t0 = _clock(sync)
        for _ in range(cycles):
            loop()
        alone_c = (_clock(sync) - t0) / cycles
        alone_w = sum(_time_coll("all_reduce", x, ctx, cycles, sync)) / cycles
        dist.barrier()
        t0 = _clock(sync)
        together()
        if rep >= job.warmup:
            estimates.append(estimate(alone_c, alone_w, (_clock(sync) - t0) / cycles))
    mine = torch.tensor([median(estimates)], dtype=torch.float64, device=dev)
    dist.all_reduce(mine)
    return float(mine.item()) / ctx.size


def contention_probe(job: ProfileJob, ctx: TPContext, dev: str,
                     sync: bool) -> tuple[float, float, int]:
    """(contention, window ms, window bytes); see the module doc for the definition."""
    x, w = _window(job, ctx, dev, sync)
    loop = _compute_loop(job, dev, sync, w)

    def overlapped() -> None:
        for _ in range(PROBE_CYCLES):
            work = issue_all_reduce(x, ctx)
            loop()
            wait(work)

    c = _probe(job, ctx, dev, sync, loop, x, overlapped, PROBE_CYCLES,
               lambda alone_c, alone_w, both: (alone_c + alone_w - both) / alone_w)
    return min(MAX_CONTENTION, max(MIN_CONTENTION, c)), w, x.numel() * job.model.dtype_bytes


def sync_probe(job: ProfileJob, ctx: TPContext, dev: str, sync: bool, segment_ms: float) -> float:
    """Per blocking TP collective, the in-loop cost beyond its compute and its own time (ms);
    see the module doc."""
    numel = _input_numel("all_reduce", job.window_bytes, job.model.dtype_bytes, ctx.size)
    x = torch.ones(numel, dtype=getattr(torch, job.dtype), device=dev)
    loop = _compute_loop(job, dev, sync, segment_ms)

    def cycles() -> None:
        for _ in range(PROBE_CYCLES):
            loop()
            wait(issue_all_reduce(x, ctx))

    return max(0.0, _probe(job, ctx, dev, sync, loop, x, cycles, PROBE_CYCLES,
                           lambda alone_c, alone_w, cycle: cycle - alone_c - alone_w))


def measure_comm(job: ProfileJob, rank: int, dev: str, sync: bool, emit: Progress,
                 segment_ms: float = 0.0) -> CommSamples:
    """Contention, sync (tp > 1, for compute segments of `segment_ms`), collectives (tp > 1)
    and p2p over the whole launched world.

    Every fit gets a message of >= MIN_WINDOW_MS (the contention window for collectives, a
    grown send for p2p), so bandwidth dominates somewhere even on a fast link or a busy machine.
    """
    world, elem = dist.get_world_size(), job.model.dtype_bytes
    ctx = TPContext(dist.group.WORLD, world, rank)
    emit("contention", 0, 1)
    contention, window_ms, window_bytes = contention_probe(job, ctx, dev, sync)
    emit("contention", 1, 1)
    ack = torch.ones(1, dtype=getattr(torch, job.dtype), device=dev)
    send, _ = _grow(max(job.p2p_sizes_bytes) // elem, job, dev,
                    lambda x: _ping_ms(x, ack, rank, sync))
    job = replace(job, coll_sizes_bytes=_with(job.coll_sizes_bytes, window_bytes),
                  p2p_sizes_bytes=_with(job.p2p_sizes_bytes, send.numel() * elem))
    colls = collective_series(job, ctx, dev, sync, emit) if job.par.tp > 1 else {}
    sync_ms = None
    if job.par.tp > 1 and segment_ms > 0:
        emit("sync", 0, 1)
        sync_ms = sync_probe(job, ctx, dev, sync, segment_ms)
        emit("sync", 1, 1)
    p2p = p2p_series(job, rank, dev, sync, emit)
    return CommSamples(colls, p2p, contention, window_ms, window_bytes, dist.get_backend(),
                       sync_ms)


def _with(sizes: tuple[int, ...], top: int) -> tuple[int, ...]:
    """`sizes` reaching up to `top` in steps of 4x (one far point would pull a least-squares
    fit's intercept around)."""
    extra = []
    while top > 4 * max(sizes + tuple(extra)):
        extra.append(4 * max(sizes + tuple(extra)))
    return sizes + tuple(extra) + ((top,) if top > max(sizes) else ())


# -- one rank ---------------------------------------------------------------------------------

def _emitter(rank: int) -> Progress:
    """Rank 0 reports progress as JSON lines on stdout; the others stay quiet."""
    def emit(what: str, done: int, total: int) -> None:
        if rank == 0:
            print(json.dumps({"what": what, "done": done, "total": total}), flush=True)
    return emit


def _devices(job: ProfileJob, rank: int, world: int) -> tuple[str, str, str]:
    """(op device, message device, backend): NCCL only with a GPU per rank, else gloo on CPU."""
    if job.device != "cuda":
        return "cpu", "cpu", "gloo"
    count = torch.cuda.device_count()
    dev = f"cuda:{rank % count}"
    torch.cuda.set_device(dev)
    return (dev, dev, "nccl") if count >= world else (dev, "cpu", "gloo")


def op_context(job: ProfileJob, rank: int) -> TPContext:
    """A fake process group of the TP size: real shard widths, free collectives."""
    par = job.par
    if par.tp == 1:
        return TPContext()
    from torch.testing._internal.distributed.fake_pg import (
        FakeStore,  # registers "fake"
    )

    dist.init_process_group("fake", rank=rank % par.tp, world_size=par.tp, store=FakeStore())
    return TPContext(dist.group.WORLD, par.tp, rank % par.tp, par.sequence_parallel)


def run_rank(job: ProfileJob, out: Path, rendezvous: Path) -> None:
    """Everything one launched rank does; rank 0 writes the Measurement to `out`. The ranks
    meet through the file `rendezvous` (no port to pick, so no clash with other jobs). Ops are
    timed first (on a fake TP group), so the sync probe knows the layer's segment length."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    emit = _emitter(rank)
    op_dev, comm_dev, backend = _devices(job, rank, world)
    if op_dev == "cpu":
        torch.set_num_threads(1)  # one rank per core, as the runtime runs
    tp = op_context(job, rank)
    gpu_of_its_own = not op_dev.startswith("cuda") or rank < torch.cuda.device_count()
    cfg = BuildConfig(job.model, job.par, tp, getattr(torch, job.dtype), op_dev, job.seed)
    ops = None
    if rank == 0 or gpu_of_its_own:  # ranks sharing rank 0's GPU would disturb its timing
        ops = time_ops(cfg, job, emit)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COMM_TIMEOUT_S))
    comm = measure_comm(job, rank, comm_dev, comm_dev != "cpu", emit,
                        _segment_ms(job, ops, comm_dev))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and ops is not None:
        concurrent = world if op_dev == "cpu" else min(world, torch.cuda.device_count())
        write_json_atomic(out, to_dict(Measurement(ops, comm, describe_device(op_dev),
                                                   concurrent)))


def _segment_ms(job: ProfileJob, ops: OpSamples | None, dev: str) -> float:
    """The layer's forward compute between two TP collectives, averaged over the ranks that
    timed it (0 when tp == 1: no collective inside a layer)."""
    if job.par.tp == 1:
        return 0.0
    colls = sum(step.kind == "coll" for step in layer_graph(job.model, job.par).fwd_steps)
    mine = sum(ops.layer.fwd_ms.values()) / max(1, colls) if ops is not None else 0.0
    both = torch.tensor([mine, float(ops is not None)], dtype=torch.float64, device=dev)
    dist.all_reduce(both)
    return float(both[0].item()) / max(1.0, float(both[1].item()))


def job_main(argv: list[str], body: Callable[[ProfileJob, list[str]], None], usage: str) -> int:
    """A launched process's entry: the ProfileJob from argv[0], `body(job, argv[1:])`. `usage`
    names the module and its arguments (their count is checked). Wrong arguments, an unreadable
    job or a LynxError become one line on stderr and exit 2."""
    if len(argv) != len(usage.split()) - 1:
        print(f"usage: python -m {usage}", file=sys.stderr, flush=True)
        return 2
    try:
        data = json.loads(Path(argv[0]).read_text())
        body(from_dict(ProfileJob, data, "profile job"), argv[1:])
    except (LynxError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str]) -> int:
    """Entry point of a launched rank: `python -m lynxpipe.profile.comm JOB OUT RDV`."""
    return job_main(argv, lambda job, rest: run_rank(job, Path(rest[0]), Path(rest[1])),
                    "lynxpipe.profile.comm JOB OUT RDV")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
