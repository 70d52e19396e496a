"""lynx-heu's planning time on the 90 paper-scale rows, for comparing two commits side by side.

`benchmarks/paper_scale.py` times lynx-heu once per run, and this machine's speed drifts by
tens of percent between runs minutes apart, so a speed-up is only measured by alternating two
commits in one session. This plans lynx-heu alone on every paper-scale row (fresh cost table
per call, as a user's `plan` sees it), median of --repeats CPU times per row, and checks each
plan's predicted step time and peaks against the stored paper-scale results (a faster planner
must plan the same). Only public APIs, so the same file measures an older commit:

    python benchmarks/heu_speed.py --out /tmp/new
    git worktree add /tmp/old OLD && PYTHONPATH=/tmp/old/src python benchmarks/heu_speed.py --out /tmp/old-r

Writes results.json and results.md under --out (default benchmarks/results/heu_speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from paper_scale import CLUSTERS, FRACTIONS, LAYOUTS, budget_rule

import lynxpipe
from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import get_cluster, get_model

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "benchmarks" / "results" / "paper_scale" / "results.json"


def _row(cluster: str, model: str, attention: str, fraction: float, repeats: int,
         stored: dict) -> dict:
    lay = next(lay for lay in LAYOUTS if lay.model == model)
    spec, clus, par = replace(get_model(model), attention=attention), get_cluster(cluster), \
        lay.spec()
    probe = PlanRequest(model=spec, cluster=clus, parallel=par,
                        budget_bytes=clus.device_memory_bytes,
                        costs=analytic_costs(spec, clus, par))
    budget = budget_rule(make("none", probe), fraction, clus.device_memory_bytes)["budget_bytes"]
    cpu_ms = []
    for _ in range(repeats):
        req = replace(probe, budget_bytes=budget, costs=analytic_costs(spec, clus, par))
        start = time.process_time()
        plan = make("lynx-heu", req)
        cpu_ms.append(1e3 * (time.process_time() - start))
    ref = stored.get((cluster, model, attention, fraction))
    same = ref is not None and abs(ref["step_time_ms"] - plan.predicted.step_time_ms) < 1e-6 \
        and list(ref["peak_memory_bytes"]) == list(plan.predicted.peak_memory_bytes)
    return {"cluster": cluster, "model": model, "attention": attention, "fraction": fraction,
            "cpu_ms": cpu_ms, "median_cpu_ms": statistics.median(cpu_ms),
            "step_time_ms": plan.predicted.step_time_ms, "same_plan_as_stored": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heu_speed")
    args = ap.parse_args()
    stored = {}
    if STORED.exists():
        for r in json.loads(STORED.read_text())["rows"]:
            stored[(r["cluster"], r["layout"]["model"], r["attention"],
                    r["budget"]["fraction"])] = r["policies"]["lynx-heu"]
    rows, start = [], time.perf_counter()
    for cluster in CLUSTERS:
        for lay in LAYOUTS:
            for attention in ("fused", "explicit"):
                for fraction in FRACTIONS:
                    rows.append(_row(cluster, lay.model, attention, fraction, args.repeats,
                                     stored))
                    print(f"[{len(rows)}/90] {cluster} {lay.model} {attention} @ "
                          f"{fraction:.0%}: {rows[-1]['median_cpu_ms']:,.0f} ms", flush=True)
    src = Path(lynxpipe.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, text=True,
                            capture_output=True, check=False).stdout.strip() or "unknown"
    times = [r["median_cpu_ms"] for r in rows]
    summary = {"commit": commit, "repeats": args.repeats, "wall_s": time.perf_counter() - start,
               "median_ms": statistics.median(times), "max_ms": max(times),
               "rows_under_200ms": sum(t < 200 for t in times),
               "same_plans": sum(r["same_plan_as_stored"] for r in rows), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "results.md").write_text(
        f"Commit `{commit}`, lynx-heu CPU time per row (median of {args.repeats}).\n\n"
        f"| median over rows | slowest row | rows < 200 ms | plans as stored |\n"
        f"|--:|--:|--:|--:|\n| {summary['median_ms']:,.1f} ms | {summary['max_ms']:,.0f} ms | "
        f"{summary['rows_under_200ms']}/{len(rows)} | {summary['same_plans']}/{len(rows)} |\n")
    print(f"median {summary['median_ms']:,.1f} ms, slowest {summary['max_ms']:,.0f} ms, "
          f"{summary['rows_under_200ms']}/{len(rows)} under 200 ms, "
          f"{summary['same_plans']}/{len(rows)} plans as stored (commit {commit}); wrote {args.out}")


if __name__ == "__main__":
    main()
