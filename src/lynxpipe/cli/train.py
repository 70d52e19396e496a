"""`lynxpipe train`: run a plan on real processes (built-in launcher, torchrun, --emulate).

The logic lives in `lynxpipe.runtime` (`train.job`, `pipeline.launch`, `train.worker`,
`train.checkpoint`); torch is imported by the ranks only (here: under torchrun).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from lynxpipe import workflow
from lynxpipe.cli.common import PolicyOpt, SpecArgs, build_request, spec_command
from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan, load_plan

PlanFile = Annotated[Optional[Path], typer.Option(
    "--plan", dir_okay=False,
    help="Run this plan.json; spec flags given with it must match its fingerprint.")]
Steps = Annotated[int, typer.Option(
    "--steps", help="Train until this many steps are done (with --resume: the total).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of weights, data and dropout.")]
Data = Annotated[str, typer.Option(
    "--data", help="synthetic (token progressions) or corpus (shipped text, byte-level).")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
Device = Annotated[str, typer.Option(
    "--device", help="cpu (gloo, fp32: plans are made with --dtype-bytes 4 automatically) "
                     "or cuda (NCCL).")]
Emulate = Annotated[Optional[str], typer.Option(
    "--emulate", help="RATE[,LATENCY], e.g. 200mbit,2ms: run the ranks in an emulated cluster "
                      "with shaped links (needs root).")]
Timeout = Annotated[float, typer.Option(
    "--timeout", help="A crashed or stuck rank ends the job within this many seconds.")]
CheckpointDir = Annotated[Optional[Path], typer.Option(
    "--checkpoint-dir", file_okay=False, help="Where training checkpoints go.")]
CheckpointEvery = Annotated[int, typer.Option(
    "--checkpoint-every", help="Checkpoint every K steps (0: never).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue from the newest checkpoint in --checkpoint-dir.")]
RunOut = Annotated[Path, typer.Option(
    "--out", dir_okay=False, help="Where to write the RunResult (run.json).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")]
HELP = ("Train with a plan on real processes: built-in launcher, torchrun, or --emulate.\n\n"
        "On CPU the reference model runs in fp32, so plans are made (and --plan files checked) "
        "with 4-byte activations: the planner then counts the bytes the runtime measures.")


@spec_command
def train_command(ctx: typer.Context, spec: SpecArgs, policy: PolicyOpt = None,
                  plan_file: PlanFile = None, steps: Steps = 10, seed: Seed = 1234,
                  data: Data = "synthetic", lr: Lr = 1e-3, device: Device = "cpu",
                  emulate: Emulate = None, timeout: Timeout = 300.0,
                  checkpoint_dir: CheckpointDir = None, checkpoint_every: CheckpointEvery = 0,
                  resume: Resume = False, out: RunOut = Path("run.json"),
                  quiet: Quiet = False) -> None:
    """Train with a plan on real processes (see HELP)."""
    from lynxpipe.runtime.pipeline.launch import launch, under_torchrun
    from lynxpipe.runtime.train.job import TrainJob, check_options

    check_options(steps=steps, data=data, device=device, timeout_s=timeout,
                  checkpoint_every=checkpoint_every, resume=resume,
                  checkpoint_dir=checkpoint_dir, emulate=emulate)
    plan = _resolve_plan(ctx, spec, policy, plan_file, device)
    job = TrainJob(plan=plan, steps=steps, seed=seed, data=data, lr=lr, checkpoint_dir=str(checkpoint_dir or ""),
                   checkpoint_every=checkpoint_every, resume=resume, out=str(out),
                   timeout_s=timeout, device=device, emulate=emulate or "", progress=not quiet)
    if under_torchrun():
        if emulate:
            raise LynxError("--emulate starts its own ranks; do not run it under torchrun")
        from lynxpipe.runtime.train.worker import run_worker

        run_worker(job, share_plan=plan_file is None)
        if os.environ.get("RANK") != "0":
            return
    else:
        launch(job, emulate or "")
    if not quiet:
        typer.echo(f"wrote {out}")


def _resolve_plan(ctx: typer.Context, spec: SpecArgs, policy: str | None,
                  plan_file: Path | None, device: str) -> Plan:
    """Plan on the fly, or load --plan and check it against the spec flags that were given."""
    from lynxpipe.runtime.train.job import training_plan

    if policy is not None and plan_file is not None:
        raise LynxError("give either --policy or --plan, not both")
    given = _given_spec_flags(ctx)
    if device == "cpu":
        if "dtype_bytes" in given and spec.dtype_bytes != 4:
            raise LynxError(f"--dtype-bytes {spec.dtype_bytes}: the CPU runtime is fp32 (4 bytes)")
        spec = dataclasses.replace(spec, dtype_bytes=4)
    if plan_file is None:
        req = build_request(spec)
        made = workflow.plan_policy(policy or workflow.DEFAULT_POLICY, req, strict=True)
        return training_plan(made, req, "", device)
    plan = workflow.checked_load(load_plan, plan_file, "plan")
    if plan.cost_source == "traced":
        raise LynxError(f"{plan_file} was planned for a traced block (profile --module), whose "
                        f"tensors lynxpipe's reference model does not have: train it in your "
                        f"own loop with wrap_blocks(layers, plan=load_plan(...)), or export it "
                        f"(lynxpipe export --to torch)")
    # no spec flags at all: run the plan's own specs; any flag: all of them must match
    req = build_request(spec) if given - {"dtype_bytes", "profile"} else None
    return training_plan(plan, req, str(plan_file), device)


def _given_spec_flags(ctx: typer.Context) -> set[str]:
    """SpecArgs fields set on the command line (or by environment), not left at default."""
    given = set()
    for f in fields(SpecArgs):
        source = ctx.get_parameter_source(f.name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(f.name)
    return given
