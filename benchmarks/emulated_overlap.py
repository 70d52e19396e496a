"""Measured overlap on the emulated cluster (SPEC §8, §9 second bullet; issue: testbed).

For each layout (TP=2, then PP=2) and each link rate, fast to slow:
  1. `lynxpipe profile --measure --emulate RATE`: op times of the real layer on this CPU, and
     the collectives / p2p / contention over the shaped links -> profile.json;
  2. plans for none, full, selective, checkmate, lynx-heu from that profile, all at one common
     budget at which `none` does not fit: the memory Megatron's selective recompute needs (its
     predicted peak on the fullest rank); `none` is planned with an unlimited budget and run as
     the lower bound (the CPU has the RAM);
  3. `lynxpipe train --plan ... --emulate RATE`: WARMUP + MEASURED steps per policy, the
     policies taken round-robin in ROUNDS rounds so slow drifts of the shared machine hit all;
  4. measured median step time, activation peak, hidden fraction
     1 - (T - T_none) / (T_full - T_none), the overlap's own share
     1 - (T - T_none) / (T_checkmate - T_none), and the simulator's prediction error.

Rerun: `python benchmarks/emulated_overlap.py` (root needed; `--quick` for a smoke run).
Writes benchmarks/results/emulated_overlap/{results.json,results.md,step_time_vs_rate.png} and
the "Emulated cluster" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lynxpipe.artifact import to_dict
from lynxpipe.cost.table import load_profile, profile_model
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest, save_plan
from lynxpipe.runtime.train.result import load_run
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "emulated_overlap"
POLICIES = ("none", "full", "selective", "checkmate", "lynx-heu")
MODEL = "gpt-small-cpu"  # h=512, 8 heads, 4 layers: ~60 ms per layer forward on one core
LAYOUTS = {"TP=2": dict(tp=2, pp=1, micro_batch_size=1, num_microbatches=2, seq_len=256),
           "PP=2": dict(tp=1, pp=2, micro_batch_size=1, num_microbatches=4, seq_len=256)}
RATES = ("1gbit", "200mbit", "100mbit")
BEGIN, END = "<!-- emulated_overlap:begin -->", "<!-- emulated_overlap:end -->"


@dataclass(frozen=True)
class Cell:
    """One (layout, rate, policy) measurement."""

    layout: str
    rate: str
    policy: str
    measured_ms: float
    predicted_ms: float
    steps_ms: tuple[float, ...]
    peak_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int
    hidden_ms: float
    exposed_ms: float


def _flags(par: dict) -> list[str]:
    out = ["--model", MODEL, "--cluster", "a100-pcie"]
    for key, value in par.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _cli(args: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write("$ lynxpipe " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "lynxpipe.cli", *args], stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"lynxpipe {' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")


def _plans(prof: Path, par: dict, work: Path) -> dict[str, tuple[Path, object]]:
    """One plan per policy at the common budget; `none` with an unlimited one."""
    table = load_profile(prof)
    spec = ParallelSpec(**par)
    model = profile_model(get_model(MODEL), spec, table)
    cluster = get_cluster("a100-pcie")
    probe = PlanRequest(model=model, cluster=cluster, parallel=spec, budget_bytes=2**40, costs=table)
    none, selective = make("none", probe), make("selective", probe)
    budget = max(selective.predicted.peak_memory_bytes)
    req = PlanRequest(model=model, cluster=cluster, parallel=spec, budget_bytes=budget, costs=table)
    out = {}
    for policy in POLICIES:
        plan = none if policy == "none" else make(policy, req, strict=True)
        path = work / f"plan-{policy}.json"
        save_plan(path, plan)
        out[policy] = (path, plan)
    return out


def _measure(layout: str, rate: str, args: argparse.Namespace, log: Path) -> list[Cell]:
    par = LAYOUTS[layout]
    work = Path(tempfile.mkdtemp(prefix="lynx-overlap-"))
    prof = work / "profile.json"
    _cli(["profile", "--measure", "--emulate", rate, *_flags(par), "--out", str(prof)], log)
    plans = _plans(prof, par, work)
    budget = plans["checkmate"][1].budget_bytes
    runs: dict[str, list[float]] = {p: [] for p in POLICIES}
    last = {}
    for round_ in range(args.rounds):
        for policy in POLICIES if round_ % 2 == 0 else reversed(POLICIES):
            run_path = work / f"run-{policy}-{round_}.json"
            _cli(["train", "--plan", str(plans[policy][0]), "--steps",
                  str(args.warmup + args.steps), "--emulate", rate, "--quiet",
                  "--out", str(run_path)], log)
            run = load_run(run_path)
            runs[policy] += list(run.step_ms[args.warmup:])
            last[policy] = run
    cells = []
    for policy in POLICIES:
        run, plan = last[policy], plans[policy][1]
        cells.append(Cell(layout, rate, policy, statistics.median(runs[policy]),
                          plan.predicted.step_time_ms, tuple(runs[policy]),
                          max(max(r.peak_activation_bytes) for r in run.ranks),
                          max(plan.predicted.peak_activation_bytes),
                          budget if policy != "none" else plan.budget_bytes,
                          run.recompute_hidden_ms, run.recompute_exposed_ms))
    return cells


def _fractions(cells: list[Cell]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(hidden fraction vs full, overlap share vs checkmate) per cell."""
    out = {}
    by = {(c.layout, c.rate, c.policy): c.measured_ms for c in cells}
    for c in cells:
        none = by[(c.layout, c.rate, "none")]
        full = by[(c.layout, c.rate, "full")]
        cm = by[(c.layout, c.rate, "checkmate")]
        hidden = 1 - (c.measured_ms - none) / (full - none) if full > none else float("nan")
        share = 1 - (c.measured_ms - none) / (cm - none) if cm > none else float("nan")
        out[(c.layout, c.rate, c.policy)] = (hidden, share)
    return out


