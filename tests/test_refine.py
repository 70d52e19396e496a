"""Refinement into idle windows and the shared tighten loop: memory-aware moves fit without
repair, and the loop stops instead of tightening a rank that cannot shrink."""

import time
from dataclasses import replace

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.checkmate import checkmate_run
from lynxpipe.plan.finalize import make_plan
from lynxpipe.plan.heu import HeuPlanner
from lynxpipe.plan.loop import tighten_loop
from lynxpipe.plan.partition import default_partition
from lynxpipe.plan.planners import make
from lynxpipe.plan.refine import _moves, _placement, refine, trim_to_fit
from lynxpipe.plan.types import PlanRequest
from lynxpipe.schedule.policy import FULL, stage_layers
from lynxpipe.schedule.windows import BWD_COLL, FWD_COLL, RECV
from lynxpipe.specs import ParallelSpec, get_cluster, get_model


def _request(fraction: float, model=get_model("gpt-1.3b"), cluster=get_cluster("a100-nvlink"),
             par=ParallelSpec(tp=2, pp=2, dp=2, micro_batch_size=2, num_microbatches=8,
                              seq_len=2048)) -> PlanRequest:
    """The request at static + `fraction` x `none`'s activations of the fullest rank."""
    costs = analytic_costs(model, cluster, par)
    probe = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**60,
                        costs=costs)
    none = make("none", probe).predicted
    rank = max(range(par.pp), key=lambda r: none.peak_memory_bytes[r])
    budget = none.ranks[rank].static_bytes + int(fraction * none.ranks[rank].peak_activation_bytes)
    return replace(probe, budget_bytes=budget)


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


def _ascend_6p7b(fraction: float) -> PlanRequest:
    """A paper-scale row (ascend-910b, gpt-6.7b explicit, TP=4 PP=2 DP=2) where lynx-heu's
    first window-aware plan holds its peak in the top hosts' windows."""
    return _request(fraction, replace(get_model("gpt-6.7b"), attention="explicit"),
                    get_cluster("ascend-910b"),
                    ParallelSpec(tp=4, pp=2, dp=2, micro_batch_size=1, num_microbatches=8))


def test_trim_hands_the_top_hosts_windows_back_until_it_fits():
    req = _ascend_6p7b(0.15)
    partition = default_partition(req)
    heu, over, fixed = HeuPlanner(req, partition), [], []

    def record(plan):
        over.append(plan)
        fixed.append(trim_to_fit(req, plan))
        return fixed[-1]

    tighten_loop(req, partition, "lynx-heu", heu.solve, time.perf_counter(), place=heu.place,
                 relax=False, repair=record)
    assert len(over) == 1 and not over[0].predicted.fits_budget  # offered once, when over
    trimmed, _ = fixed[0]
    assert trimmed.predicted.fits_budget and trimmed.layers == over[0].layers
    before, after = _placement(over[0]), _placement(trimmed)
    gone = set(before) - set(after)
    assert gone and set(after) <= set(before)
    assert all(before[k].kind == BWD_COLL for k in gone)
    # the hosts handed back are the top ones of the over-budget rank's stages
    ranks = [r for r, peak in enumerate(over[0].predicted.peak_memory_bytes)
             if peak > req.budget_bytes]
    mine = {g for s, rng in enumerate(stage_layers(partition)) if s % req.parallel.pp in ranks
            for g in rng}
    hosts = sorted({w.layer for k, w in before.items() if w.kind == BWD_COLL and k[1] in mine},
                   reverse=True)
    handed = {before[k].layer for k in gone}
    assert handed == set(hosts[:len(handed)])
    # ...and no fewer would do
    if len(handed) > 1:
        fewer = {k: w for k, w in before.items() if not (k in gone and w.layer == min(handed))}
        plan, _ = make_plan(req, over[0].policy, partition, over[0].layers, fewer, 0.0)
        assert not plan.predicted.fits_budget
    # it beats what the loop finds by tightening alone, and lynx-heu takes it
    alone, _ = tighten_loop(req, partition, "lynx-heu", heu.solve, time.perf_counter(),
                            place=heu.place, relax=False)
    assert trimmed.predicted.step_time_ms < alone.predicted.step_time_ms
    assert make("lynx-heu", req).predicted.step_time_ms < alone.predicted.step_time_ms
