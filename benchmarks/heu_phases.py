"""Where lynx-heu's planning time goes on one paper-scale row: wall time per phase (simulations,
building their pipeline orders, count programmes, refinement, partition), median of --repeats
runs, each on a fresh cost table as `benchmarks/paper_scale.py` times it.

    python benchmarks/heu_phases.py ascend-910b gpt-22b explicit 0.15

Phases nest (a tightening loop contains its simulations), so they do not sum to the total.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

from paper_scale import LAYOUTS, budget_rule

import lynxpipe.plan.countdp as countdp
import lynxpipe.plan.finalize as finalize
import lynxpipe.plan.heu as heu
from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import get_cluster, get_model

PHASES = ((finalize, "simulate", "simulations"), (finalize, "build_order", "pipeline orders"),
          (countdp, "best_counts", "count programmes"), (heu, "refine", "refinement"),
          (heu, "choose_partition", "balanced partition"),
          (heu, "tighten_loop", "window-aware loops (nest simulations)"),
          (heu, "checkmate_run", "checkmate candidates (nest simulations)"))


def _timed(module: Any, name: str, label: str, spent: dict, calls: dict) -> None:
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            calls[label] += 1
    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cluster")
    ap.add_argument("model", choices=[lay.model for lay in LAYOUTS])
    ap.add_argument("attention", choices=["fused", "explicit"])
    ap.add_argument("fraction", type=float)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lay = next(lay for lay in LAYOUTS if lay.model == args.model)
    model, clus, par = (replace(get_model(lay.model), attention=args.attention),
                        get_cluster(args.cluster), lay.spec())
    probe = PlanRequest(model=model, cluster=clus, parallel=par,
                        budget_bytes=clus.device_memory_bytes,
                        costs=analytic_costs(model, clus, par))
    budget = budget_rule(make("none", probe), args.fraction, clus.device_memory_bytes)
    runs = []
    for _ in range(args.repeats):
        spent: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for module, name, label in PHASES:
            _timed(module, name, label, spent, calls)
        req = replace(probe, budget_bytes=budget["budget_bytes"],
                      costs=analytic_costs(model, clus, par))
        start = time.perf_counter()
        plan = make("lynx-heu", req)
        runs.append((time.perf_counter() - start, dict(spent), dict(calls), plan.chosen_from))
        for module, name, _ in PHASES:  # unwrap for the next run
            setattr(module, name, getattr(module, name).__wrapped__)
    total, spent, calls, chosen = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(f"lynx-heu {1e3 * total:,.1f} ms (median of {args.repeats}; chosen from {chosen}); "
          f"all runs {', '.join(f'{1e3 * r[0]:,.0f}' for r in runs)} ms")
    for label, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42s} {1e3 * sec:8.1f} ms  x{calls[label]}")


if __name__ == "__main__":
    main()
