"""Paper-scale benchmark, by simulation (SPEC §9, first bullet).

GPT 1.3B-22B, sequence 2048, 8-32 devices on a100-nvlink, a100-pcie and ascend-910b with
Megatron-typical TP/PP layouts, under budgets that force recomputation. Every registered policy
plans every row; step times, speedups over `full`, the HEU/OPT gap and planning times go to
results.json, results.md, speedup.png and the "Paper-scale (simulated)" section of BENCHMARKS.md.

    python benchmarks/paper_scale.py                 # full run
    python benchmarks/paper_scale.py --quick         # smoke run: 2 rows, leaves BENCHMARKS.md
    python benchmarks/paper_scale.py --render-only   # re-render from results.json

Budget rule (never looks at lynx's numbers): static bytes of the fullest rank under `none` +
FRACTION x that rank's `none` activation peak, capped at the device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from paper_scale_report import (
    CLUSTERS,
    GAP_TOL,
    ON_DEMAND,
    POLICIES,
    Row,
    pct,
    plot_speedup,
    report,
    row_label,
    update_benchmarks_md,
)

from lynxpipe.artifact import write_json_atomic
from lynxpipe.cost.table import CostTable, analytic_costs, overlapped_collective
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.report.console import stdout_console
from lynxpipe.report.summary import recompute_counts
from lynxpipe.report.tables import plan_json_summary
from lynxpipe.schedule.policy import KEEP_ALL
from lynxpipe.sim.program import compile_program
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "paper_scale"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
FRACTIONS = (0.5, 0.15, 0.05)
ATTENTION = ("fused", "explicit")
HEU_REPEATS = 5


@dataclass(frozen=True)
class Layout:
    """A Megatron-typical layout for one model (seq 2048, 1F1B, no SP)."""

    model: str
    tp: int
    pp: int
    dp: int
    micro_batch: int
    microbatches: int

    def spec(self) -> ParallelSpec:
        return ParallelSpec(tp=self.tp, pp=self.pp, dp=self.dp, micro_batch_size=self.micro_batch,
                            num_microbatches=self.microbatches, seq_len=2048)


LAYOUTS = (
    Layout("gpt-1.3b", 2, 2, 2, 2, 8),   # 8 devices
    Layout("gpt-2.7b", 2, 4, 1, 2, 16),  # 8 devices
    Layout("gpt-6.7b", 4, 2, 2, 1, 8),   # 16 devices
    Layout("gpt-13b", 4, 4, 1, 1, 16),   # 16 devices
    Layout("gpt-22b", 8, 4, 1, 1, 16),   # 32 devices
)
QUICK = (("a100-pcie", "gpt-1.3b"), ("a100-nvlink", "gpt-22b"))


# -- running ------------------------------------------------------------------------------------
def budget_rule(none: Plan, fraction: float, device_bytes: int) -> dict[str, Any]:
    """static + fraction x `none` activations of the fullest rank, capped at device memory."""
    pred = none.predicted
    rank = max(range(len(pred.ranks)), key=lambda r: pred.peak_memory_bytes[r])
    static, act = pred.ranks[rank].static_bytes, pred.ranks[rank].peak_activation_bytes
    wanted = static + int(fraction * act)
    return {"fraction": fraction, "fullest_rank": rank, "static_bytes": static,
            "none_activation_bytes": act, "budget_bytes": min(wanted, device_bytes),
            "capped_at_device_memory": wanted > device_bytes}


def layer_windows(costs: CostTable) -> dict[str, float]:
    """Per layer and micro-batch: forward time, forward TP waits, backward all-reduce remainder
    left after the weight-gradient GEMM overlap (the windows lynx can fill)."""
    prog = compile_program(costs.layer, KEEP_ALL)
    return {"layer_fwd_ms": costs.layer.fwd_ms(),
            "fwd_tp_wait_ms": sum(s.coll_ms for s in prog.fwd if s.coll_ms >= 0),
            "bwd_remainder_ms": sum(overlapped_collective(s.overlap_ms, s.coll_ms,
                                                          costs.contention)[1]
                                    for s in prog.bwd if s.coll_ms >= 0)}


def policy_record(plan: Plan, req: PlanRequest) -> dict[str, Any]:
    """plan_json_summary + R tasks per window kind + whether the planner ran out of time."""
    rec = plan_json_summary(plan)
    rec["recompute_tasks_by_window"] = [dict(c) for c in recompute_counts(plan)]
    rec["hit_time_limit"] = bool((plan.mip_gap or 0.0) > GAP_TOL
                                 or plan.planner_ms >= 1e3 * req.time_limit_s)
    return rec


def derive(pol: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speedups over full, best fitting on-demand baseline, HEU/OPT gap, overlap share, and the
    rank where lynx-heu leaves most recompute exposed."""
    ms = {name: rec["step_time_ms"] for name, rec in pol.items()}
    best = min((n for n in ON_DEMAND if n in pol and pol[n]["fits_budget"]),
               key=lambda n: ms[n], default=None)
    heu, none = ms["lynx-heu"], ms["none"]
    ranks = pol["lynx-heu"]["ranks"]
    rank = max(range(len(ranks)), key=lambda r: ranks[r]["recompute_exposed_ms"])
    worst: dict[str, Any] = {"rank": rank, "none_tp_wait_ms": pol["none"]["ranks"][rank][
        "comm_exposed_ms"], "none_idle_ms": pol["none"]["ranks"][rank]["idle_ms"]}
    for name in ("lynx-heu", "lynx-opt"):
        if name in pol:
            stats = pol[name]["ranks"][rank]
            worst[name] = {"hidden_ms": stats["recompute_hidden_ms"],
                           "exposed_ms": stats["recompute_exposed_ms"],
                           "tasks_by_window": pol[name]["recompute_tasks_by_window"][rank]}
    return {
        "speedup_over_full": {n: ms["full"] / t for n, t in ms.items()},
        "best_on_demand": best,
        "heu_over_best_on_demand": ms[best] / heu if best else None,
        "heu_over_none": heu / none - 1.0,
        "best_on_demand_over_none": ms[best] / none - 1.0 if best else None,
        "overlap_share": (1.0 - (heu - none) / (ms[best] - none)
                          if best and ms[best] > none else None),
        "heu_opt_gap": heu / ms["lynx-opt"] - 1.0 if "lynx-opt" in ms else None,
        "heu_worst_rank": worst,
    }


