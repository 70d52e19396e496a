"""One training rank: build the plan's chunks, engine and optimizer, run steps, checkpoint,
report (SPEC §7). Started by `runtime.pipeline.launch` (built-in launcher, emulated cluster) or, under
torchrun, in the `lynxpipe train` process itself.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lynxpipe.errors import LynxError
from lynxpipe.plan.types import Plan
from lynxpipe.runtime.pipeline.executor import ActionHook, PipelineExecutor, StepResult
from lynxpipe.runtime.pipeline.from_plan import build_chunks, engine_for
from lynxpipe.runtime.pipeline.groups import ProcessGroups, RankLayout, make_groups
from lynxpipe.runtime.pipeline.health import Health
from lynxpipe.runtime.train import checkpoint as ckpt
from lynxpipe.runtime.train.data import DataSpec, batches
from lynxpipe.runtime.train.job import TrainJob, collective_timeout_s
from lynxpipe.runtime.train.optim import AdamW
from lynxpipe.runtime.train.preflight import meta_json, weights_key
from lynxpipe.runtime.train.result import save_run
from lynxpipe.runtime.train.summary import (
    StepTotals,
    build_result,
    print_summary,
    progress_bar,
    rank_run,
)


@dataclass
class RankSetup:
    """One rank's live objects for a plan."""

    groups: ProcessGroups
    chunks: dict[int, Any]
    optimizer: AdamW
    executor: PipelineExecutor


def dtype_for(plan: Plan, device: str) -> torch.dtype:
    """fp32 on CPU; on GPU the plan's activation width (2 bytes: bf16)."""
    if device == "cpu" or plan.model.dtype_bytes == 4:
        return torch.float32
    return torch.bfloat16


def setup_rank(plan: Plan, groups: ProcessGroups, *, seed: int, lr: float = 1e-3,
               weight_decay: float = 0.01, device: str = "cpu",
               on_action: ActionHook | None = None) -> RankSetup:
    """Chunks, recompute engine, AdamW and executor of this rank for `plan`."""
    chunks = build_chunks(plan, groups, seed=seed, dtype=dtype_for(plan, device), device=device)
    engine = engine_for(plan, groups.pp_rank, sync_cuda=device.startswith("cuda"))
    params = [p for c in chunks.values() for p in c.parameters()]
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)
    executor = PipelineExecutor(plan, groups, chunks, engine, optimizer, device=device,
                                on_action=on_action)
    return RankSetup(groups, chunks, optimizer, executor)


def _init(job: TrainJob) -> tuple[int, int, str]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # one core per rank: two threads made overlap worse (FACTS)
    device, backend, extra = "cpu", "gloo", {}
    if job.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
        extra = {"device_id": torch.device(device)}
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout_s(job.timeout_s)),
                            **extra)
    return rank, world, device


def _shared_plan(job: TrainJob, rank: int) -> TrainJob:
    """Under torchrun every rank planned on its own; a MILP with a time limit may differ, so
    rank 0's plan wins."""
    box = [job.plan if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return job if rank == 0 else dataclasses.replace(job, plan=box[0])


def run_worker(job: TrainJob, *, share_plan: bool = False) -> None:
    """Train as the rank named by RANK/WORLD_SIZE (env://); raises on failure."""
    rank = int(os.environ["RANK"])
    health = Health(rank)
    try:
        rank, world, device = _init(job)
        if share_plan:
            job = _shared_plan(job, rank)
        par = job.plan.parallel
        layout = RankLayout(par.tp, par.pp, par.dp)
        if world != layout.size:
            raise LynxError(f"the plan needs tp*pp*dp = {layout.size} ranks, WORLD_SIZE is {world}")
        groups = make_groups(layout, collective_timeout_s(job.timeout_s))
        assert groups is not None
        _train(job, groups, device, health)
    except BaseException as exc:
        health.failed(exc)
        raise
    finally:
        health.close()
        gc.collect()  # layers in reference cycles hold process groups: free them first
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(job: TrainJob, groups: ProcessGroups, device: str, health: Health) -> None:
    plan, par = job.plan, job.plan.parallel
    setup = setup_rank(plan, groups, seed=job.seed, lr=job.lr, weight_decay=job.weight_decay,
                       device=device)
    data = DataSpec(job.data, job.seed, plan.model.vocab_size, par.seq_len,  # type: ignore[arg-type]
                    par.micro_batch_size, par.num_microbatches, par.dp)
    root = Path(job.checkpoint_dir) if job.checkpoint_dir else None
    state = ckpt.TrainState(0, 0, ())
    if job.resume:
        if root is None:
            raise LynxError("--resume needs --checkpoint-dir")
        state = ckpt.load_rank(root, groups.rank, weights_key(plan), setup.chunks,
                               setup.optimizer)
    if state.step >= job.steps:
        raise LynxError(f"the checkpoint is at step {state.step}; --steps {job.steps} is the "
                        f"total to reach, so there is nothing left to run")
    results: list[StepResult] = []
    totals: list[StepTotals] = []
    first = state.step
    n_actions = len(setup.executor.actions)
    with progress_bar(groups.rank == 0 and job.progress, job.steps, first) as bar:
        for step in range(first, job.steps):
            setup.executor.on_action = health.hook(step, n_actions)
            res = setup.executor.run_step(step, batches(data, step, groups.dp_rank, device))
            results.append(res)
            totals.append(_global_totals(res, groups, plan, device))
            bar(step, totals[-1], plan)
            state = ckpt.TrainState(step + 1, (step + 1) * data.sequences_per_step(),
                                    state.losses + (totals[-1].loss,))
            if root is not None and job.checkpoint_every and (step + 1) % job.checkpoint_every == 0:
                _checkpoint(root, groups, job, state, setup)
    _report(job, groups, results, totals, first)


def _checkpoint(root: Path, groups: ProcessGroups, job: TrainJob, state: ckpt.TrainState,
                setup: RankSetup) -> None:
    ckpt.save_rank(root, groups.rank, weights_key(job.plan), state, setup.chunks,
                   setup.optimizer)
    dist.barrier()
    if groups.rank == 0:
        ckpt.publish(root, meta_json(job.plan, state.step, job.seed, job.data, job.lr))
    dist.barrier()


def _global_totals(res: StepResult, groups: ProcessGroups, plan: Plan,
                   device: str) -> StepTotals:
    """Loss (mean over micro-batches and replicas) and the slowest rank's times, everywhere
    (the tensors live on `device`: NCCL reduces nothing else)."""
    last = groups.pp_rank == plan.order.pp - 1 and groups.tp_rank == 0
    loss = sum(res.losses) / len(res.losses) / plan.parallel.dp if last and res.losses else 0.0
    summed = torch.tensor([loss], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    worst = torch.tensor([res.step_ms, res.engine.hidden_s * 1e3, res.engine.exposed_s * 1e3],
                         dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return StepTotals(res.step, float(summed[0]), float(worst[0]), float(worst[1]),
                      float(worst[2]))


def _report(job: TrainJob, groups: ProcessGroups, results: list[StepResult],
            totals: list[StepTotals], first: int) -> None:
    mine = rank_run(job.plan, groups, results)
    gathered: list[Any] | None = [None] * dist.get_world_size() if groups.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if groups.rank != 0:
        return
    assert gathered is not None
    result = build_result(job, tuple(gathered), totals, first,
                          dist.get_backend(), job.device.split(":")[0])
    if job.out:
        save_run(job.out, result)
    if job.progress:
        print_summary(result)
