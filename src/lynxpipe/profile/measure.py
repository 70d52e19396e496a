"""`lynxpipe profile --measure`, torch side: time the reference layer's ops on this device
(communication is timed by `profile.comm`; `profile.assemble` turns both into a CostTable).

The layer is the runtime's `TransformerLayer` for one TP rank (tp > 1: on a *fake* process
group of the TP size: real shard widths, free collectives; those are measured apart). Forward:
each graph op is one timed `layer.run_ops(env, PLAIN, (op,))`. Backward: each op's backward
timed standalone (re-run on detached leaf copies of its inputs, `autograd.backward` of the
outputs later ops read) gives the *shares*, the whole-layer backward the *total* (standalone
calls miss the engine's per-node work and the residual gradient sums); a GEMM's one autograd
node is split into dgrad/wgrad by the analytic ratio. The monolithic embedding and head are cut
where the runtime announces (window hooks, output `tag`s); a piece of several ops is split by
the analytic forward times, their whole backward by measured forward x analytic bwd/fwd ratio
(`op_times`). Medians after a warm-up. With several ranks on a CPU all time their ops at once,
one thread each, as the job's ranks share the cores (a layer: 60 ms alone, 90-110 ms with both
of 2 cores busy, SPEC §8).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lynxpipe.cost.graph import LayerGraph
from lynxpipe.profile.samples import (
    GROUP_SEP,
    KindTimes,
    Measurement,
    OpSamples,
    ProfileJob,
    Progress,
)
from lynxpipe.runtime.model.env import PLAIN, Env, PlainRuntime
from lynxpipe.runtime.model.layer import BuildConfig, TransformerLayer
from lynxpipe.runtime.model.stage import Stage
from lynxpipe.schedule.windows import FWD_COLL


class Marks:
    """Timestamps in ms. On a GPU they are CUDA events read after one sync at the end, so no
    host sync between ops adds its latency to theirs; on a CPU, the host clock."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._points: list[Any] = []

    def mark(self) -> int:
        """Record now; returns the mark's index."""
        if self.cuda:
            self._points.append(torch.cuda.Event(enable_timing=True))
            self._points[-1].record()
        else:
            self._points.append(time.perf_counter() * 1e3)
        return len(self._points) - 1

    def read(self) -> list[float]:
        """Every mark, in ms after the first."""
        if not self.cuda:
            return [t - self._points[0] for t in self._points]
        torch.cuda.synchronize()
        return [self._points[0].elapsed_time(e) for e in self._points]


def median(values: list[float]) -> float:
    """Median (the timing statistic everywhere here: robust to a preempted repetition)."""
    return float(statistics.median(values))


class _Recorder(PlainRuntime):
    """An `OpRuntime` that timestamps what a monolithic module announces (tags and windows)."""

    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.names: list[tuple[str, int]] = []

    def tag(self, name: str, *parts: Tensor) -> None:
        self.names.append((f"tag:{name}", self.marks.mark()))

    def window(self, kind: str, step: int) -> None:
        if kind == FWD_COLL:
            self.names.append((f"coll:{step}", self.marks.mark()))


def pieces(graph: LayerGraph, marks: list[tuple[str, float]], start_ms: float,
           end_ms: float) -> dict[str, float]:
    """Cut a forward into pieces at known op ends; keys join the ops of a piece with `+`.

    An op's end is known when its output is tagged, when a forward collective follows it (the
    window hook fires right after issue) or when it is the last op, which runs to `end_ms` (so
    the pieces add up to the whole forward).
    """
    at = dict(marks)
    ends: dict[str, float] = {}
    for i, step in enumerate(graph.fwd_steps):
        if step.kind == "compute" and f"coll:{i + 1}" in at:
            ends[step.ops[-1]] = at[f"coll:{i + 1}"]
    for op in graph.ops:
        if op.output and f"tag:{op.output}" in at:
            ends[op.name] = at[f"tag:{op.output}"]
    ends[graph.ops[-1].name] = end_ms
    out: dict[str, float] = {}
    group: list[str] = []
    last = start_ms
    for op in graph.ops:
        group.append(op.name)
        if op.name in ends:
            out[GROUP_SEP.join(group)] = max(0.0, ends[op.name] - last)
            last, group = ends[op.name], []
    return out


# -- the transformer layer ------------------------------------------------------------------

def _forward_by_op(layer: TransformerLayer, x: Tensor, marks: Marks) -> Env:
    """One layer forward, op by op (as `TransformerLayer.forward` runs it), marked after each."""
    layer.rng.for_layer(layer.index)
    env = Env()
    env.put("x", x)
    for name in layer.op_names:
        layer.run_ops(env, PLAIN, (name,))
        marks.mark()
    return env


def _op_backward_ms(layer: TransformerLayer, ref: Env, name: str, consumed: frozenset[str],
                    sync: bool) -> float:
    """Backward of op `name` alone: re-run it on leaf copies of its inputs, time autograd."""
    assert layer.reads is not None
    env = Env({n: tuple(p.detach().requires_grad_(p.requires_grad) for p in ref.parts(n))
               for n in layer.reads[name]})
    layer.rng.for_layer(layer.index)
    layer.run_ops(env, PLAIN, (name,))
    outs = [p for n in sorted(layer.writes[name] & consumed) for p in env.parts(n)
            if p.requires_grad]
    if not outs:
        return 0.0
    grads = [torch.ones_like(p) for p in outs]
    marks = Marks(sync)
    marks.mark()
    torch.autograd.backward(outs, grads)
    marks.mark()
    return marks.read()[-1]


