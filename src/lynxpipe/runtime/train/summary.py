"""Turning step results into a RunResult, the rank-0 progress bar and the final summary."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lynxpipe.plan.types import Plan
from lynxpipe.runtime.pipeline.executor import StepResult
from lynxpipe.runtime.pipeline.from_plan import planned_where
from lynxpipe.runtime.pipeline.groups import ProcessGroups
from lynxpipe.runtime.train.result import ActionTime, RankRun, RunResult
from lynxpipe.schedule.windows import WINDOW_KINDS, window_kind

if TYPE_CHECKING:
    from lynxpipe.runtime.train.worker import TrainJob

METER_NOTE = ("activation peak = bytes of unique storages autograd saves (incl. norm statistics "
              "and token indices) + recomputed buffers + engine-held inputs + pipeline receive "
              "buffers (runtime.engine.meter)")


@dataclass(frozen=True)
class StepTotals:
    """One step seen globally (identical on every rank)."""

    step: int
    """Step index."""
    loss: float
    """Mean loss over micro-batches and replicas."""
    step_ms: float
    """Slowest rank's step time."""
    hidden_ms: float
    """Largest per-rank hidden recompute."""
    exposed_ms: float
    """Largest per-rank exposed recompute."""


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _tokens_per_step(plan: Plan) -> int:
    par = plan.parallel
    return par.seq_len * par.micro_batch_size * par.num_microbatches * par.dp


@contextmanager
def progress_bar(enabled: bool, total: int, first: int
                 ) -> Iterator[Callable[[int, StepTotals, Plan], None]]:
    """Rank 0's bar: step, loss, tokens/s, hidden/exposed recompute. Yields `update`."""
    if not enabled:
        yield lambda step, totals, plan: None
        return
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TextColumn("recompute hidden {task.fields[hid]} / exposed {task.fields[exp]} ms"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("train", total=total, completed=first, loss="-", tps="-",
                                 hid="-", exp="-")

        def update(step: int, totals: StepTotals, plan: Plan) -> None:
            tps = _tokens_per_step(plan) / (totals.step_ms / 1e3) if totals.step_ms else 0.0
            progress.update(task, completed=step + 1, loss=f"{totals.loss:.4f}",
                            tps=f"{tps:,.0f}", hid=f"{totals.hidden_ms:.1f}",
                            exp=f"{totals.exposed_ms:.1f}")
        yield update


def _mean_actions(results: Sequence[StepResult]) -> tuple[ActionTime, ...]:
    steady = list(results[1:]) or list(results)
    if not steady:
        return ()
    n = len(steady)
    return tuple(ActionTime(timings[0].action,
                            sum(t.duration_ms for t in timings) / n,
                            sum(t.wait_ms for t in timings) / n,
                            sum(t.recompute_ms for t in timings) / n)
                 for timings in zip(*(r.actions for r in steady)))


def rank_run(plan: Plan, groups: ProcessGroups, results: Sequence[StepResult]) -> RankRun:
    """This rank's measurements over the steps it ran."""
    last = results[-1].engine.tasks if results else ()
    counts = Counter(t.where for t in last)
    planned = Counter(planned_where(plan, groups.pp_rank).values())
    cuda = (tuple(r.cuda_peak_bytes for r in results)  # type: ignore[misc]
            if results and results[0].cuda_peak_bytes is not None else None)
    return RankRun(
        rank=groups.rank, tp_rank=groups.tp_rank, dp_rank=groups.dp_rank,
        pp_rank=groups.pp_rank, step_ms=tuple(r.step_ms for r in results),
        peak_activation_bytes=tuple(r.engine.peak_bytes for r in results),
        predicted_peak_activation_bytes=plan.predicted.peak_activation_bytes[groups.pp_rank],
        cuda_peak_bytes=cuda,
        recompute_hidden_ms=tuple(r.engine.hidden_s * 1e3 for r in results),
        recompute_exposed_ms=tuple(r.engine.exposed_s * 1e3 for r in results),
        recompute_counts=dict(sorted(counts.items())), planned_counts=dict(sorted(planned.items())),
        recv_wait_ms=tuple(r.recv_wait_ms for r in results),
        dp_sync_ms=tuple(r.dp_sync_ms for r in results),
        optimizer_ms=tuple(r.optimizer_ms for r in results), actions=_mean_actions(results))


def _notes(ranks: Sequence[RankRun]) -> tuple[str, ...]:
    notes = [METER_NOTE]
    for r in ranks:
        if r.recompute_counts != r.planned_counts:
            notes.append(f"rank {r.rank}: recompute ran {r.recompute_counts} per step, the plan "
                         f"has {r.planned_counts}")
    return tuple(notes)


def build_result(job: TrainJob, ranks: tuple[RankRun, ...], totals: Sequence[StepTotals],
                 first: int, backend: str, device: str) -> RunResult:
    """Assemble run.json from every rank's RankRun and the global per-step totals."""
    plan, pred = job.plan, job.plan.predicted
    step_ms = tuple(t.step_ms for t in totals)
    steady = step_ms[1:] or step_ms
    tps = _tokens_per_step(plan) * len(steady) / (sum(steady) / 1e3) if sum(steady) else 0.0
    return RunResult(
        policy=plan.policy, plan_fingerprint=plan.fingerprint, model=plan.model,
        parallel=plan.parallel, cluster=plan.cluster.name, budget_bytes=plan.budget_bytes,
        device=device, backend=backend, emulate=job.emulate, data=job.data, seed=job.seed,
        first_step=first, losses=tuple(t.loss for t in totals), step_ms=step_ms,
        tokens_per_s=tps, predicted_step_ms=pred.step_time_ms,
        recompute_hidden_ms=_median([t.hidden_ms for t in totals]),
        recompute_exposed_ms=_median([t.exposed_ms for t in totals]),
        predicted_recompute_hidden_ms=pred.recompute_hidden_ms,
        predicted_recompute_exposed_ms=pred.recompute_exposed_ms,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)), notes=_notes(ranks))


