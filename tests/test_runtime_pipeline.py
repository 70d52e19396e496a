"""The pipeline executor and `lynxpipe train` on CPU/gloo, dropout on (SPEC §7).

One launch of 8 ranks runs every layout side by side (TP 1/2 x PP 1/2/4; 1F1B, GPipe,
interleaved; DP 2; fused attention, and explicit attention on one layout): for every policy (none, full, selective, checkmate, lynx-heu, lynx-opt),
3 training steps give losses and parameters bitwise equal to `none`, every planned recompute
task runs exactly once in the window kind the plan gave it, and the meter's activation peak
stays within the plan's prediction plus `slack_bytes` (receive buffers the planner does not
count) and within 10% of it. Then the CLI: resume gives the same loss curve, a crashed or hung
rank ends the job naming it, no process outlives the launcher, and (as root) a run inside the
emulated cluster.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from lynxpipe.cost.table import analytic_costs, boundary_bytes
from lynxpipe.plan.planners import PLANNERS, make
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster
from lynxpipe.specs.model import MODEL_PRESETS

MODEL = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], dtype_bytes=4)  # fp32 CPU runtime
CLUSTER = get_cluster("a100-pcie")
WORLD = 8
PEAK_TOLERANCE = 0.10


@dataclass(frozen=True)
class Config:
    """A layout placed on world ranks base .. base + tp*pp*dp - 1."""

    tp: int
    pp: int
    dp: int
    base: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    attention: str = "fused"
    recv_ahead: bool = False
    """Plan from costs whose receives are posted one RECV ahead (measured gloo profiles)."""


# configurations of a phase run side by side on disjoint ranks
PHASES: tuple[tuple[Config, ...], ...] = (
    (Config(2, 4, 1, 0),),
    (Config(1, 4, 1, 0, recv_ahead=True), Config(2, 2, 1, 4, "gpipe")),
    (Config(2, 1, 1, 0, attention="explicit"),
     Config(1, 2, 2, 2, "interleaved", 2, recv_ahead=True),
     Config(1, 1, 1, 6)),
)
POLICIES = [p for p in ("none", "full", "selective", "checkmate", "lynx-heu", "lynx-opt")
            if p in PLANNERS]


def _parallel(cfg: Config) -> ParallelSpec:
    # 4 micro-batches fill the 4-deep tp=1 pipeline; 2 keep the others quick (CPU is the limit)
    return ParallelSpec(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp, micro_batch_size=2,
                        num_microbatches=4 if (cfg.tp, cfg.pp) == (1, 4) else 2, seq_len=64,
                        schedule=cfg.schedule,  # type: ignore[arg-type]
                        virtual_stages=cfg.virtual_stages)


def _model(cfg: Config):  # type: ignore[no-untyped-def]
    if cfg.attention == "fused":
        return MODEL
    return dataclasses.replace(MODEL, attention="explicit", attention_dropout=0.1)


def _plans(cfg: Config) -> dict[str, Plan]:
    """Every policy, under a budget halfway between full's and none's peaks (forces drops)."""
    par, model = _parallel(cfg), _model(cfg)
    costs = dataclasses.replace(analytic_costs(model, CLUSTER, par), recv_ahead=cfg.recv_ahead)
    probe = PlanRequest(model=model, cluster=CLUSTER, parallel=par, budget_bytes=1 << 40, costs=costs, time_limit_s=10)
    none_peak = max(make("none", probe).predicted.peak_memory_bytes)
    full_peak = max(make("full", probe).predicted.peak_memory_bytes)
    req = dataclasses.replace(probe, budget_bytes=(none_peak + full_peak) // 2)
    return {name: make(name, req) for name in POLICIES}


def slack_bytes(plan: Plan, pp_rank: int) -> int:
    """What the meter counts and the planner does not: the stage input, which the executor
    holds until its backward ends while the planner frees it at its last use (the RECV_B
    gradient buffer is in the planner's model)."""
    return boundary_bytes(plan.model, plan.parallel) if plan.parallel.pp > 1 else 0


def _check(plan: Plan, step: int, res, pp_rank: int) -> list[str]:  # type: ignore[no-untyped-def]
    from lynxpipe.runtime.pipeline.from_plan import planned_where

    label = f"{plan.policy} step {step}"
    ran = [((t.mb, t.layer, t.segment), t.where) for t in res.engine.tasks]
    problems = []
    if len({k for k, _ in ran}) != len(ran):
        problems.append(f"{label}: a task ran twice: {sorted(k for k, _ in ran)}")
    if dict(ran) != planned_where(plan, pp_rank):
        problems.append(f"{label}: ran {sorted(dict(ran).items())}, planned "
                        f"{sorted(planned_where(plan, pp_rank).items())}")
    if res.engine.missed:
        problems.append(f"{label}: windows never opened: {res.engine.missed}")
    recvs = sum(a.kind.startswith("RECV") for a in plan.order.ranks[pp_rank])
    if res.posted_ahead != (recvs if plan.recv_ahead else 0):  # gloo: no SEND/RECV pairs
        problems.append(f"{label}: {res.posted_ahead} of {recvs} receives posted ahead "
                        f"(recv_ahead={plan.recv_ahead})")
    on_demand = sum(t.time_s for t in res.engine.tasks if t.where == "on_demand")
    if abs(on_demand - res.engine.exposed_s) > 1e-9:
        problems.append(f"{label}: exposed time is not the on-demand tasks' time")
    peak, want = res.engine.peak_bytes, plan.predicted.peak_activation_bytes[pp_rank]
    if peak > want + slack_bytes(plan, pp_rank) or abs(peak / want - 1) > PEAK_TOLERANCE:
        problems.append(f"{label}: activation peak {peak} B, predicted {want} B "
                        f"(+{slack_bytes(plan, pp_rank)} B slack)")
    return problems


def _run_config(cfg: Config, groups, plans: dict[str, Plan]) -> tuple[list[str], list]:  # type: ignore[no-untyped-def]
    from lynxpipe.runtime.train.data import DataSpec, batches
    from lynxpipe.runtime.train.worker import setup_rank

    problems, memory, ref = [], [], None
    for name, plan in plans.items():
        setup = setup_rank(plan, groups, seed=7)
        par = plan.parallel
        data = DataSpec("synthetic", 7, MODEL.vocab_size, par.seq_len, par.micro_batch_size,
                        par.num_microbatches, par.dp)
        losses = []
        for step in range(3):
            res = setup.executor.run_step(step, batches(data, step, groups.dp_rank))
            losses.append(res.losses)
            problems += _check(plan, step, res, groups.pp_rank)
        memory.append((name, groups.pp_rank, res.engine.peak_bytes,
                       plan.predicted.peak_activation_bytes[groups.pp_rank]))
        params = [p.detach().clone() for s in sorted(setup.chunks)
                  for p in setup.chunks[s].parameters()]
        if ref is None:
            ref = (losses, params)
        elif losses != ref[0] or not all(torch.equal(a, b) for a, b in zip(ref[1], params)):
            problems.append(f"{name}: losses or parameters differ from none after 3 steps")
        del setup
        gc.collect()
    where = (f"[tp={cfg.tp} pp={cfg.pp} dp={cfg.dp} {cfg.schedule} {cfg.attention} "
             f"rank {groups.rank}]")
    return [f"{where} {p}" for p in problems], memory


def _share_plans() -> dict[Config, dict[str, Plan]]:
    """Each rank plans some configurations (the MILPs take seconds), then all share them."""
    configs = [cfg for phase in PHASES for cfg in phase]
    mine = {cfg: _plans(cfg) for i, cfg in enumerate(configs) if i % WORLD == dist.get_rank()}
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    return {cfg: plans for part in gathered for cfg, plans in part.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    from lynxpipe.runtime.pipeline.groups import RankLayout, make_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90),
                            init_method=f"tcp://127.0.0.1:{port}")
    plans = _share_plans()
    mine = {}
    for phase in PHASES:  # every process creates every group, in the same order
        for cfg in phase:
            mine[cfg] = make_groups(RankLayout(cfg.tp, cfg.pp, cfg.dp, cfg.base), 90)
    problems, memory = [], []
    forced = all(any(a.kind == "R" for r in p["lynx-heu"].order.ranks for a in r)
                 for p in plans.values())
    if not forced:
        problems.append("the budgets must force recomputation (lynx-heu plans have no R)")
    try:
        for phase in PHASES:
            for cfg in phase:
                if mine[cfg] is not None:
                    found, mem = _run_config(cfg, mine[cfg], plans[cfg])
                    problems += found
                    memory += [(dataclasses.astuple(cfg), *m) for m in mem]
    except Exception as exc:  # noqa: BLE001 - report instead of hanging the other ranks' assertions
        problems.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    mine.clear()
    gc.collect()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"problems": problems,
                                                             "memory": memory}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_policy_and_layout_is_bitwise_equal_counted_and_metered(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # fork: torch is already imported here; 8 spawned interpreters would each import it again
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                       start_method="fork")
    problems, memory = [], []
    for rank in range(WORLD):
        payload = json.loads((tmp_path / f"rank{rank}.json").read_text())
        problems += payload["problems"]
        memory += payload["memory"]
    assert problems == []
    covered = {(tuple(m[0])[:2], m[1]) for m in memory}
    assert {(tp, pp) for (tp, pp), _ in covered} == {(t, p) for t in (1, 2) for p in (1, 2, 4)}
    assert {name for _, name in covered} == set(POLICIES)


