"""`lynxpipe profile`: write profile.json, the CostTable that plan/simulate/compare read with
`--profile` in place of the analytic model.

    lynxpipe profile --measure --model gpt-small-cpu --tp 2 --pp 1 --seq-len 256 \\
        --micro-batch-size 2 [--emulate 200mbit] --out profile.json
    lynxpipe profile --module hf --model llama/config.json --tp 1 --pp 2 --seq-len 64 \\
        --micro-batch-size 2 --out profile.json     # the layer graph traced from the real block

With `--module` (SPEC §11) the layer graph is traced from a real block (`lynxpipe.profile.module`:
`hf`, `reference`, or FILE.py:FN / package.module:FN) on CPU in fp32, so the profile is made
for 4-byte activations.

Without `--measure` it writes the analytic table. With it, `lynxpipe.profile.run` times the
reference layer's ops on this device and collectives, p2p and contention on launched ranks
(plain loopback or inside the emulated cluster); this module shows the results.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import Progress as RichProgress
from rich.progress import TaskID
from rich.table import Table

from lynxpipe.artifact import to_dict
from lynxpipe.cli.common import SpecArgs, build_request, spec_command
from lynxpipe.cost.table import CostTable, save_profile
from lynxpipe.errors import LynxError
from lynxpipe.profile.run import Progress, profile_ranks, resolve_runtime, run_profile
from lynxpipe.report.console import planning_progress, stdout_console

if TYPE_CHECKING:
    from lynxpipe.profile.samples import Measurement


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
    from lynxpipe.profile.assemble import comm_fits

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
        "tp_sync_ms": comm.sync_ms if comm else None,
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
    module: Annotated[Optional[str], typer.Option(
        "--module", help="Trace the layer graph from a real block: hf (the Hugging Face model "
                         "of the config.json given as --model), reference (lynxpipe's own "
                         "layer), or FILE.py:FN / package.module:FN, FN(model, parallel) "
                         "returning (batch, seq) -> BlockCall.")] = None,
) -> None:
    """Write profile.json: measured costs of this device and links (--measure), the layer graph
    traced from a real block (--module), or analytic."""
    if spec.profile is not None:
        raise LynxError("--profile is what plan/simulate/compare read; `profile` writes --out")
    if module is not None:
        if measure_flag or emulate is not None:
            raise LynxError("--module traces a block's graph; it does not combine with "
                            "--measure or --emulate")
        _module_profile(spec, module, out, json_out)
        return
    if not measure_flag:
        if emulate is not None:
            raise LynxError("--emulate needs --measure")
        _write(out, build_request(dataclasses.replace(spec, profile=None)).costs)
        typer.echo(f"wrote {out} (analytic; add --measure to time this machine)")
        return
    from lynxpipe.runtime.train.preflight import require_torch
    from lynxpipe.testbed import parse_emulate

    require_torch("profile --measure")
    emu = parse_emulate(emulate) if emulate is not None else None
    dev, _, nbytes = resolve_runtime(device, spec.dtype_bytes)
    req = build_request(dataclasses.replace(spec, profile=None, dtype_bytes=nbytes))
    with planning_progress(quiet=json_out) as bar:
        m, table = run_profile(req.model, req.parallel, req.costs, dev, repeats, emu, timeout,
                               _bar_progress(bar, profile_ranks(req.parallel), emu))
    _write(out, table)
    if json_out:
        typer.echo(json.dumps({**summary(m, table, req.costs, emu), "profile_path": str(out)},
                              indent=1))
    else:
        _print(m, table, req.costs, req.cluster.name, emu, out)


def _module_profile(spec: SpecArgs, module: str, out: Path, json_out: bool) -> None:
    """Trace the block, write the profile, show its saved tensors."""
    from lynxpipe.profile.module import load_source, module_costs

    if spec.dtype_bytes not in (None, 4):
        raise LynxError(f"--dtype-bytes {spec.dtype_bytes}: blocks are traced on CPU in fp32 "
                        f"(4 bytes)")
    req = build_request(dataclasses.replace(spec, profile=None, dtype_bytes=4))
    config = Path(spec.model) if Path(spec.model).is_file() else None
    source, label = load_source(module, req.model, req.parallel, config)
    table = module_costs(req.model, req.cluster, req.parallel, source, label)
    _write(out, table)
    graph, ref = table.layer.graph, req.costs.layer.graph
    if json_out:
        typer.echo(json.dumps({"block": label, "profile_path": str(out),
                               "saved_bytes": graph.saved_bytes(),
                               "reference_saved_bytes": ref.saved_bytes(),
                               "tensors": [{"name": t.name, "bytes": t.size_bytes,
                                            "droppable": t.droppable} for t in graph.tensors]},
                              indent=1))
        return
    console = stdout_console()
    view = Table(title=f"saved tensors of {label}, per layer", title_justify="left")
    for col in ("tensor", "bytes", "droppable", "ops re-run to regenerate it alone"):
        view.add_column(col, justify="right" if col == "bytes" else "left")
    for t in graph.tensors:
        ops = graph.recompute_ops(frozenset({t.name}), t.segment) if t.droppable else ()
        shown = ", ".join(ops) if len(ops) <= 3 else f"{len(ops)}: {ops[0]} ... {ops[-1]}"
        view.add_row(t.name, _kib(t.size_bytes), "yes" if t.droppable else "no", shown)
    console.print(view)
    console.print(f"{len(graph.ops)} ops, {len(graph.collectives)} collectives, "
                  f"{graph.num_segments} segment(s); saved {_kib(graph.saved_bytes())} per layer "
                  f"(lynxpipe's reference {req.model.family} layer: {_kib(ref.saved_bytes())})",
                  highlight=False)
    console.print(f"wrote {out}", highlight=False)


def _bar_progress(bar: RichProgress, ranks: int,
                  emulate: tuple[float, float] | None) -> Progress:
    """A progress callback drawing one rich task per measured quantity."""
    tasks: dict[str, TaskID] = {}
    where = f"emulated {emulate[0]:g} Mbit/s" if emulate else "loopback"
    if ranks > 1:
        tasks["start"] = bar.add_task(f"starting {ranks} ranks ({where})", total=1)

    def progress(what: str, done: int, total: int) -> None:
        if "start" in tasks:
            bar.update(tasks.pop("start"), completed=1)
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    return progress