def print_summary(result: RunResult) -> None:
    """Measured next to predicted, one row per rank (on stderr: stdout stays for data)."""
    console = Console(stderr=True)
    steady = result.step_ms[1:] or result.step_ms
    console.print(f"[bold]{result.policy}[/]: {len(result.losses)} steps, final loss "
                  f"{result.losses[-1]:.4f}, step {_median(steady):.1f} ms median "
                  f"(plan predicts {result.predicted_step_ms:.1f} ms on {result.cluster}), "
                  f"{result.tokens_per_s:,.0f} tokens/s")
    table = Table("rank", "t/d/p", "step ms", "meter KiB", "plan KiB", "ratio", "hid. ms",
                  "exp. ms", "tasks", box=box.SIMPLE, caption="activation peak (meter) vs the "
                  "plan's; recompute hidden/exposed (medians); tasks per step by window: "
                  + ", ".join(f"{k.short} {k.name}" for k in WINDOW_KINDS.values()))
    for r in result.ranks:
        peak = max(r.peak_activation_bytes) if r.peak_activation_bytes else 0
        pred = r.predicted_peak_activation_bytes
        table.add_row(str(r.rank), f"{r.tp_rank}/{r.dp_rank}/{r.pp_rank}",
                      f"{_median(r.step_ms[1:] or r.step_ms):.1f}", f"{peak / 1024:,.0f}",
                      f"{pred / 1024:,.0f}", f"{peak / pred:.3f}" if pred else "-",
                      f"{_median(r.recompute_hidden_ms):.1f}",
                      f"{_median(r.recompute_exposed_ms):.1f}",
                      " ".join(f"{window_kind(k).short}{v}" for k, v in r.recompute_counts.items()) or "-")
    console.print(table)