def time_layer(layer: TransformerLayer, x: Tensor, job: ProfileJob, sync: bool,
               progress: Progress) -> KindTimes:
    """Per-op forward, per-op standalone backward shares and whole backward of one layer."""
    layer(x.detach().requires_grad_())  # the first forward learns each op's reads and writes
    assert layer.reads is not None
    consumed = frozenset().union(*layer.reads.values()) | {"out"}
    fwd: dict[str, list[float]] = {n: [] for n in layer.op_names}
    bwd: dict[str, list[float]] = {n: [] for n in layer.op_names}
    b_tot: list[float] = []
    total = job.warmup + job.repeats
    for rep in range(total):
        leaf, marks = x.detach().requires_grad_(), Marks(sync)
        marks.mark()
        env = _forward_by_op(layer, leaf, marks)
        env["out"].backward(torch.ones_like(env["out"]))
        marks.mark()
        at = marks.read()
        times = {n: at[i + 1] - at[i] for i, n in enumerate(layer.op_names)}
        layer.zero_grad(set_to_none=True)
        standalone = {n: _op_backward_ms(layer, env, n, consumed, sync) for n in layer.op_names}
        layer.zero_grad(set_to_none=True)
        if rep >= job.warmup:
            for n in layer.op_names:
                fwd[n].append(times[n])
                bwd[n].append(standalone[n])
            b_tot.append(at[-1] - at[-2])
        progress("layer ops", rep + 1, total)
    return KindTimes({n: median(v) for n, v in fwd.items()},
                     {n: median(v) for n, v in bwd.items()}, median(b_tot))


# -- embedding, head, optimizer -------------------------------------------------------------

def _time_module(graph: LayerGraph, run: Callable[[_Recorder], Tensor], job: ProfileJob,
                 sync: bool) -> KindTimes:
    """Forward pieces cut at the module's announcements; whole backward."""
    samples: dict[str, list[float]] = {}
    b_tot: list[float] = []
    for rep in range(job.warmup + job.repeats):
        marks = Marks(sync)
        rec = _Recorder(marks)
        marks.mark()
        out = run(rec)
        end = marks.mark()
        out.backward(torch.ones_like(out))
        marks.mark()
        at = marks.read()
        if rep >= job.warmup:
            named = [(name, at[i]) for name, i in rec.names]
            for key, ms in pieces(graph, named, 0.0, at[end]).items():
                samples.setdefault(key, []).append(ms)
            b_tot.append(at[-1] - at[end])
    every = GROUP_SEP.join(op.name for op in graph.ops)
    return KindTimes({k: median(v) for k, v in samples.items()}, {every: median(b_tot)},
                     median(b_tot))


def _optimizer_ms_per_param(stage: Stage, job: ProfileJob, sync: bool) -> float:
    """One AdamW step over the stage's parameters, per parameter."""
    params = [p for p in stage.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5)
    marks = Marks(sync)
    marks.mark()
    for _ in range(job.warmup + job.repeats):
        opt.step()
        marks.mark()
    at = marks.read()[job.warmup:]
    return median([b - a for a, b in zip(at, at[1:])]) / sum(p.numel() for p in params)


def time_ops(cfg: BuildConfig, job: ProfileJob, progress: Progress) -> OpSamples:
    """Time the layer, embedding, head and optimizer of one rank of `cfg`'s layout."""
    sync = cfg.device.startswith("cuda")
    stage = Stage(cfg, range(1), embed=True, head=True)
    assert stage.embed is not None and stage.head is not None
    par, h = cfg.par, cfg.model.hidden_size
    rows = par.boundary_rows
    gen = torch.Generator().manual_seed(job.seed)
    x = (torch.randn(rows, par.micro_batch_size, h, generator=gen)).to(**cfg.factory())
    ids = torch.randint(0, cfg.model.vocab_size, (par.micro_batch_size, par.seq_len),
                        generator=gen).to(cfg.device)
    layer = time_layer(stage.layers[0], x, job, sync, progress)
    embed, head = stage.embed, stage.head
    progress("embedding and head", 0, 2)
    embed_t = _time_module(embed.graph, lambda rec: embed(ids, rec), job, sync)
    progress("embedding and head", 1, 2)
    head_t = _time_module(
        head.graph, lambda rec: head(x.detach().requires_grad_(), ids, rec), job, sync)
    progress("embedding and head", 2, 2)
    return OpSamples(layer, embed_t, head_t, _optimizer_ms_per_param(stage, job, sync))


def run_local(cfg: BuildConfig, job: ProfileJob, progress: Progress) -> Measurement:
    """A one-rank profile in this process: ops only (nothing to communicate with)."""
    threads = torch.get_num_threads()
    if not cfg.device.startswith("cuda"):
        torch.set_num_threads(1)  # one rank per core, as the runtime runs
    try:
        ops = time_ops(cfg, job, progress)
    finally:
        torch.set_num_threads(threads)
    return Measurement(ops, None, describe_device(cfg.device), 1)


def describe_device(device: str) -> str:
    """`cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return "cpu"