def _table(cells: list[Cell]) -> str:
    frac = _fractions(cells)
    rows = ["| layout | link | policy | measured step (ms, median) | predicted (ms) | error | "
            "hidden fraction | overlap share | act. peak (MiB) meas. / pred. | budget (MiB) |",
            "|:--|:--|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for c in cells:
        hidden, share = frac[(c.layout, c.rate, c.policy)]
        err = c.predicted_ms / c.measured_ms - 1
        rows.append(
            f"| {c.layout} | {c.rate} | {c.policy} | {c.measured_ms:,.0f} | {c.predicted_ms:,.0f} "
            f"| {err:+.1%} | {hidden:.2f} | {share:.2f} | {c.peak_bytes / 2**20:.1f} / "
            f"{c.predicted_peak_bytes / 2**20:.1f} | "
            f"{'∞' if c.policy == 'none' else f'{c.budget_bytes / 2**20:.1f}'} |")
    return "\n".join(rows)


def _plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(c.layout for c in cells))
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4), squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        rates = list(dict.fromkeys(c.rate for c in cells if c.layout == layout))
        for policy in POLICIES:
            ys = [next(c.measured_ms for c in cells if (c.layout, c.rate, c.policy)
                       == (layout, r, policy)) for r in rates]
            ax.plot(rates, ys, marker="o", label=policy)
        ax.set_title(f"{MODEL}, {layout}, emulated links")
        ax.set_xlabel("link rate")
        ax.set_ylabel("median step time (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _summary(cells: list[Cell]) -> list[str]:
    frac = _fractions(cells)
    lines = []
    slow = list(dict.fromkeys(c.rate for c in cells))[-1]
    for layout in dict.fromkeys(c.layout for c in cells):
        get = {c.policy: c for c in cells if (c.layout, c.rate) == (layout, slow)}
        if "lynx-heu" not in get:
            continue
        hidden = frac[(layout, slow, "lynx-heu")][0]
        faster = all(get["lynx-heu"].measured_ms < get[p].measured_ms
                     for p in ("checkmate", "selective"))
        lines.append(f"- {layout} at {slow}: lynx-heu hides {hidden:.0%} of full recompute's "
                     f"overhead (target ≥ 70%: {'met' if hidden >= 0.7 else 'missed'}); faster "
                     f"than checkmate and selective: {'yes' if faster else 'no'}.")
    errors = [abs(c.predicted_ms / c.measured_ms - 1) for c in cells]
    lines.append(f"- Simulator error over all cells: median {statistics.median(errors):.1%}, "
                 f"max {max(errors):.1%} (targets: median ≤ 5%, every cell ≤ 10%).")
    base = {(c.layout, c.rate): c for c in cells if c.policy == "none"}
    ratio = [abs((c.predicted_ms / base[(c.layout, c.rate)].predicted_ms)
                 / (c.measured_ms / base[(c.layout, c.rate)].measured_ms) - 1)
             for c in cells if c.policy != "none" and (c.layout, c.rate) in base]
    if ratio:
        lines.append(f"- Error of the predicted slowdown over `none` (T/T_none, measured side by "
                     f"side): median {statistics.median(ratio):.1%}, max {max(ratio):.1%}.")
    return lines


def _write(cells: list[Cell], args: argparse.Namespace, wall_s: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    (OUT / "results.json").write_text(json.dumps(
        {"commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": wall_s,
         "model": MODEL, "layouts": LAYOUTS, "rates": list(args.rates), "warmup": args.warmup,
         "steps": args.steps, "rounds": args.rounds, "cells": [to_dict(c) for c in cells]},
        indent=1))
    _plot(cells, OUT / "step_time_vs_rate.png")
    body = "\n".join([
        f"Rerun: `python benchmarks/emulated_overlap.py` (root; {wall_s / 60:.1f} min here, "
        f"commit `{commit}`). Model `{MODEL}` (fp32, CPU, one thread per rank), "
        f"2 ranks in network namespaces on tbf-shaped veth links; per policy "
        f"{args.rounds} launches × {args.steps} measured steps after {args.warmup} warm-up "
        f"steps, policies round-robin; medians. Budget: what selective recompute needs "
        f"(its predicted peak; none is run unconstrained as the lower bound). Predictions: the "
        f"simulator with the profile measured over the same links "
        f"(`lynxpipe profile --measure --emulate RATE`).", "", _table(cells), "",
        *_summary(cells), "", "![step time vs link rate](benchmarks/results/emulated_overlap/"
        "step_time_vs_rate.png)"])
    (OUT / "results.md").write_text("# Emulated cluster: measured overlap\n\n" + body + "\n")
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text() if bench.exists() else "# Benchmarks\n"
    section = f"{BEGIN}\n## Emulated cluster (measured)\n\n{body}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    bench.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=list(RATES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one layout, one rate, one round")
    args = ap.parse_args()
    if args.quick:
        args.layouts, args.rates, args.rounds, args.steps = ["TP=2"], ["100mbit"], 1, 2
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "run.log"
    log.write_text("")
    start = time.time()
    cells = []
    for layout in args.layouts:
        for rate in args.rates:
            print(f"[{time.time() - start:6.0f}s] {layout} @ {rate}", flush=True)
            cells += _measure(layout, rate, args, log)
    _write(cells, args, time.time() - start)
    print("\n".join(_summary(cells)))


if __name__ == "__main__":
    main()
