"""Refinement into idle windows and the shared tighten loop: memory-aware moves fit without
repair, and the loop stops instead of tightening a rank that cannot shrink."""

import time

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.checkmate import checkmate_run
from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.loop import tighten_loop
from lynxpipe.plan.partition import default_partition
from lynxpipe.plan.planners import make
from lynxpipe.plan.refine import _moves, _placement, refine
from lynxpipe.plan.types import PlanRequest
from lynxpipe.schedule.policy import FULL
from lynxpipe.schedule.windows import FWD_COLL, RECV
from lynxpipe.specs import ParallelSpec, get_cluster, get_model


def _request(fraction: float) -> PlanRequest:
    model, cluster = get_model("gpt-1.3b"), get_cluster("a100-nvlink")
    par = ParallelSpec(tp=2, pp=2, dp=2, micro_batch_size=2, num_microbatches=8, seq_len=2048)
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60,
                        costs=costs)
    none = make("none", probe).predicted
    rank = max(range(par.pp), key=lambda r: none.peak_memory_bytes[r])
    budget = none.ranks[rank].static_bytes + int(fraction * none.ranks[rank].peak_activation_bytes)
    return PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=budget, costs=costs)


def test_action_peaks_cover_the_memory_timeline():
    req = _request(0.15)
    plan, sim = checkmate_run(req, default_partition(req), "checkmate", time.perf_counter())
    for rank, actions in enumerate(plan.order.ranks):
        peaks = sim.action_peak_bytes(rank)
        assert len(peaks) == len(actions)
        assert max(peaks) == sim.ranks[rank].peak_activation_bytes


def test_moves_into_idle_windows_fit_at_once():
    req = _request(0.15)
    plan, sim = checkmate_run(req, default_partition(req), "checkmate", time.perf_counter())
    moves = _moves(req, plan, sim, {RECV, FWD_COLL})
    assert moves  # on-demand recompute found idle windows
    moved, _ = make_plan(req, plan.policy, plan.partition, plan.layers,
                         {**_placement(plan), **moves}, 0.0)
    assert moved.predicted.fits_budget  # packed within each rank's memory: no repair needed
    assert moved.predicted.recompute_hidden_ms > plan.predicted.recompute_hidden_ms
    best = refine(req, plan, sim)
    assert best.predicted.step_time_ms < plan.predicted.step_time_ms
    assert best.predicted.fits_budget


def test_tighten_loop_stops_when_a_rank_cannot_shrink():
    req = _request(0.0)  # below what all-`full` needs: nothing fits on the fullest rank
    calls = []

    def solve(rb, margin):
        calls.append((rb.rank, margin))
        return {g: FULL for g in rb.layers}, 0.0

    plan, _ = tighten_loop(req, default_partition(req), "t", solve, time.perf_counter())
    assert not plan.predicted.fits_budget
    assert len(calls) == req.parallel.pp  # one solve per rank: more margin cannot help
