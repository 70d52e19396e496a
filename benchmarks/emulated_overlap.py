"""The proof on real processes: overlapped recompute against the best on-demand recompute, swept
over the memory budget on the emulated cluster (SPEC §8, §9; issue 9).

For each layout (TP=2, PP=2: 2 ranks, one core each) and link rate (1 Gbit, 200 and 100 Mbit):
  1. `lynxpipe profile --measure --emulate RATE`: the real layer's ops on this CPU (fused
     attention), collectives, p2p and contention over the shaped links -> profile.json;
  2. budgets: BUDGETS points from the smallest feasible one to `none`'s peak, the lower half
     where checkmate is predicted >= 5% slower than none (`budgets`); at each, every
     policy (none, full, selective, checkmate, adapipe, lynx-heu, lynx-opt) plans from that
     profile; the plans that fit are run (identical plans once); every policy gets the same
     communication overlaps (SPEC §4, honest baselines: the executor is shared);
  3. the ranks run every plan in one gloo world over the shaped links (`overlap_rank.py`),
     plans round-robin for ROUNDS rounds (order reversed every other round), WARMUP + STEPS
     steps each; the slowest rank's step time, and per-rank in-loop section timers; after
     each round the ranks time their ops again (`lynxpipe.profile.ops_only`): the CPU's speed
     drifts over minutes, so the profile's op times (taken before the runs) and the runs can
     see different CPUs;
  4. per cell (layout, rate, budget, policy): measured median with its spread, the
     simulator's prediction from the profile (what the planner saw, what the targets judge)
     and, as a drift diagnostic, from the profile re-timed with the ops measured beside the
     runs (median over the rounds; communication as profiled), `none`'s measured time at
     that layout and rate, whether it fits.

    python benchmarks/emulated_overlap.py              # full run (root; ~1-2 h on 2 cores)
    python benchmarks/emulated_overlap.py --quick      # one layout, one rate, 3 budgets
    python benchmarks/emulated_overlap.py --render-only
    python benchmarks/emulated_overlap.py --model gpt-medium-cpu --layouts TP=2   # h=1024

Writes benchmarks/results/emulated_overlap/{results.json, results.md, step_time_vs_budget.png},
the measured profiles (profiles/LAYOUT-RATE.json; `emulated_replan.py` re-plans from them) and
the "Emulated cluster" section of BENCHMARKS.md (`emulated_overlap_report.py`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from emulated_overlap_report import DEFAULT_MODEL, FORCING, Cell, render

from lynxpipe.artifact import from_dict, to_dict, write_json_atomic
from lynxpipe.cost.table import CostTable
from lynxpipe.plan.planners import make, smallest_feasible_bytes
from lynxpipe.plan.types import Plan, PlanRequest, save_plan
from lynxpipe.profile.assemble import median_ops, retime
from lynxpipe.profile.run import make_job
from lynxpipe.profile.samples import OpSamples
from lynxpipe.sim.engine import simulate
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.workflow import build_request

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "emulated_overlap"
MODEL = DEFAULT_MODEL
# The second shape (`--model gpt-medium-cpu`, h=1024): at h=512 and 100-200 Mbit TP=2 the lean
# segment recompute of every layer is under 5% of the step, so only `full` layers (replayed
# all-reduces, never hideable) force recompute there; twice the width doubles the GEMMs' share.
MODELS = ("gpt-small-cpu", "gpt-medium-cpu")
LAYOUTS = {"TP=2": dict(tp=2, pp=1, micro_batch_size=1, num_microbatches=2, seq_len=256),
           "PP=2": dict(tp=1, pp=2, micro_batch_size=1, num_microbatches=4, seq_len=256)}
RATES = ("1gbit", "200mbit", "100mbit")
POLICIES = ("none", "full", "selective", "checkmate", "adapipe", "lynx-heu", "lynx-opt")
BUDGETS = 6
OPS_REPEATS = 7  # as `lynxpipe profile --measure` times them by default
RANK_SCRIPT = Path(__file__).resolve().parent / "overlap_rank.py"


def out_dir(model: str) -> Path:
    """Where a sweep of `model` keeps its results (the default model: OUT itself)."""
    return OUT if model == MODEL else OUT / model


def _flags(par: dict[str, Any], model: str) -> list[str]:
    out = ["--model", model, "--cluster", "a100-pcie"]
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


def _key(plan: Plan) -> tuple:
    """Plans that would run identically (budget and name aside) share one measurement."""
    return (plan.partition, plan.layers, tuple(tuple(str(a) for a in r) for r in plan.order.ranks))


def predicted_sections(plan: Plan, costs: Any) -> list[dict[str, float]]:
    """Per rank, the simulator's time in forwards, backwards, RECV waits and the tail (DP sync
    and optimizer): what the ranks' in-loop section timers measure."""
    sim = simulate(costs, plan.partition, plan.layers, plan.order, trace=True)
    out = [{"F": 0.0, "B": 0.0, "RECV_wait": 0.0, "tail": 0.0} for _ in sim.ranks]
    for ev in sim.events:
        key = {"forward": "F", "backward": "B", "tail": "tail"}.get(ev.cat)
        if key is None and ev.cat == "idle" and ev.name.startswith("wait"):
            key = "RECV_wait"
        if key is not None:
            out[ev.rank][key] += ev.dur_ms
    return out