def test_launcher_side_imports_no_torch() -> None:
    """`lynxpipe train` plans and launches without torch; only the ranks import it."""
    code = ("import sys, lynxpipe.cli, lynxpipe.cli.train, lynxpipe.runtime.pipeline.launch, "
            "lynxpipe.runtime.train.result\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_adamw_is_torch_adamw_bitwise() -> None:
    from lynxpipe.runtime.train.optim import AdamW

    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    theirs = [p.clone().requires_grad_() for p in ours]
    ours = [p.clone().requires_grad_() for p in ours]
    a = AdamW(ours, lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    state = a.state_dict()
    c = AdamW([p.detach().clone() for p in ours], lr=1e-2, weight_decay=0.1)
    c.load_state_dict(state)
    assert c.steps == 4 and all(torch.equal(x, y) for x, y in zip(c.exp_avg, a.exp_avg))


# --- the command line ----------------------------------------------------------------------

SPECS = ["--model", "gpt-tiny", "--tp", "1", "--pp", "2", "--micro-batch-size", "2",
         "--num-microbatches", "4", "--seq-len", "64", "--budget", "4MiB", "--policy",
         "lynx-heu", "--quiet"]


def _train(*args: str, tmp: Path, env: dict[str, str] | None = None, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    """`lynxpipe train` in a subprocess; its run directory (in every rank's argv) under tmp."""
    cmd = [sys.executable, "-m", "lynxpipe.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "TMPDIR": str(tmp), **(env or {})})


def _leftovers(tmp: Path) -> list[str]:
    """Processes of our runs still alive (their argv names a run directory under tmp) and run
    directories not cleaned up."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True,
                         check=False).stdout
    procs = [line for line in out.splitlines() if str(tmp) in line and "ps -eo" not in line]
    return procs + [str(p) for p in tmp.glob("lynxpipe-run-*")]


def _losses(path: Path) -> list[float]:
    return json.loads(path.read_text())["data"]["losses"]


def test_resume_after_a_crash_gives_the_same_loss_curve(tmp_path: Path) -> None:
    straight = _train(*SPECS, "--steps", "4", "--data", "corpus", "--out",
                      str(tmp_path / "straight.json"), tmp=tmp_path)
    assert straight.returncode == 0, straight.stderr
    ckpt = tmp_path / "ckpt"
    common = [*SPECS, "--data", "corpus", "--checkpoint-dir", str(ckpt), "--checkpoint-every",
              "2", "--timeout", "30"]
    start = time.monotonic()
    crash = _train(*common, "--steps", "4", "--out", str(tmp_path / "crash.json"), tmp=tmp_path,
                   env={"LYNXPIPE_FAULT": "1:2:exit"})
    assert crash.returncode != 0 and time.monotonic() - start < 30
    assert "rank 1 failed in step 2" in crash.stderr and "exit code 3" in crash.stderr
    assert len([ln for ln in crash.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "crash.json").exists()
    latest = json.loads((ckpt / "latest.json").read_text())
    assert (latest["step"], latest["seed"], latest["data"]) == (2, 1234, "corpus")
    assert _leftovers(tmp_path) == []
    resumed = _train(*common, "--steps", "4", "--resume", "--out", str(tmp_path / "resumed.json"),
                     tmp=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((tmp_path / "resumed.json").read_text())["data"]
    assert run["first_step"] == 2
    assert _losses(tmp_path / "resumed.json") == _losses(tmp_path / "straight.json")[2:]


def test_ctrl_c_stops_every_rank_and_names_the_resume_command(tmp_path: Path) -> None:
    import signal

    ckpt = tmp_path / "ck"
    cmd = [sys.executable, "-m", "lynxpipe.cli", "train", *SPECS, "--steps", "500",
           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--out",
           str(tmp_path / "run.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 90
    while not (ckpt / "latest.json").exists() and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: interrupted; the last checkpoint is ") and \
        f"--checkpoint-dir {ckpt}" in line and line.endswith("--resume")
    assert _leftovers(tmp_path) == []


def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    hung = _train(*SPECS, "--steps", "3", "--timeout", "6", "--out", str(tmp_path / "run.json"),
                  tmp=tmp_path, env={"LYNXPIPE_FAULT": "1:1:hang"}, timeout=60)
    elapsed = time.monotonic() - start
    assert hung.returncode != 0
    assert "rank 1 (in step 1 at action" in hung.stderr and "stopped responding" in hung.stderr
    assert elapsed < 6 + 12, elapsed  # 6 s timeout + start-up (imports, rendezvous)
    assert _leftovers(tmp_path) == []


def test_plan_for_other_specs_is_refused_naming_both_values(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lynxpipe.cli import app

    runner = CliRunner()
    plan_path = tmp_path / "plan.json"
    made = runner.invoke(app, ["plan", *SPECS[:-1], "--dtype-bytes", "4", "--out", str(plan_path)])
    assert made.exit_code == 0, made.output
    other = [a if a != "64" else "128" for a in SPECS[:-3]]  # another sequence length
    refused = runner.invoke(app, ["train", "--plan", str(plan_path), *other])
    assert refused.exit_code == 2 and str(plan_path) in refused.stderr
    assert "--seq-len gives seq_len=128 but the plan has seq_len=64" in refused.stderr
    assert refused.stderr.count("\n") == 1
    fp16 = runner.invoke(app, ["plan", *SPECS[:-1], "--out", str(tmp_path / "fp16.json")])
    assert fp16.exit_code == 0, fp16.output
    refused = runner.invoke(app, ["train", "--plan", str(tmp_path / "fp16.json")])
    assert refused.exit_code == 2 and "2-byte activations" in refused.stderr


def _privileged() -> bool:
    from lynxpipe.errors import LynxError
    from lynxpipe.testbed import require_privileges

    try:
        require_privileges()
    except LynxError:
        return False
    return True


@pytest.mark.skipif(not _privileged(), reason="needs root and iproute2 (network namespaces)")
def test_emulated_cluster_smoke(tmp_path: Path) -> None:
    from lynxpipe.testbed import live_namespaces

    before = set(live_namespaces())
    run = _train(*SPECS, "--steps", "1", "--emulate", "500mbit", "--timeout", "60",
                 "--out", str(tmp_path / "run.json"), tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "run.json").read_text())["data"]
    assert data["emulate"] == "500mbit" and len(data["losses"]) == 1
    assert set(live_namespaces()) <= before and _leftovers(tmp_path) == []
