"""One rank of the emulated-overlap benchmark (`emulated_overlap.py` starts one per namespace).

    python benchmarks/overlap_rank.py JOB.json OUT.json      # RANK, WORLD_SIZE, MASTER_ADDR set

JOB.json: {"plans": [plan.json paths], "rounds": R, "warmup": W, "steps": S, "seed": N,
"timeout_s": T, "ops_job": optional ProfileJob path, "ops_dir": where its timings go}. The ranks join one gloo world over the emulated links and run every plan in
the same process group, round-robin (plan order reversed every other round, so a slow drift of
the shared machine hits all plans alike): per round and plan, W warm-up steps then S measured
ones. Per measured step, the slowest rank's step time is what counts (MAX all-reduce), and
each rank's in-loop section timers are kept beside it: forward, backward, RECV waits (after
their window's tasks), SEND completion, the DP/SP sync and the optimizer, plus hidden/exposed
recompute and the activation peak. With "ops_job", after every round all ranks time their
ops again at once (`lynxpipe.profile.ops_only`, in a child process each, as `profile --measure`
times them): the op times of the same minutes as the round, since a CPU's speed drifts. Rank 0
writes OUT.json: {"ranks": per rank, per plan, the measured steps; "ops": rank 0's op timings,
one per round}.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lynxpipe.plan.types import load_plan
from lynxpipe.runtime.pipeline.executor import StepResult
from lynxpipe.runtime.pipeline.groups import RankLayout, make_groups
from lynxpipe.runtime.train.data import DataSpec, batches
from lynxpipe.runtime.train.worker import setup_rank


def sections(res: StepResult) -> dict[str, float]:
    """In-loop section timers of one rank's step (ms)."""
    out = {"F": 0.0, "B": 0.0, "RECV_wait": 0.0, "SEND": 0.0, "recompute_in_FB": 0.0}
    for t in res.actions:
        kind = t.action.split("(")[0]
        if kind in ("F", "B"):
            out[kind] += t.duration_ms
            out["recompute_in_FB"] += t.recompute_ms
        elif kind.startswith("RECV"):
            out["RECV_wait"] += t.wait_ms
        elif kind.startswith("SEND"):
            out["SEND"] += t.duration_ms
    out.update(step=res.step_ms, pipeline=res.pipeline_ms, dp_sync=res.dp_sync_ms,
               optimizer=res.optimizer_ms, recv_wait=res.recv_wait_ms, send_wait=res.send_wait_ms,
               hidden=1e3 * res.engine.hidden_s, exposed=1e3 * res.engine.exposed_s,
               peak_bytes=float(res.engine.peak_bytes))
    return out


def _slowest(value: float) -> float:
    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def run_plan(plan: Any, groups: Any, job: dict[str, Any], rnd: int) -> list[dict[str, float]]:
    """Warm-up and measured steps of one plan; per measured step: global step time and this
    rank's sections."""
    setup = setup_rank(plan, groups, seed=job["seed"])
    par = plan.parallel
    data = DataSpec("synthetic", job["seed"], plan.model.vocab_size, par.seq_len,
                    par.micro_batch_size, par.num_microbatches, par.dp)
    out = []
    for i in range(job["warmup"] + job["steps"]):
        step = rnd * (job["warmup"] + job["steps"]) + i
        res = setup.executor.run_step(step, batches(data, step, groups.dp_rank))
        global_ms = _slowest(res.step_ms)
        if i >= job["warmup"]:
            out.append({"global_step": global_ms, **sections(res)})
    del setup
    gc.collect()
    return out


def time_ops_now(job: dict[str, Any], rank: int, rnd: int) -> dict[str, Any]:
    """All ranks time their ops at the same moment (the cores as busy as in a step); this
    rank's OpSamples as a dict."""
    out = Path(job["ops_dir"]) / f"ops-r{rank}-{rnd}.json"
    dist.barrier()
    proc = subprocess.run([sys.executable, "-m", "lynxpipe.profile.ops_only", job["ops_job"],
                           str(rank), str(out)], capture_output=True, text=True,
                          timeout=job["timeout_s"])
    if proc.returncode:
        raise RuntimeError(f"rank {rank}: op timing failed: {proc.stderr.strip()[-400:]}")
    dist.barrier()
    return json.loads(out.read_text())


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(1)  # one core per rank, as `lynxpipe train` runs
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=job["timeout_s"]))
    plans = [load_plan(p) for p in job["plans"]]
    par = plans[0].parallel
    groups = make_groups(RankLayout(par.tp, par.pp, par.dp), job["timeout_s"])
    assert groups is not None
    steps: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(plans))}
    ops: list[dict[str, Any]] = []
    for rnd in range(job["rounds"]):
        order = list(range(len(plans)))
        for i in order if rnd % 2 == 0 else reversed(order):
            steps[i] += run_plan(plans[i], groups, job, rnd)
        if job.get("ops_job"):
            ops.append(time_ops_now(job, rank, rnd))
        if rank == 0:
            done = statistics.median(s["global_step"] for i in steps for s in steps[i])
            print(json.dumps({"round": rnd + 1, "of": job["rounds"], "median_ms": done}),
                  flush=True)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, steps)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered, "ops": ops}))
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
