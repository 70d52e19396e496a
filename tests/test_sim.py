"""Simulator: exact toy cases, windows, on-demand recompute, memory and deadlock detection."""

import re

import pytest
from conftest import toy_costs
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.errors import LynxError
from lynxpipe.plan.recompute import insert_recompute
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.orders import make_order
from lynxpipe.schedule.policy import FULL, KEEP_ALL, LayerPolicy
from lynxpipe.sim.engine import simulate


def _run(costs, pp, m, layers_per_stage=1, policies=None, schedule="1f1b", v=1, placement=None,
         trace=False):
    order = make_order(schedule, pp, v, m)
    partition = (layers_per_stage,) * (pp * v)
    layers = policies or (KEEP_ALL,) * sum(partition)
    order = insert_recompute(order, partition, costs.layer.graph, layers, placement or {})
    return simulate(costs, partition, layers, order, trace=trace)


@settings(max_examples=40, deadline=None)
@given(pp=st.integers(1, 6), m=st.integers(1, 12), schedule=st.sampled_from(["1f1b", "gpipe"]))
def test_pipeline_step_time_is_exact(pp, m, schedule):
    sim = _run(toy_costs(fwd_ms=1.0, bwd_ms=2.0), pp, m, schedule=schedule)
    assert sim.step_time_ms == pytest.approx((m + pp - 1) * 3.0)


@settings(max_examples=40, deadline=None)
@given(pp=st.integers(1, 6), m=st.integers(1, 12))
def test_1f1b_peak_holds_min_p_minus_i_m_microbatches(pp, m):
    costs = toy_costs()
    sim = _run(costs, pp, m, layers_per_stage=2)
    per_mb = 2 * costs.layer.graph.saved_bytes()
    for rank, stats in enumerate(sim.ranks):
        extra = costs.embed.graph.saved_bytes() if rank == 0 else 0
        extra += costs.head.graph.saved_bytes() if rank == pp - 1 else 0
        grad_buffer = costs.grad_buffer_bytes if rank < pp - 1 else 0
        assert stats.peak_activation_bytes == (min(pp - rank, m) * (per_mb + extra)
                                               + grad_buffer)


def test_gpipe_holds_all_microbatches():
    costs = toy_costs()
    sim = _run(costs, 2, 5, schedule="gpipe")
    assert sim.ranks[1].peak_activation_bytes == 5 * (costs.layer.graph.saved_bytes()
                                                       + costs.head.graph.saved_bytes())


def test_interleaved_step_time():
    sim = _run(toy_costs(fwd_ms=1.0, bwd_ms=2.0), 2, 4, schedule="interleaved", v=2)
    assert sim.step_time_ms == pytest.approx((4 * 2 + 2 - 1) * 3.0)


def test_on_demand_recompute_is_exposed_and_counted():
    costs = toy_costs(fwd_ms=1.0, bwd_ms=2.0)
    base = _run(costs, 1, 3, layers_per_stage=2)
    full = _run(costs, 1, 3, layers_per_stage=2, policies=(FULL, FULL))
    # full recompute replays the forward (collectives free here): +1 ms per layer per micro-batch
    assert full.step_time_ms == pytest.approx(base.step_time_ms + 2 * 3 * 1.0)
    assert full.ranks[0].recompute_exposed_ms == pytest.approx(6.0)
    assert full.ranks[0].peak_activation_bytes < base.ranks[0].peak_activation_bytes


def test_window_hides_recompute_and_overflow_is_exposed():
    costs = toy_costs(tp=2, fwd_ms=1.0, bwd_ms=2.0, coll_ms=0.5)
    drop = LayerPolicy(frozenset({"fc1_out", "gelu_out"}))  # segment 1: fc1 + gelu
    seg_ms = costs.layer.recompute_ms(drop.dropped, 1)
    layers = (KEEP_ALL, drop)
    none = _run(costs, 1, 1, layers_per_stage=2)
    ondemand = _run(costs, 1, 1, layers_per_stage=2, policies=layers)
    assert ondemand.step_time_ms == pytest.approx(none.step_time_ms + seg_ms)
    # with m=1 the only window before layer 1's backward is the head's (layer 2) backward one
    window = Window("bwd_coll", 0, 0, 2, _head_bwd_coll_step(costs))
    placed = _run(costs, 1, 1, layers_per_stage=2, policies=layers,
                  placement={(0, 1, 1): window})
    capacity = costs.head.coll_ms["logits_bwd_ar"] - costs.head.op_ms["logits"].wgrad_ms
    hidden = min(seg_ms, 0.9 * max(0.0, capacity))
    assert placed.ranks[0].recompute_hidden_ms == pytest.approx(hidden)
    assert placed.step_time_ms == pytest.approx(none.step_time_ms + seg_ms - hidden)


