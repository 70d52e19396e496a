"""`lynxpipe export`: Megatron-Core flags parsed back as Megatron would and checked against the
plan they stand for, and the flat JSON listing (torch checkpointing: tests/test_trace.py and
tests/test_hf_blocks.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from typer.testing import CliRunner

from lynxpipe import workflow
from lynxpipe.cli import app
from lynxpipe.cost.table import analytic_costs
from lynxpipe.integrations.flat import flat_listing
from lynxpipe.integrations.megatron import (
    MegatronConfig,
    export_megatron,
    layer_policies,
    layout,
    module_tensors,
    parse_layout,
)
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.specs.model import with_layers
from lynxpipe.units import parse_bytes

runner = CliRunner()


def megatron_args(flags: list[str]) -> argparse.Namespace:
    """The recompute and layout flags as Megatron-LM's argument parser declares them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--recompute-granularity", choices=["full", "selective"])
    parser.add_argument("--recompute-method", choices=["uniform", "block"])
    parser.add_argument("--recompute-num-layers", type=int)
    parser.add_argument("--recompute-modules", nargs="*")
    parser.add_argument("--pipeline-model-parallel-layout")
    return parser.parse_args(flags)


def _plan(policy: str, budget: str, partition: str = "default", attention: str = "fused"):
    model = dataclasses.replace(with_layers(get_model("gpt-1.3b"), 10), attention=attention)
    par = ParallelSpec(tp=2, pp=2, micro_batch_size=1, num_microbatches=8, seq_len=2048)
    req = workflow.build_request(model, get_cluster("a100-pcie"), par,
                                 budget_bytes=parse_bytes(budget), partition=partition,
                                 time_limit_s=5.0)
    return workflow.plan_policy(policy, req), req.costs


@pytest.mark.parametrize("attention, budget, expect", [
    ("fused", "4GiB", ["--recompute-granularity", "selective", "--recompute-modules",
                       "layernorm", "mlp", "--pipeline-model-parallel-layout", "Et*6|t*4L"]),
    ("explicit", "3.5GiB", ["--recompute-granularity", "full", "--recompute-method",
                            "uniform", "--recompute-num-layers", "1"])])
def test_megatron_flags_parse_back_to_the_nearest_plan(attention, budget, expect):
    plan, costs = _plan("lynx-heu", budget, "balanced", attention)
    exp = export_megatron(plan, costs)
    assert exp.config.flags() == expect
    args = megatron_args(exp.config.flags())
    config = MegatronConfig(args.recompute_granularity, args.recompute_method,
                            args.recompute_num_layers,
                            tuple(args.recompute_modules) if args.recompute_modules else None,
                            args.pipeline_model_parallel_layout)
    assert config == exp.config
    fields = exp.config.fields()
    assert fields["recompute_granularity"] == args.recompute_granularity
    partition = (parse_layout(args.pipeline_model_parallel_layout)
                 if args.pipeline_model_parallel_layout else (5, 5))
    assert partition == plan.partition == exp.nearest.partition
    assert layer_policies(config, costs.layer.graph, partition) == exp.nearest.layers
    # the printed costs are the nearest plan's own simulation, all recompute on demand
    again, _ = workflow.resimulate(exp.nearest, costs)
    assert again.predicted.step_time_ms == pytest.approx(exp.nearest.predicted.step_time_ms)
    assert all(a.window is None or a.window.kind == "on_demand"
               for r in exp.nearest.order.ranks for a in r if a.kind == "R")
    assert exp.nearest.predicted.fits_budget
    # what the flags lose: no per-layer choice, no overlap
    assert exp.plan.predicted.step_time_ms < exp.nearest.predicted.step_time_ms


def test_megatron_settings_cover_selective_and_block():
    costs = analytic_costs(get_model("gpt-tiny"), get_cluster("a100-pcie"),
                           ParallelSpec(tp=1, pp=2, seq_len=128))
    graph = costs.layer.graph
    assert module_tensors(graph)["mlp"] == {"fc1_out", "gelu_out"}
    assert module_tensors(graph)["layernorm"] == {"ln1_out", "ln2_out"}
    block = layer_policies(MegatronConfig("full", "block", 1), graph, (3, 1))
    assert [p.full for p in block] == [True, False, False, True]
    sel = layer_policies(MegatronConfig("selective", recompute_modules=("mlp",)), graph, (2, 2))
    assert all(p.dropped == {"fc1_out", "gelu_out"} for p in sel)


@pytest.mark.parametrize("partition", [(3, 5), (4, 4), (1, 2, 3, 2), (7, 1, 1, 7)])
def test_layout_round_trips_in_megatrons_grammar(partition):
    text = layout(partition)
    assert (text is None) == (len(set(partition)) == 1)
    if text is not None:
        assert parse_layout(text) == partition
        assert text.startswith("E") and text.endswith("L")
    assert parse_layout("Et*3|(tt|)*2,t|tL") == (3, 2, 2, 1, 1)


def test_export_cli_megatron_json_and_flat(tmp_path):
    plan, costs = _plan("lynx-heu", "4GiB", "balanced")
    from lynxpipe.plan.types import save_plan

    path = save_plan(tmp_path / "plan.json", plan)
    result = runner.invoke(app, ["export", "--plan", str(path), "--to", "megatron", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    args = megatron_args(shown["flags"])
    assert args.recompute_granularity == shown["transformer_config"]["recompute_granularity"]
    assert shown["lynxpipe"]["step_time_ms"] == pytest.approx(plan.predicted.step_time_ms)
    assert len(shown["megatron"]["peak_memory_bytes"]) == 2
    result = runner.invoke(app, ["export", "--plan", str(path), "--to", "json", "--out",
                                 str(tmp_path / "flat.json")])
    assert result.exit_code == 0, result.output
    flat = json.loads((tmp_path / "flat.json").read_text())
    assert flat == json.loads(json.dumps(flat_listing(plan, costs.layer.graph)))
    for row, pol in zip(flat["layers"], plan.layers):
        assert set(row["drop"]) == set(pol.dropped) or pol.full
    assert len(flat["tasks"]) == sum(1 for r in plan.order.ranks for a in r if a.kind == "R")
    assert {t["kind"] for t in flat["tasks"]} == {"bwd_coll"}  # all hidden in TP collectives
    assert all(t["before"].startswith(("F(", "B(", "RECV")) for t in flat["tasks"])
    bad = runner.invoke(app, ["export", "--plan", str(path), "--to", "deepspeed"])
    assert bad.exit_code == 2 and "megatron, torch, json" in bad.stderr