def run_row(cluster: str, layout: Layout, attention: str, fraction: float, opt_limit: float,
            repeats: int) -> Row:
    """Plan every registered policy for one (cluster, layout, attention, budget fraction)."""
    model = replace(get_model(layout.model), attention=attention)
    clus, par = get_cluster(cluster), layout.spec()
    costs = analytic_costs(model, clus, par)
    probe = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=clus.device_memory_bytes, costs=costs)
    rule = budget_rule(make("none", probe), fraction, clus.device_memory_bytes)
    req = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=rule["budget_bytes"], costs=costs, time_limit_s=opt_limit)
    pol = {name: policy_record(make(name, req, strict=False), req)
           for name in POLICIES if name in PLANNERS}
    wall, cpu = [], []
    for _ in range(repeats):  # lynx-heu again, timed from outside the planner
        # on a fresh cost table, as a user's `plan` call sees it: nothing derived from the
        # cost model (options, compiled programs) is carried over from earlier runs
        fresh = replace(req, costs=analytic_costs(model, clus, par))
        start, start_cpu = time.perf_counter(), time.process_time()
        make("lynx-heu", fresh)
        wall.append(1e3 * (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu))
    return {"cluster": cluster, "layout": asdict(layout), "attention": attention,
            "devices": par.devices,
            "budget": rule, "windows_per_layer": layer_windows(costs), "policies": pol,
            "heu_repeat_ms": wall, "heu_median_ms": statistics.median(wall),
            "heu_median_cpu_ms": statistics.median(cpu), "derived": derive(pol)}


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return (git("rev-parse", "--short", "HEAD").strip() or "unknown") + ("+dirty" if dirty else "")


def run_all(args: argparse.Namespace, console: Any) -> tuple[list[Row], dict[str, Any]]:
    """Plan every row, one progress line each; returns the rows and the run's metadata."""
    fracs = ([float(x) for x in args.fractions.split(",")] if args.fractions
             else [FRACTIONS[0]] if args.quick else list(FRACTIONS))
    combos = [(c, lay, att) for att in ATTENTION for c in CLUSTERS for lay in LAYOUTS
              if not args.quick or (c, lay.model) in QUICK]
    names = [n for n in POLICIES if n in PLANNERS]
    console.print(f"policies: {', '.join(names)}"
                  + ("" if "lynx-opt" in PLANNERS else "  [yellow](lynx-opt not registered)"))
    load, start, rows = os.getloadavg()[0], time.perf_counter(), []
    for frac in fracs:
        for cluster, lay, att in combos:
            rows.append(run_row(cluster, lay, att, frac, args.opt_time_limit,
                                2 if args.quick else HEU_REPEATS))
            d = rows[-1]["derived"]
            console.print(
                f"[{len(rows)}/{len(fracs) * len(combos)}] {row_label(rows[-1])}: lynx-heu "
                f"{d['speedup_over_full']['lynx-heu']:.2f}× full, "
                f"{d['heu_over_best_on_demand'] or 0:.3f}× {d['best_on_demand']}, HEU/OPT−1 "
                f"{pct(d['heu_opt_gap'])}, plans in {rows[-1]['heu_median_ms']:,.0f} ms "
                f"[dim]({time.perf_counter() - start:,.0f} s)", highlight=False)
    meta = {"commit": _git_commit(), "wall_s": time.perf_counter() - start,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "load_before": load, "load_after": os.getloadavg()[0],
            "opt_time_limit_s": args.opt_time_limit, "fractions": fracs, "policies": names,
            "heu_repeats": 2 if args.quick else HEU_REPEATS, "quick": args.quick,
            "layouts": [asdict(lay) for lay in LAYOUTS], "clusters": list(CLUSTERS),
            "attention": list(ATTENTION)}
    return rows, meta


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rows, 1 fraction: a smoke run")
    ap.add_argument("--opt-time-limit", type=float, default=20.0,
                    help="MILP time limit (lynx-opt, checkmate), seconds; default 20")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results/paper_scale[/quick])")
    ap.add_argument("--fractions", default=None, help="budget fractions, e.g. 0.5,0.3,0.15")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render results.md, speedup.png, BENCHMARKS.md from results.json")
    ap.add_argument("--no-benchmarks-md", action="store_true", help="leave BENCHMARKS.md alone")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = stdout_console()
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if args.render_only:
        data = json.loads((out / "results.json").read_text())
        rows, meta = data["rows"], data["meta"]
    else:
        rows, meta = run_all(args, console)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "results.json", {"meta": meta, "rows": rows})
    body = report(rows, meta)
    (out / "results.md").write_text(f"# Paper-scale benchmark (simulated)\n\n{body}")
    plot_speedup(rows, meta["policies"], out / "speedup.png")
    update_md = not (meta["quick"] or args.no_benchmarks_md)
    if update_md:
        update_benchmarks_md(BENCHMARKS_MD, body)
    console.print(f"wrote {out}/results.json, results.md, speedup.png"
                  + (f" and {BENCHMARKS_MD.name}" if update_md else "")
                  + f" (run took {meta['wall_s']:,.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