def _head_bwd_coll_step(costs):
    return next(i for i, s in enumerate(costs.head.graph.bwd_steps) if s.kind == "coll")


def test_forward_window_of_later_microbatch_hides_recompute():
    costs = toy_costs(tp=2, fwd_ms=1.0, bwd_ms=2.0, coll_ms=2.0)
    drop = LayerPolicy(frozenset({"probs", "probs_dropped"}))
    seg_ms = costs.layer.recompute_ms(drop.dropped, 0)
    # pp=2, stage 0: F0 F1 B0 ...: mb0's recompute fits in F1's first forward collective
    window = Window("fwd_coll", 1, 0, 0, 1)
    sim = _run(costs, 2, 4, policies=(drop, KEEP_ALL), placement={(0, 0, 0): window})
    assert sim.ranks[0].recompute_hidden_ms == pytest.approx(seg_ms)
    assert sim.ranks[0].recompute_exposed_ms == pytest.approx(3 * seg_ms)


def test_trace_events_and_memory_return_to_zero():
    sim = _run(toy_costs(tp=2, coll_ms=0.3, p2p_ms=0.2), 2, 4, trace=True,
               policies=(FULL, LayerPolicy(frozenset({"probs"}))))
    cats = {e.cat for e in sim.events}
    assert {"forward", "backward", "p2p", "recompute_exposed", "tp_comm"} <= cats
    assert all(timeline[-1][1] == 0 for timeline in sim.memory_timeline)


def test_deadlock_is_reported():
    costs = toy_costs()
    order = PipelineOrder("custom", 2, 1, 1, (
        (Action("RECV_B", 0, 0), Action("F", 0, 0), Action("SEND_F", 0, 0), Action("B", 0, 0)),
        (Action("RECV_F", 0, 1), Action("F", 0, 1), Action("B", 0, 1), Action("SEND_B", 0, 1)),
    ))
    with pytest.raises(LynxError, match="deadlocks: rank 0 at RECV_B"):
        simulate(costs, (1, 1), (KEEP_ALL, KEEP_ALL), order)


def test_window_that_never_comes_is_rejected():
    costs = toy_costs(tp=2, coll_ms=1.0)
    drop = LayerPolicy(frozenset({"probs"}))
    order = insert_recompute(make_order("1f1b", 1, 1, 2), (1,), costs.layer.graph, (drop,), {})
    ranks = list(order.ranks[0])
    r = next(a for a in ranks if a.kind == "R" and a.mb == 0)
    # micro-batch 9 never runs, so its forward collective window never opens
    ranks[ranks.index(r)] = Action("R", 0, 0, 0, 0, Window("fwd_coll", 9, 0, 0, 1))
    order = PipelineOrder("1f1b", 1, 1, 2, (tuple(ranks),))
    with pytest.raises(LynxError, match="never occurs"):
        simulate(costs, (1,), (drop,), order)


def test_whole_layer_recompute_in_a_window_is_rejected():
    # full recompute replays the forward collectives, so it cannot hide in a collective's wait
    costs = toy_costs(tp=2, coll_ms=1.0)
    window = Window("bwd_coll", 0, 0, 2, _head_bwd_coll_step(costs))
    with pytest.raises(LynxError, match="whole-layer recompute"):
        _run(costs, 1, 1, layers_per_stage=2, policies=(KEEP_ALL, FULL),
             placement={(0, 1, -1): window})