def _slowdown(req: PlanRequest, budget: int, none_ms: float) -> float:
    """checkmate's predicted step at `budget` over none's, minus 1."""
    plan = make("checkmate", replace(req, budget_bytes=budget))
    return plan.predicted.step_time_ms / none_ms - 1 if plan.predicted.fits_budget else 1.0


def forcing_edge(req: PlanRequest, low: int, high: int, none_ms: float) -> int:
    """The largest budget in [low, high] where checkmate, the best on-demand plan, is predicted
    >= FORCING slower than none (`none_ms`; bisection to 1/200 of the range; the optimum's step
    time does not grow with the budget). Predictions only: nothing measured picks the budgets."""
    if _slowdown(req, low, none_ms) < FORCING:
        return low
    lo, hi = low, high  # forcing at lo; not at hi (none fits there)
    while hi - lo > max(1, (high - low) // 200):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _slowdown(req, mid, none_ms) >= FORCING else (lo, mid)
    return lo


def budgets(req: PlanRequest, count: int) -> list[int]:
    """`count` budgets from the smallest feasible one to `none`'s peak. The lower half spans,
    evenly, the budgets where on-demand recompute is predicted to cost >= 5% (the question:
    without that, nothing is left for overlap to win), the upper half the rest up to the peak.
    An even grid would put one or two points there: the predicted cost falls below 5% within
    the lowest sixth to third of the range. Fewer than 4 budgets, or nothing forcing: an even
    grid."""
    low = smallest_feasible_bytes(req)
    none = make("none", req).predicted
    high = max(none.peak_memory_bytes)
    even = [low + (high - low) * k // (count - 1) for k in range(count)]
    below = count // 2
    if count < 4:
        return even
    edge = forcing_edge(req, low, high, none.step_time_ms)
    if edge - low < below:
        return even
    above = count - below
    return ([low + (edge - low) * k // (below - 1) for k in range(below)]
            + [edge + (high - edge) * k // above for k in range(1, above + 1)])


def requests(prof: Path, par: dict[str, Any], model: str = MODEL,
             ) -> tuple[PlanRequest, PlanRequest]:
    """The request planned from the measured profile, and its analytic twin (same specs)."""
    probe = build_request(get_model(model), get_cluster("a100-pcie"), ParallelSpec(**par),
                          budget_bytes=2**40, profile=prof, adopt_profile_dtype=True)
    analytic = build_request(probe.model, probe.cluster, probe.parallel, budget_bytes=2**40)
    return probe, analytic


def plan_cells(probe: PlanRequest, budget_list: list[int], work: Path,
               ) -> tuple[list[dict[str, Any]], list[Plan], list[Path]]:
    """Every (budget, policy) with its plan's prediction; the distinct fitting plans to run."""
    cells, distinct = [], {}
    for budget in budget_list:
        req = PlanRequest(model=probe.model, cluster=probe.cluster, parallel=probe.parallel,
                          budget_bytes=budget, costs=probe.costs)
        for policy in POLICIES:
            plan = make(policy, req)
            cell = {"policy": policy, "budget_bytes": budget,
                    "fits": plan.predicted.fits_budget,
                    "predicted_ms": plan.predicted.step_time_ms,
                    "predicted_sections": predicted_sections(plan, probe.costs),
                    "predicted_peak_bytes": max(plan.predicted.peak_activation_bytes),
                    "predicted_hidden_ms": plan.predicted.recompute_hidden_ms,
                    "predicted_exposed_ms": plan.predicted.recompute_exposed_ms, "run": None}
            if cell["fits"]:
                key = _key(plan)
                if key not in distinct:
                    distinct[key] = plan
                cell["run"] = list(distinct).index(key)
            cells.append(cell)
    plans = list(distinct.values())
    return cells, plans, [save_plan(work / f"plan-{i}.json", p) for i, p in enumerate(plans)]


def in_run_predictions(cells: list[dict[str, Any]], plans: list[Plan], costs: CostTable,
                       ) -> None:
    """Each run cell's prediction again, from `costs` (op times measured beside the runs)."""
    for cell in cells:
        if cell["run"] is not None:
            plan = plans[cell["run"]]
            sim = simulate(costs, plan.partition, plan.layers, plan.order)
            cell["inrun_predicted_ms"] = sim.step_time_ms
            cell["inrun_predicted_sections"] = predicted_sections(plan, costs)


def run_plans(plans: list[Path], par: dict[str, Any], rate: str, args: argparse.Namespace,
              work: Path, ops_job: Path) -> dict[str, Any]:
    """All plans on the ranks of one emulated cluster: {"ranks": per rank, per plan, the
    measured steps; "ops": rank 0's op timings after each round (`ops_job`)}."""
    from lynxpipe.testbed import (
        EmulatedCluster,
        emulated,
        free_cluster_id,
        master_addr,
        parse_emulate,
        require_privileges,
        run_in_rank,
    )

    require_privileges()
    job = work / "job.json"
    job.write_text(json.dumps({"plans": [str(p) for p in plans], "rounds": args.rounds,
                               "warmup": args.warmup, "steps": args.steps, "seed": 7,
                               "timeout_s": 600, "ops_job": str(ops_job),
                               "ops_dir": str(work)}))
    out = work / "measured.json"
    mbit, latency = parse_emulate(rate)
    world = par["tp"] * par["pp"]
    cluster = EmulatedCluster(num_ranks=world, rate_mbit=mbit, latency_ms=latency,
                              tp_size=par["tp"], pp_size=par["pp"], cluster_id=free_cluster_id())
    env = {"MASTER_PORT": "29500", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with emulated(cluster) as handle:
        env["MASTER_ADDR"] = master_addr(handle)
        procs = [run_in_rank(handle, r, [sys.executable, str(RANK_SCRIPT), str(job), str(out)],
                             env, stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL)
                 for r in range(world)]
        for line in procs[0].stdout:  # type: ignore[union-attr]
            print(f"    {line.decode().strip()}", flush=True)
        codes = [p.wait() for p in procs]
    if any(codes) or not out.exists():
        sys.exit(f"benchmark ranks failed (exit codes {codes}); rerun with one layout to see why")
    return json.loads(out.read_text())


def profile_path(layout: str, rate: str, model: str = MODEL) -> Path:
    """Where the sweep keeps the profile it measured for (layout, rate)."""
    return out_dir(model) / "profiles" / f"{layout.replace('=', '')}-{rate}.json"


def ops_path(layout: str, rate: str, model: str = MODEL) -> Path:
    """Where it keeps rank 0's op timings beside the runs (one per round)."""
    return out_dir(model) / "profiles" / f"{layout.replace('=', '')}-{rate}.ops.json"


def measure(layout: str, rate: str, args: argparse.Namespace, log: Path) -> list[Cell]:
    """Profile, plan and run one (layout, rate); returns its cells."""
    par = LAYOUTS[layout]
    work = Path(tempfile.mkdtemp(prefix="lynx-overlap-"))
    prof = work / "profile.json"
    _cli(["profile", "--measure", "--emulate", rate, *_flags(par, args.model), "--out",
          str(prof)], log)
    # kept beside the results: every prediction can be re-planned from the profile it used
    kept = profile_path(layout, rate, args.model)
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prof, kept)
    probe, analytic = requests(prof, par, args.model)
    specs, plans, paths = plan_cells(probe, budgets(probe, args.budgets), work)
    print(f"  {len(specs)} cells, {len(plans)} distinct plans to run", flush=True)
    ops_job = work / "ops-job.json"
    ops_job.write_text(json.dumps(to_dict(make_job(
        analytic.costs, probe.model, probe.parallel, "float32", "cpu", OPS_REPEATS))))
    out = run_plans(paths, par, rate, args, work, ops_job)
    write_json_atomic(ops_path(layout, rate, args.model), out["ops"])
    ops = median_ops([from_dict(OpSamples, o, "op timing") for o in out["ops"]])
    in_run_predictions(specs, plans, retime(probe.costs, analytic.costs, ops))
    return [Cell.from_runs(layout, rate, spec, out["ranks"]) for spec in specs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, choices=MODELS,
                    help=f"results of another model go under {OUT.relative_to(ROOT)}/MODEL/")
    ap.add_argument("--rates", nargs="+", default=list(RATES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--budgets", type=int, default=BUDGETS)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="TP=2 at 100mbit, 3 budgets, 2 rounds")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--replace", action="store_true",
                    help="rerun only the --layouts/--rates given and keep results.json's other "
                         "(layout, rate) pairs (e.g. after a disturbed pass); recorded in meta")
    args = ap.parse_args(argv)
    if args.quick:
        args.layouts, args.rates, args.budgets, args.rounds = ["TP=2"], ["100mbit"], 3, 2
    out = out_dir(args.model)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        data = json.loads((out / "results.json").read_text())
        render(data, out, ROOT / "BENCHMARKS.md", update_md=not data["meta"]["quick"])
        return
    log = out / "run.log"
    log.write_text("")
    start, cells = time.time(), []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    for layout in args.layouts:
        for rate in args.rates:
            print(f"[{time.time() - start:6.0f}s] {layout} @ {rate}", flush=True)
            cells += measure(layout, rate, args, log)
            # Saved after every (layout, rate): an hour of measurements survives a late failure.
            data = _results(args, commit, start, cells, partial=True)
            write_json_atomic(out / "results.partial.json", data)
    data = _results(args, commit, start, cells, partial=False)
    if args.replace:
        data = _merge(json.loads((out / "results.json").read_text()), data)
    write_json_atomic(out / "results.json", data)
    (out / "results.partial.json").unlink(missing_ok=True)
    render(data, out, ROOT / "BENCHMARKS.md", update_md=not args.quick)


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with the (layout, rate) pairs `new` measured replaced by `new`'s cells, in `old`'s
    order; meta keeps `old`'s run and lists the reruns."""
    rerun = {(c["layout"], c["rate"]) for c in new["cells"]}
    pairs = list(dict.fromkeys((c["layout"], c["rate"]) for c in old["cells"] + new["cells"]))
    cells = [c for pair in pairs for c in (new["cells"] if pair in rerun else old["cells"])
             if (c["layout"], c["rate"]) == pair]
    runs = old["meta"].get("reruns", []) + [{
        "pairs": sorted(f"{layout} @ {rate}" for layout, rate in rerun),
        **{k: new["meta"][k] for k in ("commit", "date", "wall_s", "rounds", "steps")}}]
    return {"meta": {**old["meta"], "reruns": runs}, "cells": cells}


def _results(args: argparse.Namespace, commit: str, start: float, cells: list[Cell],
             partial: bool) -> dict[str, Any]:
    meta = {"commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_s": time.time() - start, "model": args.model, "layouts": LAYOUTS,
            "rates": list(args.rates), "budgets": args.budgets, "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "quick": args.quick,
            "policies": list(POLICIES), "partial": partial}
    return {"meta": meta, "cells": [to_dict(c) for c in cells]}


if __name__ == "__main__":
    main()
