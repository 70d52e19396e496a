"""How much of the on-demand overhead could any window hide? For every forcing cell of the
emulated sweep (measured checkmate >= 5% slower than measured none), re-plan checkmate from the
profile the sweep measured and split its predicted overhead over `none`:

- *full layers*: layers on Megatron `full` recompute (the leanest option). They replay the
  layer's forward collectives, so they run on demand for every policy: no window holds them;
- *segment recompute*: every other recompute task, which a window may hide.

The *ceiling* is the segment part's share of the overhead: checkmate's plan with its full layers
kept and everything else kept whole (no recompute) costs that much less. It is what a plan with
checkmate's full layers could at most recover; a plan with fewer full layers would need the
bytes they free, and at a forcing budget the budget is what binds. Beside it, lynx-opt's
predicted share: the exact MILP over keep sets and windows, the best plan the planner can
express. Pure planning from the stored profiles: no ranks, no root.

    python benchmarks/emulated_share_bound.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from typing import Any

import emulated_overlap as eo
from bench_md import replace_section
from emulated_overlap_report import Cell, forcing_points, with_none

from lynxpipe.artifact import from_dict, write_json_atomic
from lynxpipe.plan.finalize import build_order
from lynxpipe.plan.options import layer_options, option_for
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.schedule.policy import FULL, KEEP_ALL
from lynxpipe.sim.engine import simulate


def split(probe: PlanRequest, budget: int) -> dict[str, Any]:
    """checkmate's plan at `budget`: its full layers, and its step with only them recomputed."""
    req = replace(probe, budget_bytes=budget)
    plan = make("checkmate", req)
    full_only = tuple(p if p.full else KEEP_ALL for p in plan.layers)
    order = build_order(req, plan.partition, full_only)
    step = simulate(req.costs, plan.partition, full_only, order).step_time_ms
    return {"checkmate_ms": plan.predicted.step_time_ms, "full_only_ms": step,
            "full_layers": sum(p.full for p in plan.layers)}


def per_layer(probe: PlanRequest) -> dict[str, float]:
    """Recompute ms per layer and micro-batch: `full`, and the leanest segment option."""
    cost = probe.costs.layer
    lean = min(layer_options(cost, with_full=False), key=lambda o: o.kept_bytes)
    full = option_for(cost, FULL)
    return {"full_ms": full.total_ms, "full_kept_bytes": full.kept_bytes,
            "segments_ms": lean.total_ms, "segments_kept_bytes": lean.kept_bytes,
            "forward_collectives_ms": cost.fwd_coll_ms()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=eo.MODEL, choices=eo.MODELS)
    model = ap.parse_args().model
    data = json.loads((eo.out_dir(model) / "results.json").read_text())
    cells = with_none([from_dict(Cell, c) for c in data["cells"]])
    none = {(c.layout, c.rate): c.predicted_ms for c in cells if c.policy == "none" and c.fits}
    rows, layers = [], {}
    for point in forcing_points(cells):
        layout, rate, budget = point["layout"], point["rate"], point["budget_bytes"]
        probe, _ = eo.requests(eo.profile_path(layout, rate, model), eo.LAYOUTS[layout], model)
        layers.setdefault(f"{layout} @ {rate}", per_layer(probe))
        row = {"layout": layout, "rate": rate, "budget_bytes": budget,
               "none_ms": none[(layout, rate)], **split(probe, budget)}
        over = row["checkmate_ms"] - row["none_ms"]
        row["ceiling"] = (row["checkmate_ms"] - row["full_only_ms"]) / over if over > 0 else None
        row["opt_share"], row["heu_share"] = point["opt_predicted_share"], point["predicted_share"]
        rows.append(row)
    out = eo.out_dir(model) / "share_bound"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"sweep_commit": data["meta"]["commit"],
                                             "per_layer": layers, "cells": rows})
    text = render(rows, layers)
    (out / "results.md").write_text(text)
    default = model == eo.MODEL
    replace_section(eo.ROOT / "BENCHMARKS.md", "emulated_share_bound" + (
                    "" if default else f"_{model}"),
                    "Emulated sweep: how much of the on-demand overhead a window could hide"
                    + ("" if default else f", `{model}`"),
                    f"Rerun: `python benchmarks/emulated_share_bound.py"
                    f"{'' if default else ' --model ' + model}` (pure planning from the "
                    f"sweep's stored profiles; sweep at `{data['meta']['commit']}`). Predicted "
                    f"figures; the split is explained in the script's docstring.\n\n{text}")
    print(text)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def render(rows: list[dict[str, Any]], layers: dict[str, dict[str, float]]) -> str:
    out = ["| layout @ link | full: ms / kept KiB | leanest segment option: ms / kept KiB "
           "| forward collectives ms |", "|:--|--:|--:|--:|"]
    for key, v in layers.items():
        out.append(f"| {key} | {v['full_ms']:.1f} / {v['full_kept_bytes'] / 1024:,.0f} | "
                   f"{v['segments_ms']:.1f} / {v['segments_kept_bytes'] / 1024:,.0f} | "
                   f"{v['forward_collectives_ms']:.1f} |")
    out += ["", "| cell | checkmate vs none (pred.) | full layers | ceiling | lynx-opt share "
            "(pred.) | lynx-heu share (pred.) |", "|:--|--:|--:|--:|--:|--:|"]
    for r in rows:
        out.append(f"| {r['layout']} {r['rate']} {r['budget_bytes'] / 2**20:.1f} MiB | "
                   f"{r['checkmate_ms'] / r['none_ms'] - 1:+.1%} | {r['full_layers']} | "
                   f"{_num(r['ceiling'])} | {_num(r['opt_share'])} | {_num(r['heu_share'])} |")
    slow = [r for r in rows if r["rate"] != "1gbit"]
    for label, group in (("100 and 200 Mbit", slow),
                         ("1 Gbit", [r for r in rows if r["rate"] == "1gbit"])):
        vals = {k: [r[k] for r in group if r[k] is not None]
                for k in ("ceiling", "opt_share", "heu_share")}
        if group:
            out.append(f"\n{label}, {len(group)} forcing cells: median ceiling "
                       f"{_num(_median(vals['ceiling']))}, lynx-opt "
                       f"{_num(_median(vals['opt_share']))}, lynx-heu "
                       f"{_num(_median(vals['heu_share']))} (predicted shares); cells with a "
                       f"full layer: {sum(r['full_layers'] > 0 for r in group)}/{len(group)}.")
    return "\n".join(out) + "\n"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


if __name__ == "__main__":
    main()