@pytest.mark.parametrize("contention", [1.0, 0.5, 0.05])
def test_overlapped_wgrad_obeys_the_window_rule(contention):
    # a column-parallel linear's input-gradient all-reduce overlaps its wgrad GEMM: compute in
    # a window of W ms runs at rate c, so the step lasts W + max(0, overlap - c*W)
    from dataclasses import replace

    from lynxpipe.cost.table import overlapped_collective
    from lynxpipe.sim.program import compile_program

    base = toy_costs(tp=2, coll_ms=0.4)
    costs = replace(base, contention=contention)
    prog = compile_program(costs.layer, KEEP_ALL)
    colls = [(s.overlap_ms, s.coll_ms) for s in prog.bwd if s.coll_ms >= 0]
    assert colls and all(o > 0 for o, _ in colls)
    extra = sum(w + max(0.0, o - contention * w) - max(w, o) for o, w in colls)
    m, layers = 3, 2
    order = make_order("1f1b", 1, 1, m)
    fast = simulate(replace(base, contention=1.0), (layers,), (KEEP_ALL,) * layers, order)
    slow = simulate(costs, (layers,), (KEEP_ALL,) * layers, order)
    assert slow.step_time_ms - fast.step_time_ms == pytest.approx(m * layers * extra)
    assert (extra > 0) == any(o > contention * w for o, w in colls)  # 0.05: the GEMM spills
    for o, w in colls:  # what is left of the window is what a recompute there may use
        wall, left = overlapped_collective(o, w, contention)
        assert wall + left == pytest.approx(w + max(0.0, o - contention * w))
        assert left * contention == pytest.approx(max(0.0, contention * w - o))


def test_every_tp_collective_pays_the_measured_sync():
    # the profile's sync probe: each TP collective costs the wait for the last TP rank, on the
    # critical path (no window): a step with n collectives is n x tp_sync_ms slower
    from dataclasses import replace

    from lynxpipe.sim.program import compile_program

    base = toy_costs(tp=2, coll_ms=0.4)
    colls = sum(s.coll_ms >= 0 for p in (compile_program(u, KEEP_ALL)
                                         for u in (base.embed, base.layer, base.layer, base.head))
                for s in (*p.fwd, *p.bwd))
    m, order = 3, make_order("1f1b", 1, 1, 3)
    plain = simulate(base, (2,), (KEEP_ALL,) * 2, order)
    synced = simulate(replace(base, tp_sync_ms=0.25), (2,), (KEEP_ALL,) * 2, order)
    assert colls > 0
    assert synced.step_time_ms - plain.step_time_ms == pytest.approx(m * colls * 0.25)


def _held_during_actions(sim, rank):
    """Per action: the bytes held when it began and after each of its memory changes."""
    mem = [m for _, m in sim.memory_timeline[rank]]
    marks = sim.action_marks[rank]
    ends = [*marks[1:], len(mem)]
    return [max([mem[a - 1] if a else 0, *mem[a:b]]) for a, b in zip(marks, ends)]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_short_path_equals_the_step_by_step_walk(schedule):
    """F/B actions hosting no recompute take `sim.fast`'s summaries; every field of the result
    (clock, counters, peaks, memory timeline, window records, marks) must be bit-for-bit what
    walking each step gives, for plans of every policy, windows and refinement included."""
    from dataclasses import replace

    from lynxpipe.cost.table import analytic_costs
    from lynxpipe.plan.planners import PLANNERS, make
    from lynxpipe.plan.types import PlanRequest
    from lynxpipe.schedule.windows import FWD_COLL, RECV
    from lynxpipe.sim.details import Replay
    from lynxpipe.sim.engine import Simulator
    from lynxpipe.specs import ParallelSpec, get_cluster, get_model

    model, clus = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, micro_batch_size=2, seq_len=1024,
                       schedule=schedule, virtual_stages=2 if schedule == "interleaved" else 1)
    probe = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=1 << 40,
                        # a measured profile's TP sync wait: one more addition per window
                        costs=replace(analytic_costs(model, clus, par), tp_sync_ms=0.013))
    none = make("none", probe)
    static, act = none.predicted.ranks[0].static_bytes, none.predicted.ranks[0].peak_activation_bytes
    short_taken = filled_taken = 0
    for fraction in (0.3, 0.6):
        req = replace(probe, budget_bytes=static + int(fraction * act))
        for name in PLANNERS:
            plan = make(name, req, strict=False)
            args = (req.costs, plan.partition, plan.layers, plan.order)
            fast, slow = Simulator(*args), Simulator(*args, short_path=False)
            a, b = fast.run(), slow.run()
            short_taken += sum(type(w) is Replay for w in fast.windows)
            filled_taken += sum(type(w) is Replay and bool(w.summary.filled)
                                for w in fast.windows)
            # windows of some kinds and held bytes before the timeline and windows are built
            some = frozenset({RECV, FWD_COLL})
            assert a.idle_of(some) == [(w.window, w.wait_ms, w.used_ms) for w in b.windows
                                       if w.window.kind in some]
            peaks = [_held_during_actions(b, r) for r in range(par.pp)]
            assert [a.action_peak_bytes(r) for r in range(par.pp)] == peaks, name
            assert not any(type(w) is Replay for w in slow.windows)
            assert (a.step_time_ms, a.ranks, a.action_marks) == \
                (b.step_time_ms, b.ranks, b.action_marks), name
            assert a.memory_timeline == b.memory_timeline, name
            assert a.windows == b.windows, name
            assert a.idle_of(some) == b.idle_of(some), name
            assert [a.action_peak_bytes(r) for r in range(par.pp)] == peaks, name
    assert short_taken > 0 and filled_taken > 0


