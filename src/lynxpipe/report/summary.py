"""A readable multi-line summary of one plan: stages, keep/drop sets, recompute placement."""

from __future__ import annotations

from collections import Counter

from lynxpipe.cost.table import boundary_bytes
from lynxpipe.plan.types import Plan
from lynxpipe.report.tables import per_stage, setup_line
from lynxpipe.schedule.policy import LayerPolicy, stage_layers
from lynxpipe.schedule.windows import ON_DEMAND, display_order
from lynxpipe.units import format_ms, format_size, in_unit, size_unit

# Order in which window kinds are listed: earliest in the step first, exposed last.


def layer_runs(layers: tuple[LayerPolicy, ...]) -> list[tuple[int, int, LayerPolicy]]:
    """Maximal runs of identical consecutive layer policies as (first, last, policy)."""
    runs: list[tuple[int, int, LayerPolicy]] = []
    for index, policy in enumerate(layers):
        if runs and runs[-1][2] == policy and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index, policy)
        else:
            runs.append((index, index, policy))
    return runs


def _span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def recompute_counts(plan: Plan) -> list[Counter[str]]:
    """Per pipeline rank: how many R actions are pinned to each window kind."""
    counts: list[Counter[str]] = []
    for actions in plan.order.ranks:
        counts.append(Counter(a.window.kind if a.window else ON_DEMAND
                              for a in actions if a.kind == "R"))
    return counts


def _stage_lines(plan: Plan) -> list[str]:
    parts = "/".join(str(n) for n in plan.partition)
    lines = [f"stages (layers per stage): {parts}"]
    if plan.order.virtual_stages > 1:
        ranks = [f"s{s}->rank {plan.order.rank_of(s)}" for s in range(len(plan.partition))]
        lines.append("  virtual stages: " + ", ".join(ranks))
    return lines


def _layer_lines(plan: Plan) -> list[str]:
    stage_of = {g: s for s, rng in enumerate(stage_layers(plan.partition)) for g in rng}
    lines = ["kept / dropped per layer:"]
    for first, last, policy in layer_runs(plan.layers):
        stages = sorted({stage_of[first], stage_of[last]})
        where = "-".join(str(s) for s in stages)
        lines.append(f"  {_span(first, last)} (stage {where}): {policy.label()}")
    return lines


def _recompute_lines(plan: Plan) -> list[str]:
    counts = recompute_counts(plan)
    if not any(counts):
        return ["recompute: none"]
    lines = ["recompute tasks per rank (window kind x count; hidden / exposed time):"]
    for rank, (count, stats) in enumerate(zip(counts, plan.predicted.ranks)):
        kinds = sorted(count, key=display_order)
        where = ", ".join(f"{k} x{count[k]}" for k in kinds) or "none"
        lines.append(f"  rank {rank}: {where}; hidden {format_ms(stats.recompute_hidden_ms)} "
                     f"ms, exposed {format_ms(stats.recompute_exposed_ms)} ms")
    return lines


def _prediction_lines(plan: Plan) -> list[str]:
    p = plan.predicted
    fits = "fits" if p.fits_budget else "DOES NOT FIT"
    reserve = plan.reserve_bytes
    unit = size_unit(max(p.peak_memory_bytes, default=0))[0]
    lines = [
        f"predicted step time {format_ms(p.step_time_ms)} ms, {p.tokens_per_s:,.0f} tokens/s, "
        f"{p.model_tflops_per_device:.1f} model TFLOP/s per device",
        f"peak memory per pipeline rank ({unit}): {per_stage(p.peak_memory_bytes, unit)} "
        f"(activations {per_stage(p.peak_activation_bytes, unit)}"
        f"{f', reserve {in_unit(reserve, unit)}' if reserve else ''}); "
        f"budget {format_size(plan.budget_bytes)}: {fits}",
        f"recompute exposed {format_ms(p.recompute_exposed_ms)} ms, hidden "
        f"{format_ms(p.recompute_hidden_ms)} ms (slowest rank)",
    ]
    if plan.recv_ahead and plan.parallel.pp > 1:
        ahead = boundary_bytes(plan.model, plan.parallel)
        lines.append(f"each pipeline receive is posted one RECV ahead (gloo moves a message "
                     f"only once it is posted): {format_size(ahead)} of static memory per rank")
    gap = f", MIP gap {plan.mip_gap:.2%}" if plan.mip_gap is not None else ""
    won = f"; chosen from {plan.chosen_from}" if plan.chosen_from else ""
    lines.append(f"planner time {plan.planner_ms:,.1f} ms{gap}{won}; costs: {plan.cost_source}")
    return lines


def plan_summary_text(plan: Plan) -> str:
    """Everything a user needs to judge a plan, in about a screenful."""
    lines = [f"policy {plan.policy} - "
             + setup_line(plan.model, plan.cluster, plan.parallel, plan.budget_bytes)]
    lines += _stage_lines(plan) + _layer_lines(plan) + _recompute_lines(plan)
    lines += _prediction_lines(plan)
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
