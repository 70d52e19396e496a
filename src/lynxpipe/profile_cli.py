"""`lynxpipe profile`: write profile.json, the CostTable that plan/simulate/compare read with
`--profile` in place of the analytic model.

    lynxpipe profile --measure --model gpt-small-cpu --tp 2 --pp 1 --seq-len 256 \\
        --micro-batch-size 2 [--emulate 200mbit] --out profile.json

Without `--measure` it writes the analytic table. With it, the reference layer's ops are timed
on this device (`runtime.profile`), and collectives, p2p and contention on the launched ranks,
plain loopback or inside the emulated cluster (`runtime.profile_comm`). The profile is made for
the model *at the runtime's dtype* (fp32 on CPU: dtype_bytes=4), exactly as `BuildConfig.spec`
and `lynxpipe train` see it; `profile_model` finds that model again from the plain flags.

Registers itself on `lynxpipe.cli.app` (imported at the bottom of `lynxpipe.cli`, like
`train_cli`); torch is imported only when measuring.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import TaskID
from rich.table import Table

from lynxpipe.artifact import fingerprint, to_dict
from lynxpipe.cli import SpecArgs, app, build_request, spec_command
from lynxpipe.cost.layers import embed_graph, head_graph, layer_graph
from lynxpipe.cost.table import CostTable, save_profile
from lynxpipe.cost.table import profile_model as table_profile_model
from lynxpipe.errors import LynxError
from lynxpipe.report.console import planning_progress, stdout_console
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

if TYPE_CHECKING:
    from lynxpipe.profile.measure import Measurement, ProfileJob

RUNTIME_DTYPES = {4: "float32", 2: "bfloat16"}
"""torch dtype the runtime uses for each --dtype-bytes."""
MIN_REPEATS = 5
MIN_FIT_SPAN_BYTES = 1 << 20
"""Largest message of every fit is at least this (1 MiB)."""
SIZES_PER_FIT = 6
"""Message sizes per alpha-beta fit."""
MEMORY_HEADROOM = 0.8
"""Fraction of the available memory a profile may plan to use."""


def profile_model(model: ModelSpec, par: ParallelSpec, table: CostTable) -> ModelSpec:
    """`model` with the dtype_bytes the profile was measured at (fp32 on CPU: 4)."""
    found = table_profile_model(model, par, table)
    if found is None:
        raise LynxError(f"profile was made for other specs (fingerprint {table.spec_fingerprint}, "
                        f"these specs: {fingerprint(model, par)}); re-run `lynxpipe profile` "
                        f"with the same --model/--tp/--pp/--micro-batch-size/--seq-len flags")
    return found


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
    from lynxpipe.profile.measure import ProfileJob

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


def measure(job: ProfileJob, emulate: tuple[float, float] | None,
            timeout_s: float, quiet: bool) -> Measurement:
    """Run the job in this process (one rank) or on launched ranks, with a progress line."""
    import torch

    from lynxpipe.runtime.model.layer import BuildConfig
    from lynxpipe.profile.measure import run_local
    from lynxpipe.profile.comm import launch
    from lynxpipe.runtime.model.tp import TPContext

    with planning_progress(quiet=quiet) as bar:
        tasks: dict[str, TaskID] = {}
        where = f"emulated {emulate[0]:g} Mbit/s" if emulate else "loopback"
        if job.ranks > 1:
            tasks["start"] = bar.add_task(f"starting {job.ranks} ranks ({where})", total=1)

        def progress(what: str, done: int, total: int) -> None:
            if "start" in tasks:
                bar.update(tasks.pop("start"), completed=1)
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        if job.ranks == 1:
            cfg = BuildConfig(job.model, job.par, TPContext(), getattr(torch, job.dtype),
                              job.device, job.seed)
            return run_local(cfg, job, progress)
        return launch(job, emulate, timeout_s, progress)


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def ops_table(measured: CostTable, analytic: CostTable, cluster: str) -> Table:
    """Per-op forward/backward, measured next to the analytic model."""
    table = Table(title="ops, ms per TP rank", title_justify="left")
    for col in ("graph", "op", "fwd", f"fwd ({cluster})", "bwd", f"bwd ({cluster})"):
        table.add_column(col, justify="left" if col in ("graph", "op") else "right")
    for kind in ("embed", "layer", "head"):
        got, ana = getattr(measured, kind), getattr(analytic, kind)
        for op in got.graph.ops:
            m, a = got.op_ms[op.name], ana.op_ms[op.name]
            table.add_row(kind, op.name, _ms(m.fwd_ms), _ms(a.fwd_ms),
                          _ms(m.dgrad_ms + m.wgrad_ms), _ms(a.dgrad_ms + a.wgrad_ms))
        table.add_row(kind, "[b]total[/b]", _ms(got.fwd_ms()), _ms(ana.fwd_ms()),
                      _ms(got.bwd_ms()), _ms(ana.bwd_ms()), end_section=True)
    return table


def comm_table(m: Measurement, measured: CostTable, analytic: CostTable) -> Table:
    """Alpha-beta fits and what they give for the model's own messages."""
    from lynxpipe.profile.measure import comm_fits

    fits, p2p = comm_fits(m.comm)
    table = Table(title="communication", title_justify="left")
    for col in ("kind", "alpha ms", "GB/s", "r2", "sizes", "model msg", "ms", "analytic ms"):
        table.add_column(col, justify="left" if col in ("kind", "sizes") else "right")
    colls = {c.kind: c for c in measured.layer.graph.collectives}
    series = dict(m.comm.collectives) if m.comm else {}
    rows = [(k, fits[k], series[k].sizes_bytes) for k in fits]
    if p2p is not None and m.comm is not None and m.comm.p2p is not None:
        rows.append(("p2p", p2p, m.comm.p2p.sizes_bytes))
    for kind, fit, sizes in rows:
        coll = colls.get(kind)
        if coll is not None:
            model_cols = [_kib(coll.size_bytes), _ms(measured.layer.coll_ms[coll.name]),
                          _ms(analytic.layer.coll_ms[coll.name])]
        elif kind == "p2p":
            model_cols = [_kib(measured.p2p_bytes), _ms(measured.p2p_ms), _ms(analytic.p2p_ms)]
        else:  # measured, but this layout's layer does not use it
            model_cols = ["-", "-", "-"]
        table.add_row(kind, f"{fit.alpha_ms:.3f}", f"{fit.bytes_per_s / 1e9:.3f}",
                      f"{fit.r2:.3f}", f"{_kib(sizes[0])}-{_kib(sizes[-1])}", *model_cols)
    return table