def test_extra_backward_time_is_an_on_demand_plan_of_that_recompute():
    """Keeping everything while each backward of a stage first runs `extra_backward_ms` of
    recompute is, to the last rounding, the step of an on-demand plan that recomputes that
    long per backward (checkmate's lower bound rests on it); the short path and the step-by-
    step walk agree on it bit for bit, and more recompute never shortens the step."""
    from dataclasses import replace

    from lynxpipe.cost.table import analytic_costs
    from lynxpipe.plan.checkmate import plan_checkmate
    from lynxpipe.plan.types import PlanRequest
    from lynxpipe.schedule.policy import stage_layers
    from lynxpipe.sim.engine import Simulator
    from lynxpipe.sim.program import compile_program
    from lynxpipe.specs import ParallelSpec, get_cluster, get_model

    model, clus = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, micro_batch_size=2, seq_len=1024)
    probe = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=1 << 40,
                        costs=replace(analytic_costs(model, clus, par), tp_sync_ms=0.013))
    keep = (KEEP_ALL,) * model.num_layers
    none = simulate(probe.costs, (12, 12), keep, make_order("1f1b", 2, 1, 4))
    act = none.ranks[0].peak_activation_bytes
    plan = plan_checkmate(replace(probe, budget_bytes=none.ranks[0].static_bytes
                                  + int(0.4 * act)))
    per_stage = tuple(sum(t.duration_ms for g in rng
                          for t in compile_program(probe.costs.layer, plan.layers[g])
                          .tasks.values())
                      for rng in stage_layers(plan.partition))
    assert all(ms > 0 for ms in per_stage)  # the plan recomputes on both stages
    order = make_order("1f1b", 2, 1, 4)
    args = (probe.costs, plan.partition, keep, order)
    bound = Simulator(*args, extra_backward_ms=per_stage).run()
    walked = Simulator(*args, short_path=False, extra_backward_ms=per_stage).run()
    assert (bound.step_time_ms, bound.ranks) == (walked.step_time_ms, walked.ranks)
    assert bound.step_time_ms == pytest.approx(plan.predicted.step_time_ms, rel=1e-12)
    assert bound.recompute_exposed_ms == pytest.approx(plan.predicted.recompute_exposed_ms,
                                                       rel=1e-12)
    less = simulate(*args, extra_backward_ms=(per_stage[0] / 2, per_stage[1]))
    assert none.step_time_ms < less.step_time_ms < bound.step_time_ms
    with pytest.raises(LynxError, match=r"1 stage\(s\), the order has 2"):
        Simulator(*args, extra_backward_ms=(1.0,))


def _with_r(order, mb_host, r, after=False):
    """`order` (one rank) with R action `r` inserted right before (after) B of `mb_host`."""
    ranks = list(order.ranks[0])
    at = after + next(i for i, a in enumerate(ranks) if a.kind == "B" and a.mb == mb_host)
    return PipelineOrder(order.schedule, 1, 1, order.num_microbatches,
                         (tuple(ranks[:at] + [r] + ranks[at:]),))


@pytest.mark.parametrize("bad", [None, "twice", "no such step", "twice, later micro-batch",
                                 "pinned after its window"])
