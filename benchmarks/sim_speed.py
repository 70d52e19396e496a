"""Simulator speed: median wall time of one `simulate()` call on gpt-22b plans.

Planners call the simulator ~30 times per plan, so its speed bounds theirs. This plans gpt-22b
(tp 8, pp 4, 16 micro-batches, seq 2048) on a100-nvlink and a100-pcie at the paper-scale 15%
budget with none / full / selective / checkmate / lynx-heu, then times `simulate()` on each
plan (median of --repeats calls, after one warm-up call). It uses only public APIs, so the same
file measures an older commit side by side:

    python benchmarks/sim_speed.py                       # this checkout
    git worktree add /tmp/old OLD && PYTHONPATH=/tmp/old/src python benchmarks/sim_speed.py

Writes benchmarks/results/sim_speed/{results.json,results.md} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import lynxpipe
from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.sim.engine import simulate
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("none", "full", "selective", "checkmate", "lynx-heu")


def _request(cluster: str) -> PlanRequest:
    """gpt-22b at static + 15% of `none`'s activations on its fullest rank (paper-scale rule)."""
    model, clus = get_model("gpt-22b"), get_cluster(cluster)
    par = ParallelSpec(tp=8, pp=4, num_microbatches=16, seq_len=2048)
    costs = analytic_costs(model, clus, par)
    none = make("none", PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=clus.device_memory_bytes, costs=costs))
    rank = max(range(par.pp), key=lambda r: none.predicted.peak_memory_bytes[r])
    stats = none.predicted.ranks[rank]
    budget = stats.static_bytes + int(0.15 * stats.peak_activation_bytes)
    return PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=budget, costs=costs)


def _median_ms(req: PlanRequest, policy: str, repeats: int) -> float:
    plan = make(policy, req)
    args = (req.costs, plan.partition, plan.layers, plan.order)
    simulate(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        simulate(*args)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sim_speed")
    args = ap.parse_args()
    rows = []
    for cluster in ("a100-nvlink", "a100-pcie"):
        req = _request(cluster)
        for policy in POLICIES:
            rows.append({"cluster": cluster, "policy": policy,
                         "simulate_ms": _median_ms(req, policy, args.repeats)})
            print(f"{cluster:12s} {policy:10s} {rows[-1]['simulate_ms']:7.2f} ms", flush=True)
    src = Path(lynxpipe.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, text=True,
                            capture_output=True, check=False).stdout.strip() or "unknown"
    median = statistics.median(r["simulate_ms"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"commit": commit, "repeats": args.repeats, "median_ms": median, "rows": rows}, indent=1))
    table = ["| cluster | policy | simulate() ms (median) |", "|:--|:--|--:|"]
    table += [f"| {r['cluster']} | {r['policy']} | {r['simulate_ms']:.2f} |" for r in rows]
    (args.out / "results.md").write_text(
        f"Commit `{commit}`, median of {args.repeats} calls per plan.\n\n" + "\n".join(table)
        + f"\n\nMedian over plans: {median:.2f} ms\n")
    print(f"median over plans: {median:.2f} ms (commit {commit}); wrote {args.out}")


if __name__ == "__main__":
    main()
