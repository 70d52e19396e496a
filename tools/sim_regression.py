"""Refactoring guard: plans and simulations of the paper-scale rows, bit for bit.

    python tools/sim_regression.py record OUT.json      # before a change
    python tools/sim_regression.py check OUT.json       # after it: same plans, same numbers

`record` plans every paper-scale row (5 GPT sizes x 3 clusters x 2 budget fractions) with every
policy and stores each plan's partition, per-layer policies, every action of its order (raw
fields) and the simulator's numbers as `repr` strings. `check` does two things per stored plan:
re-simulates the stored order with the current simulator (same numbers?) and re-plans the row
(same plan, same numbers?). lynx-opt is left out where its MILP hit the time limit (its plan then
depends on the machine's speed). Exit status 1 on any difference, with the first few named.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.sim.engine import simulate
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

try:  # the action IR's home before and after the layering change
    from lynxpipe.schedule.policy import LayerPolicy
except ImportError:
    from lynxpipe.schedule.policy import LayerPolicy  # type: ignore[no-redef]
from lynxpipe.schedule.actions import Action, PipelineOrder, Window

LAYOUTS = (("gpt-1.3b", 2, 2, 2, 2, 8), ("gpt-2.7b", 2, 4, 1, 2, 16), ("gpt-6.7b", 4, 2, 2, 1, 8),
           ("gpt-13b", 4, 4, 1, 1, 16), ("gpt-22b", 8, 4, 1, 1, 16))
CLUSTERS = ("a100-nvlink", "a100-pcie", "ascend-910b")
FRACTIONS = (0.5, 0.15)
OPT_LIMIT_S = 20.0


def requests() -> list[tuple[str, PlanRequest]]:
    """Every paper-scale row, with the paper-scale budget rule."""
    out = []
    for frac in FRACTIONS:
        for cluster in CLUSTERS:
            for name, tp, pp, dp, mbs, m in LAYOUTS:
                model, clus = get_model(name), get_cluster(cluster)
                par = ParallelSpec(tp=tp, pp=pp, dp=dp, micro_batch_size=mbs,
                                   num_microbatches=m, seq_len=2048)
                costs = analytic_costs(model, clus, par)
                probe = PlanRequest(model=model, cluster=clus, parallel=par,
                                    budget_bytes=clus.device_memory_bytes, costs=costs)
                pred = make("none", probe).predicted
                rank = max(range(len(pred.ranks)), key=lambda r: pred.peak_memory_bytes[r])
                budget = min(pred.ranks[rank].static_bytes
                             + int(frac * pred.ranks[rank].peak_activation_bytes),
                             clus.device_memory_bytes)
                req = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=budget,
                                  costs=costs, time_limit_s=OPT_LIMIT_S)
                out.append((f"{cluster}/{name}@{frac}", req))
    return out


def _action(a: Action) -> list[Any]:
    w = a.window
    win = None if w is None else [w.kind, w.mb, w.stage, w.layer, w.step, w.recv]
    return [a.kind, a.mb, a.stage, a.layer, a.segment, win]


def _rank_numbers(sim: Any) -> str:
    import dataclasses

    return repr([dataclasses.astuple(r) for r in sim.ranks])


def record_plan(plan: Any, req: PlanRequest) -> dict[str, Any]:
    """The stored form of one plan and its simulation."""
    sim = simulate(req.costs, plan.partition, plan.layers, plan.order)
    return {"partition": list(plan.partition),
            "layers": [[sorted(p.dropped), p.full] for p in plan.layers],
            "order": [[_action(a) for a in r] for r in plan.order.ranks],
            "order_meta": [plan.order.schedule, plan.order.pp, plan.order.virtual_stages,
                           plan.order.num_microbatches],
            "step": repr(sim.step_time_ms), "ranks": _rank_numbers(sim),
            "windows": repr([(u.rank, u.start_ms, u.wait_ms, u.used_ms) for u in sim.windows]),
            "timeline": repr(sim.memory_timeline),
            "opt_limited": bool((plan.mip_gap or 0) > 1e-4 or plan.planner_ms >= 1e3 * OPT_LIMIT_S)}


def _rebuild(stored: dict[str, Any]) -> tuple[tuple[int, ...], tuple[Any, ...], PipelineOrder]:
    layers = tuple(LayerPolicy(frozenset(d), f) for d, f in stored["layers"])
    ranks = tuple(tuple(Action(k, mb, st, layer, seg, None if w is None else Window(*w))
                        for k, mb, st, layer, seg, w in r) for r in stored["order"])
    sched, pp, v, m = stored["order_meta"]
    return tuple(stored["partition"]), layers, PipelineOrder(sched, pp, v, m, ranks)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    mode, path = argv[0], Path(argv[1])
    stored = json.loads(path.read_text()) if mode == "check" else {}
    out: dict[str, Any] = {}
    diffs: list[str] = []
    for label, req in requests():
        for name in PLANNERS:
            key = f"{label}/{name}"
            plan = make(name, req)
            rec = record_plan(plan, req)
            out[key] = rec
            if mode == "check":
                old = stored.get(key)
                if old is None:
                    diffs.append(f"{key}: not recorded")
                    continue
                partition, layers, order = _rebuild(old)
                sim = simulate(req.costs, partition, layers, order)
                if (repr(sim.step_time_ms), _rank_numbers(sim), repr(sim.memory_timeline)) != \
                        (old["step"], old["ranks"], old["timeline"]):
                    diffs.append(f"{key}: re-simulated stored plan differs")
                if old["opt_limited"] or rec["opt_limited"]:
                    continue
                for field in ("partition", "layers", "order", "step", "ranks", "windows",
                              "timeline"):
                    if rec[field] != old[field]:
                        diffs.append(f"{key}: re-planned {field} differs")
                        break
        print(f"{label}: done ({len(diffs)} differences so far)", flush=True)
    if mode == "record":
        path.write_text(json.dumps(out))
        print(f"recorded {len(out)} plans in {path}")
        return 0
    print(f"checked {len(out)} plans: {len(diffs)} differences")
    for d in diffs[:20]:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
