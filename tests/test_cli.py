"""The `lynxpipe` command line: outputs, round trips and one-line errors (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lynxpipe.cli import DEFAULTS, app
from lynxpipe.cost.table import analytic_costs, save_profile
from lynxpipe.plan.planners import PLANNERS
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A small layout so that every registered planner (MILPs included) answers in a moment.
SMALL = ["--model", "gpt-tiny", "--tp", "2", "--pp", "2", "--num-microbatches", "4",
         "--seq-len", "128", "--time-limit", "5"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_compare_json_has_one_result_per_policy() -> None:
    result = invoke("compare", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout holds nothing but the JSON
    assert {"model", "cluster", "parallel", "budget_bytes", "results"} <= set(payload)
    assert [r["policy"] for r in payload["results"]] == list(PLANNERS)
    for row in payload["results"]:
        assert {"step_time_ms", "tokens_per_s", "model_tflops_per_device", "peak_memory_bytes",
                "peak_activation_bytes", "recompute_exposed_ms", "recompute_hidden_ms",
                "fits_budget", "planner_ms", "mip_gap"} <= set(row)
        assert len(row["peak_memory_bytes"]) == 2


def test_default_configuration_needs_recomputation() -> None:
    """No spec flags: keeping everything must not fit; under fused attention Megatron selective
    has nothing to drop, so it does not fit either; full and checkmate do."""
    result = invoke("compare", "--json", "--policies", "none,full,selective,checkmate")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"]["name"] == DEFAULTS.model
    assert payload["model"]["attention"] == "fused"
    fits = {r["policy"]: r["fits_budget"] for r in payload["results"]}
    assert fits == {"none": False, "full": True, "selective": False, "checkmate": True}


def test_compare_table_and_out_dir(tmp_path: Path) -> None:
    result = invoke("compare", *SMALL, "--policies", "none,selective", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "selective" in result.stdout and "peak MiB" in result.stdout  # tiny model: MiB
    for name in ("compare.json", "compare.md", "compare.png", "none/trace.json",
                 "selective/timeline.png", "selective/result.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "compare.md").read_text().count("| selective |") == 1


def test_simulate_out_writes_trace_timeline_result(tmp_path: Path) -> None:
    result = invoke("simulate", *SMALL, "--policy", "selective", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "predicted step time" in result.stdout
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    assert (tmp_path / "timeline.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["policy"] == "selective" and summary["model"]["name"] == "gpt-tiny"


def test_plan_then_simulate_plan_round_trip(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    made = invoke("plan", *SMALL, "--policy", "full", "--out", str(plan_path), "--json")
    assert made.exit_code == 0, made.output
    replay = invoke("simulate", "--plan", str(plan_path), "--json")
    assert replay.exit_code == 0, replay.output
    first, again = json.loads(made.stdout), json.loads(replay.stdout)
    assert again["policy"] == "full"
    assert again["step_time_ms"] == pytest.approx(first["step_time_ms"], rel=1e-12)
    assert again["peak_memory_bytes"] == first["peak_memory_bytes"]


def test_plan_says_when_no_recompute_is_needed(tmp_path: Path) -> None:
    result = invoke("plan", *SMALL, "--policy", "selective", "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert "no recomputation needed at this budget" in result.stdout


@pytest.mark.parametrize("args, needles", [
    (["--model", "gpt-nope"], ["gpt-nope"]),
    (["--tp", "3"], ["tp=3", "num_heads"]),
    (["--pp", "64"], ["64", "num_layers"]),
    (["--micro-batch-size", "-1"], ["micro_batch_size=-1"]),
    (["--devices", "7"], ["devices=7"]),
    (["--budget", "40XB"], ["40XB"]),
    (["--schedule", "zigzag"], ["zigzag"]),
    (["--partition", "random"], ["random"]),
    (["--policy", "magic"], ["magic"]),
])
def test_bad_flags_give_one_line_errors(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(invoke("simulate", *args), *needles)


@pytest.mark.parametrize("command", [["simulate"], ["compare"], ["plan", "--out", "x.json"]])
def test_impossible_budget_names_the_smallest_feasible_one(command: list[str]) -> None:
    assert_one_line_error(invoke(*command, "--budget", "10GiB"), "smallest feasible budget")


def test_corrupt_and_wrong_version_plans(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"kind": "lynxpipe.plan", "version": 1, "data": {')
    assert_one_line_error(invoke("simulate", "--plan", str(corrupt)), "corrupt.json")
    good = tmp_path / "good.json"
    assert invoke("plan", *SMALL, "--policy", "none", "--out", str(good)).exit_code == 0
    payload = json.loads(good.read_text())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**payload, "version": 99}))
    assert_one_line_error(invoke("simulate", "--plan", str(wrong)), "version 99")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**payload, "data": {**payload["data"], "partition": 5}}))
    assert_one_line_error(invoke("simulate", "--plan", str(broken)), "broken.json")


def test_profile_for_other_specs_is_refused(tmp_path: Path) -> None:
    model, cluster = get_model("gpt-tiny"), get_cluster("a100-pcie")
    path = save_profile(tmp_path / "profile.json",
                        analytic_costs(model, cluster, ParallelSpec(tp=2, pp=2, seq_len=256)))
    assert_one_line_error(invoke("simulate", *SMALL, "--profile", str(path)), "profile")
    matching = save_profile(tmp_path / "ok.json", analytic_costs(
        model, cluster, ParallelSpec(tp=2, pp=2, num_microbatches=4, seq_len=128)))
    result = invoke("simulate", *SMALL, "--profile", str(matching), "--policy", "none")
    assert result.exit_code == 0, result.output


def test_typer_usage_errors_stay_clean() -> None:
    result = invoke("simulate", "--tp", "abc")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_console_script_prints_one_red_line_and_imports_no_torch() -> None:
    code = ("import sys\nsys.argv = ['lynxpipe', 'simulate', '--tp', '3']\n"
            "import lynxpipe.cli, lynxpipe.report.files, lynxpipe.report.plot\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "lynxpipe.cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: tp=3")


def test_fused_attention_with_attention_dropout_is_refused_before_launch() -> None:
    """The reference runtime does not run it (CPU SDPA would fall back to explicit attention):
    one line with the fix, before any rank starts."""
    result = invoke("train", "--model", "gpt-tiny", "--tp", "1", "--pp", "2", "--seq-len", "64",
                    "--micro-batch-size", "2", "--num-microbatches", "4", "--budget", "64MiB",
                    "--attention-dropout", "0.1", "--steps", "1")
    assert_one_line_error(result, "fused attention with attention_dropout=0.1",
                          "--attention-dropout 0", "--attention explicit")


def test_attention_flag_switches_the_graph(tmp_path: Path) -> None:
    args = ("plan", *SMALL, "--json", "--out", str(tmp_path / "plan.json"))
    fused = json.loads(invoke(*args).stdout)
    explicit = json.loads(invoke(*args, "--attention", "explicit").stdout)
    # explicit attention keeps the s x s probabilities: more memory at the same layout
    assert max(explicit["peak_activation_bytes"]) > max(fused["peak_activation_bytes"])


def test_train_says_when_receives_are_posted_late_on_gloo() -> None:
    import dataclasses

    from lynxpipe.cli.train import late_receive_note
    from lynxpipe.cost.table import analytic_costs
    from lynxpipe.plan.planners import make
    from lynxpipe.plan.types import PlanRequest
    from lynxpipe.specs import ParallelSpec, get_cluster, get_model

    model, clus = get_model("gpt-tiny"), get_cluster("a100-pcie")
    plans = {}
    for pp in (1, 2):
        par = ParallelSpec(tp=1, pp=pp, micro_batch_size=1, num_microbatches=2, seq_len=64)
        plans[pp] = make("none", PlanRequest(model=model, cluster=clus, parallel=par,
                                             budget_bytes=1 << 40,
                                             costs=analytic_costs(model, clus, par)))
    note = late_receive_note(plans[2], "cpu")
    assert note is not None and "analytic costs" in note and "profile --measure" in note
    assert late_receive_note(plans[2], "cuda") is None  # NCCL pairs sends and receives
    assert late_receive_note(plans[1], "cpu") is None  # nothing is received
    assert late_receive_note(dataclasses.replace(plans[2], recv_ahead=True), "cpu") is None
