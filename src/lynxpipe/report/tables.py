"""Side-by-side tables of plans (rich and Markdown) and the JSON summary of one plan."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from lynxpipe.artifact import to_dict
from lynxpipe.plan.types import Plan
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

GIB = 2**30

COLUMNS: tuple[str, ...] = (
    "policy", "step time (ms)", "tokens/s", "model TFLOP/s/device",
    "peak act. per stage (GiB)", "peak total max (GiB)", "exposed recompute (ms)",
    "hidden recompute (ms)", "fits budget", "planner (ms)",
)
_NUMERIC = frozenset(range(1, len(COLUMNS))) - {4, 8}


def gib(nbytes: float) -> str:
    """Bytes as GiB with one decimal (the precision budgets are discussed at)."""
    return f"{nbytes / GIB:.1f}"


def per_stage_gib(values: Sequence[int]) -> str:
    """Per-rank byte counts as `14.9/11.1/7.4/3.8` (GiB)."""
    return "/".join(gib(v) for v in values)


def plan_row(plan: Plan) -> list[str]:
    """One table row, in COLUMNS order."""
    p = plan.predicted
    return [
        plan.policy,
        f"{p.step_time_ms:,.1f}",
        f"{p.tokens_per_s:,.0f}",
        f"{p.model_tflops_per_device:.1f}",
        per_stage_gib(p.peak_activation_bytes),
        gib(max(p.peak_memory_bytes, default=0)),
        f"{p.recompute_exposed_ms:,.1f}",
        f"{p.recompute_hidden_ms:,.1f}",
        "yes" if p.fits_budget else "no",
        f"{plan.planner_ms:,.1f}",
    ]


def best_fitting(plans: Sequence[Plan]) -> Plan | None:
    """The fastest plan that fits its budget, if any."""
    fitting = [p for p in plans if p.predicted.fits_budget]
    return min(fitting, key=lambda p: p.predicted.step_time_ms, default=None)


def plans_table(plans: Sequence[Plan], title: str = "") -> Table:
    """A rich table, one row per plan; the fastest fitting plan in bold green, misfits in red."""
    table = Table(title=title or None, title_justify="left")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if i in _NUMERIC else "left",
                         overflow="fold")
    best = best_fitting(plans)
    for plan in plans:
        style = ("bold green" if plan is best else
                 "" if plan.predicted.fits_budget else "red")
        table.add_row(*plan_row(plan), style=style)
    return table


def plans_markdown(plans: Sequence[Plan]) -> str:
    """A GitHub Markdown table, one row per plan."""
    align = ["---:" if i in _NUMERIC else ":---" for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(plan_row(plan)) + " |" for plan in plans]
    return "\n".join(lines) + "\n"


def plan_json_summary(plan: Plan) -> dict[str, Any]:
    """Machine-readable figures of one plan (lists are per pipeline rank)."""
    p = plan.predicted
    return {
        "policy": plan.policy,
        "step_time_ms": p.step_time_ms,
        "tokens_per_s": p.tokens_per_s,
        "model_tflops_per_device": p.model_tflops_per_device,
        "peak_memory_bytes": list(p.peak_memory_bytes),
        "peak_activation_bytes": list(p.peak_activation_bytes),
        "recompute_exposed_ms": p.recompute_exposed_ms,
        "recompute_hidden_ms": p.recompute_hidden_ms,
        "fits_budget": p.fits_budget,
        "planner_ms": plan.planner_ms,
        "mip_gap": plan.mip_gap,
        "budget_bytes": plan.budget_bytes,
        "reserve_bytes": plan.reserve_bytes,
        "partition": list(plan.partition),
        "cost_source": plan.cost_source,
        "notes": list(plan.notes),
        "ranks": [to_dict(r) for r in p.ranks],
    }


def spec_header(model: ModelSpec, cluster: ClusterSpec, parallel: ParallelSpec,
                budget_bytes: int) -> dict[str, Any]:
    """What a set of results was computed for (the head of compare.json / result.json)."""
    return {"model": to_dict(model), "cluster": to_dict(cluster),
            "parallel": to_dict(parallel), "budget_bytes": budget_bytes}


def setup_line(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
               budget_bytes: int) -> str:
    """One-line description of the setup, used as table and plot titles."""
    sched = par.schedule + (f" v={par.virtual_stages}" if par.virtual_stages > 1 else "")
    return (f"{model.name} on {cluster.name}: tp={par.tp} pp={par.pp} dp={par.dp}"
            f"{' sp' if par.sequence_parallel else ''}, micro-batch {par.micro_batch_size}"
            f" x {par.num_microbatches}, seq {par.seq_len}, {sched}, "
            f"budget {gib(budget_bytes)} GiB/device")
