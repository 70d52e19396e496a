"""Issue 12: every bad input gets one clear line (exit 2), `train` respects the machine, and the
output fits a person. The bad inputs themselves live in `hardening_cases` (they also seed the
CLI fuzz test); nothing here starts a rank: `launch` is replaced by a recorder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hardening_cases import ERROR_CASES, PLAN_SPECS, make_files, resolve
from typer.testing import CliRunner

from lynxpipe.artifact import file_mode
from lynxpipe.cli import app
from lynxpipe.cost.table import analytic_costs
from lynxpipe.errors import LynxError
from lynxpipe.runtime.train import preflight
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def assert_one_line_error(result: Any, *words: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("cases"))


@pytest.fixture(autouse=True)
def launched(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`lynxpipe train` jobs that passed every check (recorded, never started)."""
    jobs: list[Any] = []
    monkeypatch.setattr("lynxpipe.runtime.pipeline.launch.launch",
                        lambda job, emulate="": jobs.append(job))

    def no_cluster(cluster: Any) -> Any:
        raise AssertionError(f"a test tried to bring up {cluster}")
    monkeypatch.setattr("lynxpipe.testbed.netns.up", no_cluster)
    return jobs


@pytest.mark.parametrize("argv, words", ERROR_CASES,
                         ids=[" ".join(a)[:60] for a, _ in ERROR_CASES])
def test_bad_input_gets_one_line_error(files: dict[str, Path], launched: list[Any],
                                       argv: tuple[str, ...], words: tuple[str, ...]) -> None:
    assert_one_line_error(runner.invoke(app, resolve(argv, files)), *words)
    assert launched == []


def test_simulate_reports_a_plan_over_its_budget_that_train_refuses(
        files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["simulate", "--plan", str(files["plan_over_budget"])])
    assert result.exit_code == 0, result.output
    assert "DOES NOT FIT" in result.stdout


def test_a_valid_plan_runs_everywhere(files: dict[str, Path], launched: list[Any]) -> None:
    plan = str(files["plan"])
    for argv in (["simulate", "--plan", plan], ["simulate", "--plan", plan, "--tp", "2"],
                 ["compare", "--plan", plan, "--policies", "none,full"],
                 ["train", "--plan", plan, "--quiet", "--out", str(files["out"] / "r.json")]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    assert len(launched) == 1 and launched[0].plan.policy == "lynx-heu"


def test_train_without_flags_is_cpu_sized(launched: list[Any], tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--quiet", "--out", str(tmp_path / "run.json")])
    assert result.exit_code == 0, result.output
    (job,) = launched
    assert job.plan.model.name == "gpt-tiny" and job.plan.parallel.devices == 2
    assert sum(preflight.host_bytes_per_rank(job.plan)) < 1 << 30
    assert job.plan.layers != tuple(type(job.plan.layers[0])() for _ in job.plan.layers)


def test_host_memory_of_all_ranks_is_checked_before_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 24 << 30)
    result = runner.invoke(app, ["train", "--model", "gpt-1.3b", "--tp", "2", "--pp", "2",
                                 "--budget", "40GiB", "--attention-dropout", "0", "--force"])
    line = assert_one_line_error(result, "4 CPU ranks needs about", "24.00 GiB is available",
                                 "--model gpt-tiny")
    assert "GiB of host memory" in line


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None,
                    reason="needs torch to ask about CUDA")
def test_cuda_without_a_device_is_refused_before_launch() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(runner.invoke(app, ["train", "--device", "cuda"]),
                          "no CUDA device", "--device cpu")


def test_missing_torch_is_named_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    for argv in (["train"], ["profile", "--measure", "--model", "gpt-tiny", "--tp", "1",
                             "--pp", "1", "--seq-len", "64"]):
        assert_one_line_error(runner.invoke(app, argv), "torch, which is not installed",
                              "pip install")


