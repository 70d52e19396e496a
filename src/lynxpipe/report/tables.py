"""Side-by-side tables of plans (rich and Markdown) and the JSON summary of one plan."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from lynxpipe.artifact import to_dict
from lynxpipe.plan.types import Plan
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec
from lynxpipe.units import format_ms, format_size, in_unit, size_unit

NARROW: tuple[str, ...] = (
    "policy", "step ms", "tokens/s", "TFLOP/s", "peak {u}", "exposed ms", "hidden ms", "fits",
)
"""The default table (fits 100 columns): units in the headers, the memory unit scaled."""
WIDE: tuple[str, ...] = (
    "policy", "step time (ms)", "tokens/s", "model TFLOP/s/device",
    "peak act. per stage ({u})", "peak total max ({u})", "exposed recompute (ms)",
    "hidden recompute (ms)", "fits budget", "planner (ms)",
)
"""`--wide` and compare.md: every figure."""
COLUMNS = WIDE
_LEFT = frozenset({"policy", "peak act. per stage ({u})", "fits", "fits budget"})


def gib(nbytes: float) -> str:
    """Bytes as GiB with one decimal (paper-scale reports, where every figure is GiB-sized)."""
    return in_unit(nbytes, "GiB")


def memory_unit(plans: Sequence[Plan]) -> str:
    """One binary unit for every memory figure of a table: the largest peak decides."""
    most = max((b for p in plans for b in p.predicted.peak_memory_bytes), default=0)
    return size_unit(most)[0]


def per_stage(values: Sequence[int], unit: str) -> str:
    """Per-rank byte counts as `14.9/11.1/7.4/3.8` in `unit`."""
    return "/".join(in_unit(v, unit) for v in values)


def plan_row(plan: Plan, unit: str = "GiB", wide: bool = True) -> list[str]:
    """One table row, in WIDE (or NARROW) column order; memory in `unit`."""
    p = plan.predicted
    fits = "yes" if p.fits_budget else "no"
    peak = in_unit(max(p.peak_memory_bytes, default=0), unit)
    if not wide:
        return [plan.policy, format_ms(p.step_time_ms), f"{p.tokens_per_s:,.0f}",
                f"{p.model_tflops_per_device:.1f}", peak, format_ms(p.recompute_exposed_ms),
                format_ms(p.recompute_hidden_ms), fits]
    return [plan.policy, format_ms(p.step_time_ms), f"{p.tokens_per_s:,.0f}",
            f"{p.model_tflops_per_device:.1f}", per_stage(p.peak_activation_bytes, unit), peak,
            format_ms(p.recompute_exposed_ms), format_ms(p.recompute_hidden_ms), fits,
            f"{plan.planner_ms:,.1f}"]


def _headers(wide: bool, unit: str) -> list[str]:
    return [c.format(u=unit) for c in (WIDE if wide else NARROW)]


def best_fitting(plans: Sequence[Plan]) -> Plan | None:
    """The fastest plan that fits its budget, if any."""
    fitting = [p for p in plans if p.predicted.fits_budget]
    return min(fitting, key=lambda p: p.predicted.step_time_ms, default=None)


def _faster(best: Plan, other: Plan) -> str:
    ratio = other.predicted.step_time_ms / best.predicted.step_time_ms
    if ratio < 1.0005:
        return f"as fast as {other.policy}"
    if ratio < 1.1:  # small gains read better as a percentage
        return f"{100 * (ratio - 1):.1f}% faster than {other.policy}"
    return f"{ratio:.2f}x faster than {other.policy}"


def _family(policy: str) -> str:
    return policy.rsplit(":", 1)[-1].split("-")[0]


def headline(plans: Sequence[Plan]) -> str | None:
    """`lynx-heu 3,070.9 ms: 2.0% faster than selective, 1.44x faster than full`: the fastest
    fitting plan against the best fitting plan of another family (the strongest baseline) and
    against Megatron full recompute; None when nothing fits."""
    best = best_fitting(plans)
    if best is None or best.predicted.step_time_ms <= 0:
        return None
    rivals = sorted((p for p in plans if p is not best and p.predicted.fits_budget
                     and _family(p.policy) != _family(best.policy)),
                    key=lambda p: p.predicted.step_time_ms)
    named = rivals[:1] + [p for p in rivals[1:] if p.policy == "full"]
    text = f"{best.policy} {format_ms(best.predicted.step_time_ms)} ms"
    if not named:
        return f"{text}: the only policy family that fits the budget"
    return f"{text}: " + ", ".join(_faster(best, p) for p in named)


def plans_table(plans: Sequence[Plan], title: str = "", wide: bool = False) -> Table:
    """A rich table, one row per plan; the fastest fitting plan in bold green, misfits in red."""
    unit = memory_unit(plans)
    table = Table(title=title or None, title_justify="left")
    for name, raw in zip(_headers(wide, unit), WIDE if wide else NARROW):
        table.add_column(name, justify="left" if raw in _LEFT else "right", overflow="fold")
    best = best_fitting(plans)
    for plan in plans:
        style = ("bold green" if plan is best else
                 "" if plan.predicted.fits_budget else "red")
        table.add_row(*plan_row(plan, unit, wide), style=style)
    return table


def plans_markdown(plans: Sequence[Plan]) -> str:
    """A GitHub Markdown table of every column, one row per plan."""
    unit = memory_unit(plans)
    align = [":---" if c in _LEFT else "---:" for c in WIDE]
    lines = ["| " + " | ".join(_headers(True, unit)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(plan_row(plan, unit)) + " |" for plan in plans]
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
        "chosen_from": plan.chosen_from,
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
            f"budget {format_size(budget_bytes)}/device")
