"""`lynxpipe simulate | compare | plan`: plan one or every policy, simulate, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lynxpipe import workflow
from lynxpipe.cli.common import (
    JsonFlag,
    OutDir,
    PolicyOpt,
    SpecArgs,
    build_request,
    load_plan_flags,
    policy_names,
    spec_command,
)
from lynxpipe.errors import LynxError
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import Plan, save_plan
from lynxpipe.report.console import planning_progress, print_comparison
from lynxpipe.report.summary import plan_summary_text
from lynxpipe.report.tables import plan_json_summary, spec_header
from lynxpipe.units import format_size

PlanIn = Annotated[Optional[Path], typer.Option(
    "--plan", dir_okay=False,
    help="Re-simulate this plan.json (its own specs; spec flags given with it must agree).")]
PoliciesOpt = Annotated[Optional[str], typer.Option(
    "--policies", help="Comma-separated policies (default: every registered one).")]
CompareIn = Annotated[Optional[Path], typer.Option(
    "--plan", dir_okay=False, help="Compare this plan.json with every policy on its own specs.")]
WideFlag = Annotated[bool, typer.Option(
    "--wide", help="Every column (about 200 wide) instead of the 100-column table.")]
PlanOut = Annotated[Path, typer.Option("--out", dir_okay=False, help="Where to write the plan.")]


def _wrote(paths: list[Path], json_out: bool) -> None:
    if paths:
        typer.echo(f"wrote {len(paths)} files under {paths[0].parent}", err=json_out)


@spec_command
def simulate(ctx: typer.Context, spec: SpecArgs, policy: PolicyOpt = None,
             plan_file: PlanIn = None, out: OutDir = None, json_out: JsonFlag = False) -> None:
    """Plan one policy (or load --plan) and simulate one training step."""
    if policy is not None and plan_file is not None:
        raise LynxError("give either --policy or --plan, not both")
    if plan_file is not None:
        plan, costs = load_plan_flags(ctx, spec, plan_file)
        plan, sim = workflow.resimulate(plan, costs)
    else:
        req = build_request(spec)
        plan, costs = workflow.plan_policy(policy or workflow.DEFAULT_POLICY, req), req.costs
        workflow.require_feasible([plan], req)
        sim = workflow.resimulate(plan, costs)[1] if out else None
    if json_out:
        typer.echo(json.dumps(plan_json_summary(plan), indent=1))
    else:
        typer.echo(plan_summary_text(plan))
    if out is not None and sim is not None:
        from lynxpipe.report.files import write_simulation

        _wrote(write_simulation(out, plan, sim, costs.label(plan.cluster.name)), json_out)


@spec_command
def compare(ctx: typer.Context, spec: SpecArgs, policies: PoliciesOpt = None,
            plan_file: CompareIn = None, out: OutDir = None, wide: WideFlag = False,
            json_out: JsonFlag = False) -> None:
    """Plan and simulate every policy on the same specs; one row per policy."""
    plans: list[Plan] = []
    if plan_file is not None:  # its specs for every policy, and its own row
        mine, costs = load_plan_flags(ctx, spec, plan_file)
        mine = workflow.resimulate(mine, costs, trace=False)[0]
        req = workflow.request_for_plan(mine, costs)
        plans.append(dataclasses.replace(mine, policy=f"{plan_file.stem}:{mine.policy}"))
    else:
        req = build_request(spec)
    names = policy_names(policies)
    with planning_progress(quiet=json_out) as progress:
        task = progress.add_task("planning", total=len(names))
        for name in names:
            progress.update(task, description=f"planning {name}")
            plans.append(workflow.plan_policy(name, req))
            progress.advance(task)
    workflow.require_feasible(plans, req)
    payload = {**spec_header(req.model, req.cluster, req.parallel, req.budget_bytes),
               "results": [plan_json_summary(p) for p in plans]}
    if json_out:
        typer.echo(json.dumps(payload, indent=1))
    else:
        print_comparison(plans, req.model, req.cluster, req.parallel, req.budget_bytes, wide)
    if out is not None:
        from lynxpipe.report.files import write_comparison

        pairs = [workflow.resimulate(p, req.costs) for p in plans]
        _wrote(write_comparison(out, payload, [p for p, _ in pairs], [s for _, s in pairs],
                                req.costs.label(req.cluster.name)), json_out)


@spec_command
def plan(spec: SpecArgs, policy: PolicyOpt = None, out: PlanOut = Path("plan.json"),
         json_out: JsonFlag = False) -> None:
    """Make a plan that must fit the budget and save it as plan.json."""
    req = build_request(spec)
    name = policy or workflow.DEFAULT_POLICY
    made = workflow.plan_policy(name, req, strict=True)
    try:
        save_plan(out, made)
    except OSError as exc:
        raise LynxError(f"cannot write {out}: {exc.strerror or exc}") from None
    keep_all = made if name == "none" else make("none", req)
    none_fits = keep_all.predicted.fits_budget
    if json_out:
        typer.echo(json.dumps({**plan_json_summary(made), "plan_path": str(out),
                               "none_fits_budget": none_fits}, indent=1))
        return
    typer.echo(plan_summary_text(made))
    if none_fits:
        peak = max(keep_all.predicted.peak_memory_bytes)
        typer.echo(f"no recomputation needed at this budget: keeping everything peaks at "
                   f"{format_size(peak)} <= {format_size(req.budget_bytes)}")
    typer.echo(f"wrote {out}")