def test_backward_windows_summarised_as_walked_and_rejected_alike(bad):
    """A backward hosting recompute takes a summary of its walk with its windows filled
    (tasks of its own and of later micro-batches): results equal the step-by-step walk, and
    a placement the walk rejects is rejected with the same message."""
    from lynxpipe.sim.details import Replay
    from lynxpipe.sim.engine import Simulator

    costs = toy_costs(tp=2, coll_ms=1.0)
    drop = LayerPolicy(frozenset({"probs"}))
    layers = (drop, drop)
    order = insert_recompute(make_order("1f1b", 1, 1, 3), (2,), costs.layer.graph, layers, {
        (0, 1, 0): Window("bwd_coll", 0, 0, 1, 2), (0, 0, 0): Window("bwd_coll", 0, 0, 1, 5),
        (2, 0, 0): Window("bwd_coll", 0, 0, 0, 2), (1, 1, 0): Window("bwd_coll", 1, 0, 1, 2)})
    extra = {"twice": (0, Action("R", 0, 0, 0, 0, Window("bwd_coll", 0, 0, 0, 2))),
             "no such step": (1, Action("R", 1, 0, 0, 0, Window("bwd_coll", 1, 0, 1, 99))),
             "twice, later micro-batch": (1, Action("R", 2, 0, 0, 0,
                                                    Window("bwd_coll", 1, 0, 1, 5))),
             "pinned after its window": (1, Action("R", 2, 0, 1, 0,
                                                   Window("bwd_coll", 1, 0, 1, 5)), True)}
    if bad:
        order = _with_r(order, *extra[bad])
    args = (costs, (2,), layers, order)
    if bad:
        with pytest.raises(LynxError) as walked:
            Simulator(*args, short_path=False).run()
        with pytest.raises(LynxError, match=re.escape(str(walked.value))):
            Simulator(*args).run()
        return
    fast, slow = Simulator(*args), Simulator(*args, short_path=False)
    a, b = fast.run(), slow.run()
    filled = [w for w in fast.windows if type(w) is Replay and w.summary.filled]
    assert {w.action.mb for w in filled} == {0, 1}
    assert (a.step_time_ms, a.ranks, a.memory_timeline, a.windows) == \
        (b.step_time_ms, b.ranks, b.memory_timeline, b.windows)
    assert a.ranks[0].recompute_hidden_ms > 0


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_a_receive_posted_ahead_is_static_memory_the_planners_respect(pp):
    """With receives posted one RECV ahead (gloo), every pipeline rank holds one boundary
    buffer more through the step: static memory up by exactly that, activations unchanged;
    the planners keep the whole peak under the budget; one stage receives nothing."""
    from dataclasses import replace

    from lynxpipe.cost.table import analytic_costs
    from lynxpipe.plan.planners import make
    from lynxpipe.plan.types import PlanRequest
    from lynxpipe.specs import ParallelSpec, get_cluster, get_model

    model, clus = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=pp, num_microbatches=4, micro_batch_size=1, seq_len=1024)
    late = analytic_costs(model, clus, par)
    ahead = replace(late, recv_ahead=True)
    partition = (model.num_layers // pp,) * pp
    keep = (KEEP_ALL,) * model.num_layers
    order = make_order("1f1b", pp, 1, 4)
    a, b = simulate(late, partition, keep, order), simulate(ahead, partition, keep, order)
    extra = late.grad_buffer_bytes if pp > 1 else 0
    assert extra > 0 or pp == 1
    assert [r.static_bytes - s.static_bytes for r, s in zip(b.ranks, a.ranks)] == [extra] * pp
    assert [r.peak_activation_bytes for r in b.ranks] == [r.peak_activation_bytes
                                                          for r in a.ranks]
    budget = a.ranks[0].static_bytes + a.ranks[0].peak_activation_bytes // 2
    req = PlanRequest(model=model, cluster=clus, parallel=par, budget_bytes=budget,
                      costs=ahead, time_limit_s=10)
    from lynxpipe.report.summary import plan_summary_text
    from lynxpipe.units import format_size

    said = f"posted one RECV ahead (gloo moves a message only once it is posted): " \
        f"{format_size(late.grad_buffer_bytes)} of static memory per rank"
    for policy in ("checkmate", "lynx-heu"):
        plan = make(policy, req)
        assert plan.recv_ahead and plan.predicted.fits_budget
        assert max(plan.predicted.peak_memory_bytes) <= budget
        assert (said in plan_summary_text(plan)) == (pp > 1)
    assert "RECV ahead" not in plan_summary_text(make("checkmate", replace(req, costs=late)))
