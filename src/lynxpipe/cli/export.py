"""`lynxpipe export --plan plan.json --to megatron|torch|json`: a plan in what users already run
(SPEC §11; `lynxpipe.integrations`).

    lynxpipe export --plan plan.json --to megatron            # flags + the nearest plan's cost
    lynxpipe export --plan plan.json --profile profile.json --to torch --out sac.json
    lynxpipe export --plan plan.json --to json --out flat.json

A plan made from a profile (`--module` or `--measure`) needs that profile again: the plan names
its tensors, the profile knows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lynxpipe import workflow
from lynxpipe.cli.common import lynx_errors
from lynxpipe.cost.table import CostTable, analytic_costs, load_profile
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan, load_plan
from lynxpipe.report.console import stdout_console
from lynxpipe.units import format_bytes

TARGETS = ("megatron", "torch", "json")
DEFAULT_OUT = {"megatron": None, "torch": Path("sac.json"), "json": Path("flat.json")}


def plan_costs(plan: Plan, profile: Path | None) -> CostTable:
    """The costs a plan was made with: analytic from its specs, or the profile it needs."""
    if profile is None:
        if plan.cost_source != "analytic":
            raise LynxError(f"the plan was made from a {plan.cost_source} profile: give it "
                            f"again with --profile")
        return analytic_costs(plan.model, plan.cluster, plan.parallel)
    table = workflow.checked_load(load_profile, profile, "profile")
    workflow.model_for_profile(plan.model, plan.parallel, table, str(profile), ())
    if table.source != plan.cost_source:
        raise LynxError(f"{profile}: a {table.source} profile, but the plan was made from a "
                        f"{plan.cost_source} one")
    return table


def export_command(
    plan_file: Annotated[Path, typer.Option("--plan", dir_okay=False, help="plan.json.")],
    to: Annotated[str, typer.Option("--to", help="megatron, torch or json.")],
    profile: Annotated[Optional[Path], typer.Option(
        "--profile", dir_okay=False, help="The profile.json the plan was made from (needed "
                                          "unless the plan is analytic).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", dir_okay=False, help="Where to write (torch: sac.json, json: flat.json, "
                                      "megatron: a JSON of fields, flags and costs).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (megatron).")] = False,
) -> None:
    """Export a plan to Megatron-Core flags, a torch selective-checkpointing policy, or a flat
    JSON listing."""
    with lynx_errors():
        if to not in TARGETS:
            raise LynxError(f"--to {to!r} must be one of {', '.join(TARGETS)}")
        plan = workflow.checked_load(load_plan, plan_file, "plan")
        costs = plan_costs(plan, profile)
        out = out or DEFAULT_OUT[to]
        if to == "megatron":
            _megatron(plan, costs, out, json_out)
        elif to == "torch":
            _torch(plan, costs, out)
        else:
            from lynxpipe.integrations.flat import write_flat

            write_flat(out, plan, costs.layer.graph)
            typer.echo(f"wrote {out}: {len(plan.layers)} layers, "
                       f"{sum(1 for r in plan.order.ranks for a in r if a.kind == 'R')} tasks")


def _megatron(plan: Plan, costs: CostTable, out: Path | None, json_out: bool) -> None:
    from lynxpipe.integrations.megatron import export_megatron

    exp = export_megatron(plan, costs)
    rows = {"lynxpipe": exp.plan, "megatron": exp.nearest}
    payload = {"transformer_config": exp.config.fields(), "flags": exp.config.flags(),
               **{k: {"policy": p.policy, "step_time_ms": p.predicted.step_time_ms,
                      "peak_memory_bytes": list(p.predicted.peak_memory_bytes),
                      "fits_budget": p.predicted.fits_budget} for k, p in rows.items()},
               "budget_bytes": plan.budget_bytes, "settings_tried": exp.tried}
    if out is not None:
        out.write_text(json.dumps(payload, indent=1) + "\n")
    if json_out:
        typer.echo(json.dumps(payload, indent=1))
        return
    console = stdout_console()
    console.print(f"Megatron-Core TransformerConfig: {exp.config.fields()}", highlight=False)
    console.print("flags: " + " ".join(_quote(f) for f in exp.config.flags()), highlight=False)
    table = Table(title=f"nearest Megatron setting ({exp.config.label()}, of {exp.tried} tried) "
                        f"vs the lynxpipe plan, budget {format_bytes(plan.budget_bytes)}",
                  title_justify="left")
    for col in ("plan", "step ms", *[f"peak rank {r}" for r in range(plan.parallel.pp)], "fits"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for name, p in rows.items():
        table.add_row(f"{name} ({p.policy})" if name == "lynxpipe" else name,
                      f"{p.predicted.step_time_ms:.2f}",
                      *[format_bytes(b) for b in p.predicted.peak_memory_bytes],
                      "yes" if p.predicted.fits_budget else "no")
    console.print(table)
    if out is not None:
        console.print(f"wrote {out}", highlight=False)


def _quote(flag: str) -> str:
    return f'"{flag}"' if "|" in flag or "*" in flag else flag


def _torch(plan: Plan, costs: CostTable, out: Path) -> None:
    from lynxpipe.integrations.torch_export import save_torch_export, torch_export

    exp = torch_export(plan, costs.layer.graph, costs.block)
    save_torch_export(out, exp)
    modes: dict[str, list[int]] = {}
    for spec in exp.layers:
        modes.setdefault(spec.mode, []).append(spec.layer)
    typer.echo(f"wrote {out}: " + "; ".join(f"{m} layers {v}" for m, v in modes.items()))
    for spec in exp.layers:
        typer.echo(f"  layer {spec.layer}: {spec.mode}, caches {len(spec.save_ops)} ops, holds "
                   f"{format_bytes(spec.saved_bytes)} per micro-batch")
    typer.echo(f"use: lynxpipe.integrations.torch_sac.wrap('{out}', blocks) or "
               f"policy('{out}', layer, block)")
