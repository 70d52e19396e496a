"""Reports: Chrome trace, PNG plots, tables, JSON summary and the text summary of a plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.report.plot import plot_compare, plot_timeline
from lynxpipe.report.summary import layer_runs, plan_summary_text, recompute_counts
from lynxpipe.report.tables import (
    NARROW,
    WIDE,
    headline,
    plan_json_summary,
    plans_markdown,
    plans_table,
)
from lynxpipe.report.trace import CATEGORIES, STREAMS, chrome_trace, write_trace
from lynxpipe.schedule.policy import FULL, KEEP_ALL, LayerPolicy
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.result import SimResult
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"policy", "step_time_ms", "tokens_per_s", "model_tflops_per_device",
                "peak_memory_bytes", "peak_activation_bytes", "recompute_exposed_ms",
                "recompute_hidden_ms", "fits_budget", "planner_ms", "mip_gap"}


def _request(reserve: int = 0) -> PlanRequest:
    # explicit attention: `selective` then recomputes something (fused leaves it nothing)
    model = replace(get_model("gpt-tiny"), attention="explicit", attention_dropout=0.1)
    cluster = get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, seq_len=128)
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=cluster.device_memory_bytes,
                       costs=analytic_costs(model, cluster, par), reserve_bytes=reserve)


@pytest.fixture(scope="module")
def plans() -> list[Plan]:
    req = _request()
    return [make(name, req) for name in ("none", "full", "selective")]


@pytest.fixture(scope="module")
def traced(plans: list[Plan]) -> SimResult:
    plan = plans[2]
    return simulate(_request().costs, plan.partition, plan.layers, plan.order, trace=True)


def test_chrome_trace_structure(traced: SimResult) -> None:
    trace = json.loads(json.dumps(chrome_trace(traced)))  # JSON-clean
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(traced.events) > 0
    assert {e["pid"] for e in complete} == set(range(len(traced.ranks)))
    assert {e["tid"] for e in complete} <= set(STREAMS.values())
    assert {e["cat"] for e in complete} <= set(CATEGORIES)
    assert {"forward", "backward", "recompute_exposed"} <= {e["cat"] for e in complete}
    for e in complete:
        assert e["ts"] >= 0 and e["dur"] > 0
    end_us = max(e["ts"] + e["dur"] for e in complete)
    assert end_us == pytest.approx(traced.step_time_ms * 1e3, rel=1e-9)
    counters = [e for e in events if e["ph"] == "C"]
    assert {e["pid"] for e in counters} == set(range(len(traced.ranks)))
    names = {(e["pid"], e.get("tid"), e["args"]["name"]) for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert (0, 0, "compute") in names and (0, 1, "comm") in names


def test_trace_counters_follow_memory_timeline(traced: SimResult) -> None:
    counters = [e for e in chrome_trace(traced)["traceEvents"] if e["ph"] == "C" and e["pid"] == 0]
    peak_gib = max(e["args"]["activations"] for e in counters)
    assert peak_gib == pytest.approx(traced.ranks[0].peak_activation_bytes / 2**30, abs=1e-4)
    assert [e["ts"] for e in counters] == sorted(e["ts"] for e in counters)


def test_write_trace_and_plots(tmp_path, plans: list[Plan], traced: SimResult) -> None:
    path = write_trace(tmp_path / "sub" / "trace.json", traced)
    assert "traceEvents" in json.loads(path.read_text())
    png = plot_timeline(traced, tmp_path / "t.png", "title", budget_bytes=2**30)
    assert png.read_bytes()[:8] == PNG_MAGIC
    rows = [plan_json_summary(p) for p in plans]
    rows[0] = {**rows[0], "fits_budget": False}  # the hatched "over budget" style is drawn too
    assert plot_compare(rows, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_json_summary(plans: list[Plan]) -> None:
    for plan in plans:
        summary = json.loads(json.dumps(plan_json_summary(plan)))
        assert SUMMARY_KEYS <= set(summary)
        assert summary["policy"] == plan.policy
        assert len(summary["peak_memory_bytes"]) == plan.parallel.pp
        assert len(summary["peak_activation_bytes"]) == plan.parallel.pp
        assert summary["step_time_ms"] == plan.predicted.step_time_ms


def test_tables_have_one_row_per_plan(plans: list[Plan]) -> None:
    table = plans_table(plans, "t")
    assert table.row_count == len(plans) and len(table.columns) == len(NARROW)
    assert len(plans_table(plans, wide=True).columns) == len(WIDE)
    lines = plans_markdown(plans).strip().splitlines()
    assert len(lines) == 2 + len(plans)
    assert all(line.count("|") == len(WIDE) + 1 for line in lines)
    # per-stage activation column, e.g. "1.3/0.9"
    assert all(cell.count("/") == 1 for cell in
               (line.split("|")[5].strip() for line in lines[2:]))


def test_reserve_is_recovered_from_a_plan() -> None:
    req = _request(reserve=3 * 2**30)
    assert make("none", req).reserve_bytes == 3 * 2**30
    assert make("none", _request()).reserve_bytes == 0


def test_layer_runs_group_identical_neighbours() -> None:
    sel = LayerPolicy(dropped=frozenset({"probs"}))
    layers = (FULL, FULL, sel, sel, sel, KEEP_ALL, sel)
    assert [(a, b) for a, b, _ in layer_runs(layers)] == [(0, 1), (2, 4), (5, 5), (6, 6)]
    assert layer_runs(()) == []


def test_summary_text(plans: list[Plan]) -> None:
    none, full, selective = plans
    text = plan_summary_text(selective)
    assert "stages (layers per stage): 2/2" in text
    assert "layers 0-3 (stage 0-1): drop probs,probs_dropped" in text
    assert "on_demand x" in text and "predicted step time" in text
    assert "recompute: none" in plan_summary_text(none)
    assert "layers 0-3 (stage 0-1): full" in plan_summary_text(full)
    counts = recompute_counts(selective)
    assert sum(sum(c.values()) for c in counts) == 4 * 4  # 4 micro-batches x 4 layers, 1 segment
    over = replace(none, budget_bytes=1)
    assert "DOES NOT FIT" in plan_summary_text(replace(
        over, predicted=replace(over.predicted, fits_budget=False)))


def _timed(plan: Plan, policy: str, step_ms: float, fits: bool = True) -> Plan:
    return replace(plan, policy=policy,
                   predicted=replace(plan.predicted, step_time_ms=step_ms, fits_budget=fits))


def test_headline_names_the_strongest_fitting_baseline_and_full(plans: list[Plan]) -> None:
    base = plans[0]
    rows = [_timed(base, "none", 2900.0, fits=False), _timed(base, "full", 4422.1),
            _timed(base, "selective", 3132.3), _timed(base, "checkmate", 3200.0),
            _timed(base, "lynx-opt", 3080.0), _timed(base, "lynx-heu", 3070.9)]
    assert headline(rows) == ("lynx-heu 3,070.9 ms: 2.0% faster than selective, "
                              "1.44x faster than full")
    assert headline([_timed(base, "full", 10.0), _timed(base, "none", 5.0)]) == (
        "none 5 ms: 2.00x faster than full")
    assert headline([_timed(base, "lynx-heu", 5.0), _timed(base, "lynx-opt", 5.0)]) == (
        "lynx-heu 5 ms: the only policy family that fits the budget")
    assert headline([_timed(base, "none", 5.0, fits=False)]) is None


def test_memory_reads_in_a_scaled_unit(plans: list[Plan]) -> None:
    """gpt-tiny peaks at a few MiB: the table says MiB, with figures that are not 0.0."""
    header = [c.header for c in plans_table(plans).columns]
    assert "peak MiB" in header and "peak GiB" not in header
    cells = list(plans_table(plans).columns[header.index("peak MiB")].cells)
    assert all(float(c) > 0.5 for c in cells)
    text = plan_summary_text(plans[0])
    assert "(MiB)" in text and " 0.0/" not in text