def test_a_broken_torch_is_one_line_naming_the_import_error(tmp_path: Path) -> None:
    """torch present but failing to import: the fork server reports it as rank 0's error,
    not as a traceback followed by a misleading `killed by SIGKILL`."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this torch is broken')\n")
    env = {**os.environ, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(fake.parent), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "lynxpipe.cli", "train", "--steps", "1",
                           "--quiet", "--out", str(tmp_path / "run.json")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "this torch is broken" in proc.stderr and "SIGKILL" not in proc.stderr


# --- resume -----------------------------------------------------------------------------

def _checkpoint(tmp_path: Path, launched: list[Any], **values: Any) -> Path:
    """A checkpoint directory as a finished run of the default job would leave it."""
    ck = tmp_path / "ck"
    result = runner.invoke(app, ["train", "--quiet", "--checkpoint-dir", str(ck),
                                 "--checkpoint-every", "1", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    plan = launched.pop().plan
    run = {"seed": 1234, "data": "synthetic", "lr": 1e-3, **values}
    meta = preflight.meta_json(plan, 2, run["seed"], run["data"], run["lr"])
    (ck / "latest.json").write_text(json.dumps(meta))
    return ck


def _resume(ck: Path, *extra: str) -> Any:
    return runner.invoke(app, ["train", "--quiet", "--checkpoint-dir", str(ck), "--resume",
                               "--steps", "4", "--out", str(ck.parent / "r.json"), *extra])


@pytest.mark.parametrize("flag, value, old", [("--seed", "7", "1234"),
                                               ("--data", "corpus", "synthetic"),
                                               ("--lr", "0.01", "0.001")])
def test_resume_with_other_run_values_is_refused(tmp_path: Path, launched: list[Any],
                                                 flag: str, value: str, old: str) -> None:
    ck = _checkpoint(tmp_path, launched)
    assert_one_line_error(_resume(ck, flag, value), f"{flag} {old}", f"{flag} {value}",
                          "--allow-changes")
    allowed = _resume(ck, flag, value, "--allow-changes")
    assert allowed.exit_code == 0, allowed.output
    assert f"note: resuming with {flag} {old} -> {value}" in allowed.stderr
    assert len(launched) == 1 and launched[0].resume


def test_resume_notes_budget_and_cluster_changes(tmp_path: Path, launched: list[Any]) -> None:
    ck = _checkpoint(tmp_path, launched)
    result = _resume(ck, "--budget", "5MiB", "--cluster", "a100-nvlink")
    assert result.exit_code == 0, result.output
    assert "note: budget 4.00 MiB -> 5.00 MiB" in result.stderr
    assert "note: cluster a100-pcie -> a100-nvlink" in result.stderr
    assert_one_line_error(_resume(ck, "--pp", "1", "--budget", "8MiB"),
                          "another model, layout or partition")
    assert_one_line_error(_resume(ck, "--steps", "2"), "--steps > 2")


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launched: list[Any]) -> None:
    ck = _checkpoint(tmp_path, launched)

    def interrupted(job: Any, emulate: str = "") -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr("lynxpipe.runtime.pipeline.launch.launch", interrupted)
    result = runner.invoke(app, ["train", "--checkpoint-dir", str(ck), "--checkpoint-every",
                                 "1", "--steps", "9", "--seed", "1234"])
    line = assert_one_line_error(result, "interrupted", str(ck / "step-00000002"),
                                 "(step 2 of 9)", code=130)
    assert line.endswith(f"lynxpipe train --steps 9 --seed 1234 --checkpoint-dir {ck} "
                         f"--checkpoint-every 1 --resume")
    assert_one_line_error(runner.invoke(app, ["train", "--out", str(tmp_path / "r.json")]),
                          "before any checkpoint", "--checkpoint-dir", code=130)


def test_check_resume_on_an_old_checkpoint(tmp_path: Path) -> None:
    """A latest.json from before the values were recorded: resumable, with a note."""
    model = get_model("gpt-tiny")
    (tmp_path / "latest.json").write_text('{"step": 1}')
    from lynxpipe.plan.planners import make
    from lynxpipe.plan.types import PlanRequest

    par = ParallelSpec(pp=2, num_microbatches=2, seq_len=64)
    cluster = get_cluster("a100-pcie")
    plan = make("none", PlanRequest(model=model, cluster=cluster, parallel=par,
                                    budget_bytes=1 << 30,
                                    costs=analytic_costs(model, cluster, par)))
    notes = preflight.check_resume(tmp_path, plan, 3, {"seed": 1, "data": "x", "lr": 1.0},
                                   False)
    assert notes and "records no seed" in notes[0]
    with pytest.raises(LynxError, match="no checkpoint"):
        preflight.check_resume(tmp_path / "none", plan, 3, {}, False)


# --- output -----------------------------------------------------------------------------

def test_compare_fits_100_columns_and_wide_has_every_column() -> None:
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert "lynx-heu" in result.stdout and "faster than full" in result.stdout
    wide = runner.invoke(app, ["compare", "--wide", "--policies", "none,full"])
    assert wide.exit_code == 0 and "planner (ms)" in wide.stdout


def test_version_and_help_without_bool() -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("lynxpipe ")
    for command in (["--help"], ["simulate", "--help"], ["compare", "--help"],
                    ["train", "--help"], ["profile", "--help"], ["cluster", "down", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "<bool>" not in result.stdout, command
        assert "--help" in result.stdout


def test_written_json_files_are_readable_by_others(tmp_path: Path) -> None:
    expect = file_mode()
    assert expect == 0o666 & ~_umask()
    result = runner.invoke(app, ["plan", *PLAN_SPECS, "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", *PLAN_SPECS, "--policies", "full",
                                 "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    written = [tmp_path / "plan.json", tmp_path / "cmp" / "compare.json",
               tmp_path / "cmp" / "full" / "result.json"]
    assert all(p.stat().st_mode & 0o777 == expect for p in written)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_timeline_marks_recompute_ticks_the_top_panel_and_names_the_costs(
        monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], tmp_path: Path) -> None:
    from lynxpipe.report import plot

    figures: list[Any] = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figures.append(fig) or Path(path))
    result = runner.invoke(app, ["simulate", "--plan", str(files["plan"]), "--out",
                                 str(tmp_path)])
    assert result.exit_code == 0, result.output
    (fig,) = figures
    top = fig.axes[0]
    assert "costs: analytic, a100-pcie" in fig._suptitle.get_text()
    fig.canvas.draw()
    assert any(t.get_visible() and t.get_text() for t in top.get_xticklabels())
    marks = sum(len(c.get_offsets()) for c in top.collections if c.get_offsets().shape[1:] == (2,)
                and len(c.get_offsets()) and getattr(c, "get_sizes", lambda: [])().size)
    assert marks >= 12  # the plan's 12 recompute tasks, each marked above its rank


def test_measured_costs_are_named_in_titles() -> None:
    import dataclasses

    costs = analytic_costs(get_model("gpt-tiny"), get_cluster("a100-pcie"), ParallelSpec())
    assert costs.label("a100-pcie") == "analytic, a100-pcie"
    measured = dataclasses.replace(costs, source="measured", device="cpu")
    assert measured.label("a100-pcie") == "measured profile, cpu"


def test_readme_documents_the_measured_workflow_and_cluster_verbs() -> None:
    text = README.read_text()
    for needle in ("lynxpipe profile --measure", "--profile profile.json", "lynxpipe train",
                   "lynxpipe cluster up", "lynxpipe cluster status", "lynxpipe cluster down",
                   "--allow-changes", "--wide"):
        assert needle in text, needle
