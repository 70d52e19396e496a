"""Command-line interface: `lynxpipe simulate | compare | plan | train` (plus `cluster` when
installed).

Every command takes the same spec flags (declared once, on `SpecArgs`, and injected by
`spec_command`); a LynxError becomes one red `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from lynxpipe.artifact import fingerprint
from lynxpipe.cost.table import CostTable, analytic_costs, load_profile, profile_model
from lynxpipe.errors import LynxError
from lynxpipe.plan.finalize import predict
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import Plan, PlanRequest, load_plan, save_plan
from lynxpipe.report.console import planning_progress, print_comparison
from lynxpipe.report.summary import plan_summary_text
from lynxpipe.report.tables import gib, plan_json_summary, plan_reserve_bytes, spec_header
from lynxpipe.sim.engine import simulate as run_simulation
from lynxpipe.sim.result import SimResult
from lynxpipe.specs import (ClusterSpec, ModelSpec, ParallelSpec, get_cluster, get_model,
                            validate_layout)
from lynxpipe.units import parse_bytes

PARTITIONS = ("uniform", "balanced", "default")


@dataclass(frozen=True)
class Defaults:
    """What `lynxpipe simulate` / `compare` run with no flags.

    Chosen so that recomputation is necessary and the policies differ: GPT-22B (Korthikanti's
    model) on 16 A100-PCIe-40GB, tp=4 pp=4, micro-batch 1 x 8, seq 2048, budget = the 40 GiB
    device. Keeping everything peaks at 48.2 GiB on stage 0, so `none` does not fit; full
    (25.8 GiB, +44% step time), full-block (39.4 GiB, +8%) and selective (33.4 GiB, +2%) do,
    and TP all-reduces over PCIe leave long windows for lynx to hide recompute in (lynx-heu
    matched `none`'s step time). Of the layouts tried (gpt-13b/22b, tp 4/8, pp 4, micro-batch
    1/2, 8/16 micro-batches) it is the one meeting those conditions with the widest spread
    between policies; 8 micro-batches keep `lynxpipe compare` around a second.
    """

    model: str = "gpt-22b"
    cluster: str = "a100-pcie"
    tp: int = 4
    pp: int = 4
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 8
    seq_len: int = 2048
    schedule: str = "1f1b"
    time_limit_s: float = 30.0


DEFAULTS = Defaults()


def _opt(default: Any, *flags: str, help: str, panel: str = "Specs") -> Any:
    return field(default=default, metadata={
        "option": typer.Option(*flags, help=help, rich_help_panel=panel)})


@dataclass(frozen=True)
class SpecArgs:
    """The flags shared by every command (one source of truth for their names and help)."""

    model: str = _opt(DEFAULTS.model, "--model", help="Model preset or HF config.json path.")
    cluster: str = _opt(DEFAULTS.cluster, "--cluster", help="Cluster preset or JSON file.")
    tp: int = _opt(DEFAULTS.tp, "--tp", help="Tensor-parallel degree.")
    pp: int = _opt(DEFAULTS.pp, "--pp", help="Pipeline-parallel degree.")
    dp: int = _opt(DEFAULTS.dp, "--dp", help="Data-parallel degree.")
    devices: Optional[int] = _opt(None, "--devices", help="Total devices; must be tp*pp*dp.")
    sequence_parallel: bool = _opt(False, "--sequence-parallel/--no-sequence-parallel",
                                   help="Megatron sequence parallelism.")
    micro_batch_size: int = _opt(DEFAULTS.micro_batch_size, "--micro-batch-size",
                                 help="Sequences per micro-batch.")
    num_microbatches: int = _opt(DEFAULTS.num_microbatches, "--num-microbatches",
                                 help="Micro-batches per step.")
    seq_len: int = _opt(DEFAULTS.seq_len, "--seq-len", help="Sequence length.")
    schedule: str = _opt(DEFAULTS.schedule, "--schedule", help="gpipe, 1f1b or interleaved.")
    virtual_stages: int = _opt(1, "--virtual-stages", help="Chunks per rank (interleaved).")
    distributed_optimizer: bool = _opt(False, "--distributed-optimizer",
                                       help="Shard optimizer state over DP.")
    dtype_bytes: Optional[int] = _opt(None, "--dtype-bytes",
                                      help="Bytes per activation element (default: the model's, "
                                           "2 for the presets); `train` on CPU uses 4 (fp32).")
    budget: Optional[str] = _opt(None, "--budget", panel="Memory",
                                 help="Per-device budget (bytes or e.g. 40GiB); default: the "
                                      "cluster's device memory.")
    reserve: str = _opt("0", "--reserve", panel="Memory",
                        help="Memory held back per device (workspace, fragmentation).")
    profile: Optional[Path] = _opt(None, "--profile", panel="Planning",
                                   help="profile.json with measured costs (default: analytic).")
    partition: str = _opt("default", "--partition", panel="Planning",
                          help="uniform, balanced or default (per policy).")
    time_limit: float = _opt(DEFAULTS.time_limit_s, "--time-limit", panel="Planning",
                             help="MILP time limit in seconds.")


def print_error(message: str) -> None:
    """One red line on stderr, however many lines the message had."""
    typer.secho(f"error: {' '.join(message.split())}", fg="red", err=True)


def fail(message: str) -> typing.NoReturn:
    """Print the error and exit with code 2 (the code click uses for usage errors)."""
    print_error(message)
    raise typer.Exit(2)


@contextlib.contextmanager
def lynx_errors() -> Iterator[None]:
    """Turn LynxError into `fail`; anything else is a bug and keeps its traceback."""
    try:
        yield
    except LynxError as exc:
        fail(str(exc))


def spec_command(func: Callable[..., None]) -> Callable[..., None]:
    """Give `func(spec: SpecArgs, ...)` every SpecArgs field as a typer option."""
    sig = inspect.signature(func, eval_str=True)
    own = [p for name, p in sig.parameters.items() if name != "spec"]
    hints = typing.get_type_hints(SpecArgs)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                               annotation=Annotated[hints[f.name], f.metadata["option"]])
             for f in fields(SpecArgs)]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> None:
        spec = SpecArgs(**{f.name: kwargs.pop(f.name) for f in fields(SpecArgs)})
        with lynx_errors():
            func(spec=spec, **kwargs)

    params = own + extra
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# -- turning flags into a PlanRequest --------------------------------------------------------

def _reserve_bytes(text: str) -> int:
    with contextlib.suppress(ValueError):
        if float(text) == 0:
            return 0
    return parse_bytes(text, "--reserve")


def load_costs(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
               profile: Path | None, adopt_dtype: bool = False) -> tuple[ModelSpec, CostTable]:
    """Analytic costs, or a profile.json checked to be made for this model and layout.

    With `adopt_dtype` (no --dtype-bytes given) the model takes the activation width the
    profile was measured at (fp32 on CPU), so a CPU profile works with the preset's flags.
    """
    if profile is None:
        return model, analytic_costs(model, cluster, par)
    table = _checked_load(load_profile, profile, "profile")
    found = profile_model(model, par, table, (4, 2, 1) if adopt_dtype else ())
    if found is not None:
        return found, table
    raise LynxError(f"{profile}: profile was made for other specs (fingerprint "
                    f"{table.spec_fingerprint}, these specs: {fingerprint(model, par)}); re-run "
                    f"`lynxpipe profile` with the same --model/--tp/--pp/--micro-batch-size/"
                    f"--seq-len flags (and --dtype-bytes, if you gave one)")


def _checked_load(loader: Callable[[Path], Any], path: Path, what: str) -> Any:
    """Artifacts with the right kind/version but a broken body must not crash with a trace."""
    try:
        return loader(path)
    except LynxError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, StopIteration) as exc:
        raise LynxError(f"{path}: malformed {what} file ({type(exc).__name__}: {exc}); "
                        f"regenerate it") from None


def build_request(spec: SpecArgs) -> PlanRequest:
    """Validate every flag and return the request all planners receive."""
    model, cluster = get_model(spec.model), get_cluster(spec.cluster)
    if spec.dtype_bytes is not None:
        if spec.dtype_bytes not in (1, 2, 4):
            raise LynxError(f"--dtype-bytes {spec.dtype_bytes} must be 1, 2 or 4")
        model = dataclasses.replace(model, dtype_bytes=spec.dtype_bytes)
    par = ParallelSpec(
        tp=spec.tp, pp=spec.pp, dp=spec.dp, sequence_parallel=spec.sequence_parallel,
        micro_batch_size=spec.micro_batch_size, num_microbatches=spec.num_microbatches,
        seq_len=spec.seq_len, schedule=spec.schedule,  # type: ignore[arg-type]
        virtual_stages=spec.virtual_stages, distributed_optimizer=spec.distributed_optimizer)
    validate_layout(model, cluster, par, spec.devices)
    budget = (parse_bytes(spec.budget, "--budget") if spec.budget is not None
              else cluster.device_memory_bytes)
    reserve = _reserve_bytes(spec.reserve)
    if spec.partition not in PARTITIONS:
        raise LynxError(f"--partition {spec.partition!r} must be one of {', '.join(PARTITIONS)}")
    if not spec.time_limit > 0:
        raise LynxError(f"--time-limit {spec.time_limit} must be > 0 seconds")
    model, costs = load_costs(model, cluster, par, spec.profile, spec.dtype_bytes is None)
    return PlanRequest(model, cluster, par, budget, costs,
                       partition=spec.partition,  # type: ignore[arg-type]
                       reserve_bytes=reserve, time_limit_s=spec.time_limit)


def default_policy() -> str:
    """The best policy available: lynx-heu once registered, selective before that."""
    return "lynx-heu" if "lynx-heu" in PLANNERS else "selective"


def require_feasible(plans: list[Plan], req: PlanRequest) -> None:
    """When no plan fits, say so with the smallest feasible budget."""
    if plans and not any(p.predicted.fits_budget for p in plans):
        make("full", req, strict=True)  # raises naming the smallest feasible budget


def traced(plan: Plan, costs: CostTable) -> tuple[Plan, SimResult]:
    """Re-simulate a plan from its own order with a trace; predictions refreshed from `costs`."""
    sim = run_simulation(costs, plan.partition, plan.layers, plan.order, trace=True)
    req = PlanRequest(plan.model, plan.cluster, plan.parallel, plan.budget_bytes, costs,
                      reserve_bytes=plan_reserve_bytes(plan))
    return dataclasses.replace(plan, predicted=predict(req, sim), cost_source=costs.source), sim


def plan_one(policy: str, req: PlanRequest, strict: bool = False) -> Plan:
    """`make`, except that an impossible budget is reported as such whichever policy failed."""
    try:
        return make(policy, req, strict=strict)
    except LynxError:
        if policy != "full":
            make("full", req, strict=True)  # raises naming the smallest feasible budget
        raise


def policy_names(text: str | None) -> list[str]:
    """The comma-separated --policies list (default: every registered policy), checked."""
    names = [n.strip() for n in (text or ",".join(PLANNERS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANNERS]
    if unknown or not names:
        raise LynxError(f"--policies {text!r}: unknown policy {', '.join(unknown) or '(none)'}; "
                        f"choose among {', '.join(PLANNERS)}")
    return list(dict.fromkeys(names))


# -- commands --------------------------------------------------------------------------------

app = typer.Typer(
    help="Plan, simulate and compare activation recomputation overlapped with communication.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

OutDir = Annotated[Optional[Path], typer.Option(
    "--out", file_okay=False, help="Directory for trace.json, timeline.png and result.json.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]
PolicyOpt = Annotated[Optional[str], typer.Option(
    "--policy", help="Recomputation policy (default: the best registered one).")]


def _wrote(paths: list[Path], json_out: bool) -> None:
    if paths:
        typer.echo(f"wrote {len(paths)} files under {paths[0].parent}", err=json_out)


@app.command()
@spec_command
def simulate(spec: SpecArgs, policy: PolicyOpt = None,
             plan_file: Annotated[Optional[Path], typer.Option(
                 "--plan", dir_okay=False, help="Re-simulate this plan.json (its own specs).")
             ] = None,
             out: OutDir = None, json_out: JsonFlag = False) -> None:
    """Plan one policy (or load --plan) and simulate one training step."""
    if policy is not None and plan_file is not None:
        raise LynxError("give either --policy or --plan, not both")
    if plan_file is not None:
        if dataclasses.replace(spec, profile=None) != SpecArgs():
            typer.echo("note: --plan carries its own specs; the spec flags are ignored", err=True)
        plan = _checked_load(load_plan, plan_file, "plan")
        plan, sim = traced(plan, load_costs(plan.model, plan.cluster, plan.parallel,
                                            spec.profile)[1])
    else:
        req = build_request(spec)
        plan = plan_one(policy or default_policy(), req)
        require_feasible([plan], req)
        sim = traced(plan, req.costs)[1] if out else None
    if json_out:
        typer.echo(json.dumps(plan_json_summary(plan), indent=1))
    else:
        typer.echo(plan_summary_text(plan))
    if out is not None and sim is not None:
        from lynxpipe.report.files import write_simulation

        _wrote(write_simulation(out, plan, sim), json_out)


@app.command()
@spec_command
def compare(spec: SpecArgs,
            policies: Annotated[Optional[str], typer.Option(
                "--policies", help="Comma-separated policies (default: every registered one).")
            ] = None,
            out: OutDir = None, json_out: JsonFlag = False) -> None:
    """Plan and simulate every policy on the same specs; one row per policy."""
    req = build_request(spec)
    names = policy_names(policies)
    plans: list[Plan] = []
    with planning_progress(quiet=json_out) as progress:
        task = progress.add_task("planning", total=len(names))
        for name in names:
            progress.update(task, description=f"planning {name}")
            plans.append(plan_one(name, req))
            progress.advance(task)
    require_feasible(plans, req)
    payload = {**spec_header(req.model, req.cluster, req.parallel, req.budget_bytes),
               "results": [plan_json_summary(p) for p in plans]}
    if json_out:
        typer.echo(json.dumps(payload, indent=1))
    else:
        print_comparison(plans, req.model, req.cluster, req.parallel, req.budget_bytes)
    if out is not None:
        from lynxpipe.report.files import write_comparison

        pairs = [traced(p, req.costs) for p in plans]
        _wrote(write_comparison(out, payload, [p for p, _ in pairs], [s for _, s in pairs]),
               json_out)


@app.command("plan")
@spec_command
def plan_command(spec: SpecArgs, policy: PolicyOpt = None,
                 out: Annotated[Path, typer.Option(
                     "--out", dir_okay=False, help="Where to write the plan.")
                 ] = Path("plan.json"),
                 json_out: JsonFlag = False) -> None:
    """Make a plan that must fit the budget and save it as plan.json."""
    req = build_request(spec)
    name = policy or default_policy()
    plan = plan_one(name, req, strict=True)
    try:
        save_plan(out, plan)
    except OSError as exc:
        raise LynxError(f"cannot write {out}: {exc.strerror or exc}") from None
    keep_all = plan if name == "none" else make("none", req)
    none_fits = keep_all.predicted.fits_budget
    if json_out:
        typer.echo(json.dumps({**plan_json_summary(plan), "plan_path": str(out),
                               "none_fits_budget": none_fits}, indent=1))
        return
    typer.echo(plan_summary_text(plan))
    if none_fits:
        peak = max(keep_all.predicted.peak_memory_bytes)
        typer.echo(f"no recomputation needed at this budget: keeping everything peaks at "
                   f"{gib(peak)} GiB <= {gib(req.budget_bytes)} GiB")
    typer.echo(f"wrote {out}")


try:  # the emulated-cluster commands live with the testbed, which may not be installed yet
    from lynxpipe.testbed.cli import cluster_app
except ImportError:
    pass
else:
    app.add_typer(cluster_app, name="cluster")


# `lynxpipe train` and `lynxpipe profile` register themselves on `app`; they import this
# module, so import them by name only (whichever is imported first, each registers once)
import lynxpipe.profile_cli  # noqa: E402,F401
import lynxpipe.train_cli  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except LynxError as exc:  # raised outside a command (e.g. by a sub-app): same contract
        print_error(str(exc))
        sys.exit(2)


if __name__ == "__main__":
    # `python -m lynxpipe.cli` runs this file as __main__; commands defined in other modules
    # (train) register on the `app` of `lynxpipe.cli`, so run that one
    from lynxpipe.cli import main as _main

    _main()
