"""What every command shares: the spec flags (declared once, on `SpecArgs`, and injected by
`spec_command`), turning them into a `PlanRequest` (through `lynxpipe.workflow`), and errors: a
LynxError becomes one red `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping, Optional

import typer

from lynxpipe import workflow
from lynxpipe.cli.shell import print_error
from lynxpipe.cost.table import CostTable
from lynxpipe.errors import LynxError
from lynxpipe.plan.planners import PLANNERS
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.units import format_bytes, parse_bytes


@dataclass(frozen=True)
class Defaults:
    """What `lynxpipe simulate` / `compare` run with no flags.

    Chosen so that recomputation is necessary and the policies differ under fused attention
    (what users run): GPT-22B (Korthikanti's model) on 16 A100-PCIe-40GB, tp=4 pp=4,
    micro-batch 1 x 8, seq 2048, a 28 GiB budget per device (of the 40 GiB, as if the rest were
    held by the framework's buffers and fragmentation). Keeping everything peaks at 33.2 GiB,
    so `none` and `selective` (nothing to drop under fused attention) do not fit; full
    (+44% step time), full-block (+15%) and checkmate (+2.4%) do, and the TP all-reduces over
    PCIe leave windows in which lynx-heu hides all of its recompute (it matches `none`'s step
    time). With the whole 40 GiB, fused attention needs no recompute at this layout; of the
    layouts tried (gpt-13b/22b, tp 4/8, pp 2/4, micro-batch 1/2, seq 2048-4096) none makes the
    device memory bind by more than 6%. 8 micro-batches keep `lynxpipe compare` around a second.
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
    budget: str = "28GiB"
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
    attention: Optional[str] = _opt(None, "--attention",
                                    help="fused (FlashAttention/SDPA: no s x s tensors, what "
                                         "users run) or explicit (scores and softmax saved, the "
                                         "paper's regime); default: the model's own (presets: "
                                         "fused; HF configs: their attention implementation).")
    attention_dropout: Optional[float] = _opt(None, "--attention-dropout",
                                              help="Override the model's attention dropout.")
    hidden_dropout: Optional[float] = _opt(None, "--hidden-dropout",
                                           help="Override the model's hidden (residual, "
                                                "embedding) dropout.")
    dtype_bytes: Optional[int] = _opt(None, "--dtype-bytes",
                                      help="Bytes per activation element (default: the model's, "
                                           "2 for the presets); `train` on CPU uses 4 (fp32).")
    budget: Optional[str] = _opt(DEFAULTS.budget, "--budget", panel="Memory",
                                 help="Per-device memory budget (bytes or e.g. 40GiB); default: "
                                      "the built-in example's 28GiB; `device` for the cluster's "
                                      "device memory.")
    reserve: str = _opt("0", "--reserve", panel="Memory",
                        help="Memory held back per device (workspace, fragmentation).")
    profile: Optional[Path] = _opt(None, "--profile", panel="Planning",
                                   help="profile.json with measured costs (default: analytic).")
    partition: str = _opt("default", "--partition", panel="Planning",
                          help="uniform, balanced or default (per policy).")
    time_limit: float = _opt(DEFAULTS.time_limit_s, "--time-limit", panel="Planning",
                             help="MILP time limit in seconds.")


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print the error and exit with `code` (2: the code click uses for usage errors)."""
    print_error(message)
    raise typer.Exit(code)


@contextlib.contextmanager
def lynx_errors() -> Iterator[None]:
    """Turn LynxError into `fail` (anything else: `shell.LynxGroup` reports it as a bug)."""
    try:
        yield
    except LynxError as exc:
        fail(str(exc), exc.exit_code)


def spec_command(func: Callable[..., None] | None = None, *,
                 defaults: Mapping[str, Any] | None = None) -> Any:
    """Give `func(spec: SpecArgs, ...)` every SpecArgs field as a typer option; `defaults`
    replaces some fields' defaults for this command (`train` runs a CPU-sized model)."""
    if func is None:
        return functools.partial(spec_command, defaults=defaults)
    own_defaults = dict(defaults or {})
    unknown = set(own_defaults) - {f.name for f in fields(SpecArgs)}
    assert not unknown, f"not spec flags: {unknown}"
    sig = inspect.signature(func, eval_str=True)
    own = [p for name, p in sig.parameters.items() if name != "spec"]
    hints = typing.get_type_hints(SpecArgs)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                               default=own_defaults.get(f.name, f.default),
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


def build_request(spec: SpecArgs) -> PlanRequest:
    """Parse every flag into library spec types and let the workflow validate the rest."""
    model, cluster = get_model(spec.model), get_cluster(spec.cluster)
    overrides = {k: getattr(spec, k) for k in ("attention", "attention_dropout", "hidden_dropout")
                 if getattr(spec, k) is not None}
    if overrides:
        model = dataclasses.replace(model, **overrides)
    if spec.dtype_bytes is not None:
        if spec.dtype_bytes not in (1, 2, 4):
            raise LynxError(f"--dtype-bytes {spec.dtype_bytes} must be 1, 2 or 4")
        model = dataclasses.replace(model, dtype_bytes=spec.dtype_bytes)
    par = ParallelSpec(
        tp=spec.tp, pp=spec.pp, dp=spec.dp, sequence_parallel=spec.sequence_parallel,
        micro_batch_size=spec.micro_batch_size, num_microbatches=spec.num_microbatches,
        seq_len=spec.seq_len, schedule=spec.schedule,  # type: ignore[arg-type]
        virtual_stages=spec.virtual_stages, distributed_optimizer=spec.distributed_optimizer)
    budget = (None if spec.budget is None or spec.budget == "device"
              else parse_bytes(spec.budget, "--budget"))
    return workflow.build_request(
        model, cluster, par, budget_bytes=budget, reserve_bytes=_reserve_bytes(spec.reserve),
        profile=spec.profile, partition=spec.partition, time_limit_s=spec.time_limit,
        devices=spec.devices, adopt_profile_dtype=spec.dtype_bytes is None)


# -- spec flags given beside --plan ----------------------------------------------------------

_MODEL_SHAPE = ("name", "family", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                "ffn_hidden_size", "vocab_size")
"""What `--model` says about a model; attention, dropouts and width have flags of their own."""
_LAYOUT_FLAGS = ("tp", "pp", "dp", "sequence_parallel", "micro_batch_size", "num_microbatches",
                 "seq_len", "schedule", "virtual_stages", "distributed_optimizer")


def given_spec_flags(ctx: typer.Context) -> set[str]:
    """SpecArgs fields set on the command line (or by environment), not left at default."""
    given = set()
    for f in fields(SpecArgs):
        source = ctx.get_parameter_source(f.name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(f.name)
    return given


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _contradictions(name: str, spec: SpecArgs, plan: Plan) -> list[tuple[str, str]]:
    """(what the flag says, what the plan has) for every way flag `name` disagrees."""
    if name == "model":
        flag_model = get_model(spec.model)
        return [(f"{k}={getattr(flag_model, k)!r}", f"{k}={getattr(plan.model, k)!r}")
                for k in _MODEL_SHAPE if getattr(flag_model, k) != getattr(plan.model, k)]
    if name in ("attention", "attention_dropout", "hidden_dropout", "dtype_bytes"):
        pairs = [(getattr(spec, name), getattr(plan.model, name))]
    elif name in _LAYOUT_FLAGS:
        pairs = [(getattr(spec, name), getattr(plan.parallel, name))]
    elif name == "cluster":
        same = get_cluster(spec.cluster) == plan.cluster
        return [] if same else [(f"cluster {spec.cluster}", f"cluster {plan.cluster.name}")]
    elif name == "devices":
        pairs = [(spec.devices, plan.parallel.devices)]
    elif name in ("budget", "reserve"):
        flag = (_reserve_bytes(spec.reserve) if name == "reserve"
                else plan.cluster.device_memory_bytes if spec.budget in (None, "device")
                else parse_bytes(spec.budget, "--budget"))
        has = getattr(plan, f"{name}_bytes")
        return [] if flag == has else [(f"{name} {format_bytes(flag)}",
                                        f"{name} {format_bytes(has)}")]
    elif name == "partition":
        pairs = [(spec.partition, plan.partition_mode)]
    elif name == "time_limit":
        pairs = [(spec.time_limit, plan.time_limit_s)]
    else:  # --profile: costs to simulate with, not a spec of the plan
        return []
    return [(f"{name}={a!r}", f"{name}={b!r}") for a, b in pairs if a != b]


def check_flags_match_plan(ctx: typer.Context, spec: SpecArgs, plan: Plan, where: str) -> None:
    """Refuse spec flags that contradict the plan they are given with, naming both values and
    the fix; a flag that agrees with the plan is fine (scripts may repeat them)."""
    problems = []
    for name in sorted(given_spec_flags(ctx)):
        for said, has in _contradictions(name, spec, plan):
            problems.append(f"{_flag(name)} gives {said} but the plan has {has}")
    if problems:
        raise LynxError(f"{where}: {'; '.join(problems)}; a plan carries its own specs: drop "
                        f"the flag(s) to use them, or make a plan for the new specs with "
                        f"`lynxpipe plan`")


def load_plan_flags(ctx: typer.Context, spec: SpecArgs, plan_file: Path
                    ) -> tuple[Plan, CostTable]:
    """--plan, checked (`workflow.load_plan_file`) and against the spec flags given with it."""
    plan, costs = workflow.load_plan_file(plan_file, spec.profile)
    check_flags_match_plan(ctx, spec, plan, str(plan_file))
    return plan, costs


def policy_names(text: str | None) -> list[str]:
    """The comma-separated --policies list (default: every registered policy), checked."""
    names = [n.strip() for n in (text or ",".join(PLANNERS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANNERS]
    if unknown or not names:
        raise LynxError(f"--policies {text!r}: unknown policy {', '.join(unknown) or '(none)'}; "
                        f"choose among {', '.join(PLANNERS)}")
    return list(dict.fromkeys(names))


OutDir = Annotated[Optional[Path], typer.Option(
    "--out", file_okay=False, help="Directory for trace.json, timeline.png and result.json.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]
PolicyOpt = Annotated[Optional[str], typer.Option(
    "--policy", help=f"Recomputation policy (default: {workflow.DEFAULT_POLICY}).")]
