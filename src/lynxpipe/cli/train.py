"""`lynxpipe train`: run a plan on real processes (built-in launcher, torchrun, --emulate).

The logic lives in `lynxpipe.runtime` (`train.job`, `pipeline.launch`, `train.worker`,
`train.checkpoint`); torch is imported by the ranks only (here: under torchrun).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lynxpipe import workflow
from lynxpipe.cli.common import (
    PolicyOpt,
    SpecArgs,
    build_request,
    given_spec_flags,
    load_plan_flags,
    spec_command,
)
from lynxpipe.errors import Interrupted, LynxError
from lynxpipe.plan.types import Plan

if TYPE_CHECKING:
    from lynxpipe.runtime.train.job import TrainJob

PlanFile = Annotated[Optional[Path], typer.Option(
    "--plan", dir_okay=False,
    help="Run this plan.json; spec flags given with it must agree with it.")]
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
AllowChanges = Annotated[bool, typer.Option(
    "--allow-changes", help="With --resume: continue although --seed, --data or --lr differ "
                            "from the checkpoint's (printing what changed).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Train a model over 100M parameters on CPU ranks (slow). The host memory "
                    "check still applies.")]
HELP = ("Train with a plan on real processes: built-in launcher, torchrun, or --emulate.\n\n"
        "Without flags it trains gpt-tiny on 2 CPU ranks (the planning verbs' default, GPT-22B "
        "on 16 ranks, needs hundreds of GiB). Before any rank starts it checks the plan, the "
        "host memory all ranks will take, that --out and --checkpoint-dir are writable, and "
        "that --resume continues the checkpoint's run.\n\n"
        "On CPU the reference model runs in fp32, so plans are made (and --plan files checked) "
        "with 4-byte activations: the planner then counts the bytes the runtime measures.")
TRAIN_DEFAULTS = {"model": "gpt-tiny", "tp": 1, "pp": 2, "micro_batch_size": 2,
                  "num_microbatches": 4, "seq_len": 64, "budget": "4MiB"}
"""A CPU-sized default job: gpt-tiny on 2 ranks, a budget under which lynx-heu drops tensors."""


@spec_command(defaults=TRAIN_DEFAULTS)
def train_command(ctx: typer.Context, spec: SpecArgs, policy: PolicyOpt = None,
                  plan_file: PlanFile = None, steps: Steps = 10, seed: Seed = 1234,
                  data: Data = "synthetic", lr: Lr = 1e-3, device: Device = "cpu",
                  emulate: Emulate = None, timeout: Timeout = 300.0,
                  checkpoint_dir: CheckpointDir = None, checkpoint_every: CheckpointEvery = 0,
                  resume: Resume = False, allow_changes: AllowChanges = False,
                  force: Force = False, out: RunOut = Path("run.json"),
                  quiet: Quiet = False) -> None:
    """Train with a plan on real processes (see HELP)."""
    from lynxpipe.runtime.pipeline.launch import launch, under_torchrun
    from lynxpipe.runtime.train import preflight
    from lynxpipe.runtime.train.job import TrainJob, check_options

    check_options(steps=steps, seed=seed, lr=lr, data=data, device=device, timeout_s=timeout,
                  checkpoint_every=checkpoint_every, resume=resume,
                  checkpoint_dir=checkpoint_dir, emulate=emulate)
    torchrun = under_torchrun()
    if torchrun and emulate:
        raise LynxError("--emulate starts its own ranks; do not run it under torchrun")
    preflight.require_torch("lynxpipe train")
    plan = _resolve_plan(ctx, spec, policy, plan_file, device)
    preflight.check_device(device, 1 if torchrun else plan.parallel.devices)
    # under torchrun the ranks already run: only the launcher can keep them from starting
    preflight.check_machine(plan, device, force, None if not torchrun else 1 << 62)
    preflight.check_writable(out, "--out")
    if checkpoint_dir is not None:
        preflight.check_writable(checkpoint_dir, "--checkpoint-dir", directory=True)
    if resume:
        assert checkpoint_dir is not None  # check_options
        run = {"seed": seed, "data": data, "lr": lr}
        for note in preflight.check_resume(checkpoint_dir, plan, steps, run, allow_changes):
            if not torchrun or os.environ.get("RANK") == "0":
                typer.echo(note, err=True)
    note = late_receive_note(plan, device)
    if note and not quiet and (not torchrun or os.environ.get("RANK") == "0"):
        typer.echo(note)  # stdout, with the progress: stderr holds only an error's one line
    job = TrainJob(plan=plan, steps=steps, seed=seed, data=data, lr=lr,
                   checkpoint_dir=str(checkpoint_dir or ""), checkpoint_every=checkpoint_every,
                   resume=resume, out=str(out), timeout_s=timeout, device=device,
                   emulate=emulate or "", progress=not quiet)
    if torchrun:
        from lynxpipe.runtime.train.worker import run_worker

        run_worker(job, share_plan=plan_file is None)
        if os.environ.get("RANK") != "0":
            return
    else:
        try:
            launch(job, emulate or "")
        except KeyboardInterrupt:
            raise _interrupted(ctx, job) from None
    if not quiet:
        typer.echo(f"wrote {out}")


def _resolve_plan(ctx: typer.Context, spec: SpecArgs, policy: str | None,
                  plan_file: Path | None, device: str) -> Plan:
    """Plan on the fly, or load --plan: checked as `simulate` checks it, against the spec flags
    given with it, and re-simulated: a plan that does not fit its budget is refused."""
    from lynxpipe.runtime.train.job import training_plan

    if policy is not None and plan_file is not None:
        raise LynxError("give either --policy or --plan, not both")
    if device == "cpu":
        if "dtype_bytes" in given_spec_flags(ctx) and spec.dtype_bytes != 4:
            raise LynxError(f"--dtype-bytes {spec.dtype_bytes}: the CPU runtime is fp32 (4 bytes)")
        spec = dataclasses.replace(spec, dtype_bytes=4)
    if plan_file is None:
        req = build_request(spec)
        made = workflow.plan_policy(policy or workflow.DEFAULT_POLICY, req, strict=True)
        return training_plan(made, "", device)
    plan, costs = load_plan_flags(ctx, spec, plan_file)
    if plan.cost_source == "traced":
        raise LynxError(f"{plan_file} was planned for a traced block (profile --module), whose "
                        f"tensors lynxpipe's reference model does not have: train it in your "
                        f"own loop with wrap_blocks(layers, plan=load_plan(...)), or export it "
                        f"(lynxpipe export --to torch)")
    if plan.cost_source == "measured" and costs.source != "measured":
        raise LynxError(f"{plan_file}: the plan was made with a measured profile; give the same "
                        f"--profile, so that it is checked against the costs it was made with")
    plan = workflow.resimulate(plan, costs, trace=False)[0]
    return training_plan(plan, str(plan_file), device)


def _interrupted(ctx: typer.Context, job: TrainJob) -> Interrupted:
    """Ctrl-C: one line naming the last checkpoint and the command that resumes from it."""
    from lynxpipe.runtime.train.preflight import read_latest, step_dir

    if job.checkpoint_dir:
        root = Path(job.checkpoint_dir)
        try:
            step = read_latest(root).step
        except LynxError:
            step = None
        if step is not None:
            return Interrupted(f"interrupted; the last checkpoint is {step_dir(root, step)} "
                               f"(step {step} of {job.steps}); resume with: "
                               f"{resume_command(ctx)}")
    return Interrupted("interrupted before any checkpoint was written; to be able to resume, "
                       "train with --checkpoint-dir DIR --checkpoint-every K")


def resume_command(ctx: typer.Context) -> str:
    """This command line as given, plus --resume (flags left at their defaults omitted)."""
    words = ["lynxpipe", "train"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name or "")
        if param.name in ("resume", "allow_changes") or source is None \
                or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        value = ctx.params.get(param.name or "")
        if getattr(param, "is_flag", False):
            names = param.opts if value else getattr(param, "secondary_opts", [])
            words += names[:1]
        else:
            words += [param.opts[0], shlex.quote(str(value))]
    return " ".join([*words, "--resume"])


def late_receive_note(plan: Plan, device: str) -> str | None:
    """On gloo, a pipeline plan that does not post its receives ahead (made from analytic
    costs, for NCCL) leaves each message to move only while its receiver waits: say so, and
    how to get a plan that posts them ahead (None where nothing is lost)."""
    if device != "cpu" or plan.parallel.pp == 1 or plan.recv_ahead:
        return None
    return (f"note: this plan comes from {plan.cost_source} costs, so the ranks post each "
            "pipeline receive at its RECV, and gloo moves a message only once its receive is "
            "posted; a plan made with a profile from `lynxpipe profile --measure` (gloo) posts "
            "them one RECV ahead and counts that buffer in its memory")