def _kib(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{nbytes:.0f}B"
    return f"{nbytes / 1024:.0f}K" if nbytes < 2**20 else f"{nbytes / 2**20:.1f}M"


def summary(m: Measurement, measured: CostTable, analytic: CostTable,
            emulate: tuple[float, float] | None) -> dict[str, object]:
    """The headline numbers (printed under the tables, or as --json)."""
    comm = m.comm
    return {
        "device": m.device, "concurrent_ranks": m.concurrent_ranks,
        "link": (f"emulated {emulate[0]:g} Mbit/s" if emulate else "loopback") if comm else None,
        "backend": comm.backend if comm else None,
        "layer_fwd_ms": measured.layer.fwd_ms(), "layer_bwd_ms": measured.layer.bwd_ms(),
        "layer_fwd_ms_analytic": analytic.layer.fwd_ms(),
        "layer_bwd_ms_analytic": analytic.layer.bwd_ms(),
        "layer_fwd_coll_ms": measured.layer.fwd_coll_ms(), "p2p_ms": measured.p2p_ms,
        "contention": measured.contention, "contention_analytic": analytic.contention,
        "contention_window_ms": comm.window_ms if comm else None,
        "optimizer_ms_per_mparam": 1e6 * measured.optimizer_ms_per_param,
        "samples": to_dict({**comm.collectives, "p2p": comm.p2p}) if comm else {},
    }


def _print(m: Measurement, measured: CostTable, analytic: CostTable, cluster: str,
           emulate: tuple[float, float] | None, out: Path) -> None:
    console = stdout_console()
    console.print(ops_table(measured, analytic, cluster))
    if m.comm is not None:
        console.print(comm_table(m, measured, analytic))
    s = summary(m, measured, analytic, emulate)
    link = f", {s['link']} via {s['backend']}" if m.comm else ""
    window = (f" (probed on a {s['contention_window_ms']:.1f} ms all-reduce)"
              if m.comm else " (not probed: one rank)")
    console.print(f"device {m.device}, {m.concurrent_ranks} rank(s) computing at once{link}",
                  highlight=False)
    console.print(f"contention {measured.contention:.2f}{window}, analytic "
                  f"{analytic.contention:.2f}; AdamW {s['optimizer_ms_per_mparam']:.2f} ms per "
                  f"M params", highlight=False)
    console.print(f"wrote {out}", highlight=False)


def _write(out: Path, table: CostTable) -> None:
    try:
        save_profile(out, table)
    except OSError as exc:
        raise LynxError(f"cannot write {out}: {exc.strerror or exc}") from None


@app.command("profile")
@spec_command
def profile_command(
    spec: SpecArgs,
    measure_flag: Annotated[bool, typer.Option(
        "--measure", help="Time ops, collectives and p2p on this machine (default: write the "
                          "analytic table).")] = False,
    out: Annotated[Path, typer.Option(
        "--out", dir_okay=False, help="Where to write the profile.")] = Path("profile.json"),
    emulate: Annotated[Optional[str], typer.Option(
        "--emulate", help="RATE[,LATENCY], e.g. 200mbit: run the ranks in an emulated cluster "
                          "with links shaped to RATE (needs root).")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="cpu (fp32), cuda (bf16, or fp32 with --dtype-bytes 4) or auto.")
    ] = "auto",
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Timed repetitions per measurement (median kept; >= 5).")] = 7,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Seconds before launched ranks are killed.")] = 900.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Write profile.json: measured costs of this device and links (--measure), or analytic."""
    if spec.profile is not None:
        raise LynxError("--profile is what plan/simulate/compare read; `profile` writes --out")
    if not measure_flag:
        if emulate is not None:
            raise LynxError("--emulate needs --measure")
        _write(out, build_request(dataclasses.replace(spec, profile=None)).costs)
        typer.echo(f"wrote {out} (analytic; add --measure to time this machine)")
        return
    if repeats < MIN_REPEATS:
        raise LynxError(f"--repeats {repeats} must be >= {MIN_REPEATS}")
    from lynxpipe.testbed import parse_emulate

    emu = parse_emulate(emulate) if emulate is not None else None
    dev, dtype_name, nbytes = resolve_runtime(device, spec.dtype_bytes)
    req = build_request(dataclasses.replace(spec, profile=None, dtype_bytes=nbytes))
    model, par = req.model, req.parallel
    check_buildable(model, par)
    if emu is not None and profile_ranks(par) == 1:
        raise LynxError("--emulate needs something to send: tp > 1 or pp > 1")
    check_memory(model, par, dev, profile_ranks(par))
    base = req.costs  # analytic, for the runtime-dtype model: the fingerprint plan checks
    m = measure(make_job(base, model, par, dtype_name, dev, repeats), emu, timeout, json_out)
    from lynxpipe.profile.measure import assemble

    table = assemble(base, m, model, par)
    _write(out, table)
    if json_out:
        typer.echo(json.dumps({**summary(m, table, base, emu), "profile_path": str(out)},
                              indent=1))
    else:
        _print(m, table, base, req.cluster.name, emu, out)
