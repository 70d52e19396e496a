"""The count programme: its skyline sweep against the definition of dominance, pair by pair,
and its reused answers against solving afresh."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.countdp import (
    Solved,
    _Frontier,
    _skyline,
    best_counts,
    least_budget,
    least_ms_bound,
    needed_budget,
)
from lynxpipe.plan.ondemand import count_options
from lynxpipe.plan.period import make_period
from lynxpipe.plan.simple import default_partition
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

INF = float("inf")
values = st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0])  # few values: many ties
rooms = st.sampled_from([0.0, 1.0, 2.0, 4.0, INF])


def _pairwise(s: _Frontier) -> list[int]:
    """State j survives unless some state i before it in (k, ms, prefix, -allowance) order, at
    the same layer count, has ms, prefix no larger and allowance no smaller."""
    order = np.lexsort((-s.allowance, s.prefix, s.ms, s.layers)).tolist()
    keep = []
    for pos, j in enumerate(order):
        if not any(s.layers[i] == s.layers[j] and s.ms[i] <= s.ms[j]
                   and s.prefix[i] <= s.prefix[j] and s.allowance[i] >= s.allowance[j]
                   for i in order[:pos]):
            keep.append(j)
    return sorted(keep)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values, rooms, st.integers(0, 2)), min_size=0, max_size=40))
def test_skyline_keeps_exactly_the_undominated_states(states):
    ms, prefix, room, layers = (np.array(col, dtype=dt) for col, dt in zip(
        zip(*states) if states else ([], [], [], []), (float, float, float, np.int64)))
    front = _Frontier(ms, prefix, room, layers)
    assert _skyline(front).tolist() == _pairwise(front)


def _request(model: str, attention: str, cluster: str, par: ParallelSpec) -> PlanRequest:
    spec = replace(get_model(model), attention=attention, attention_dropout=0.0)
    clus = get_cluster(cluster)
    return PlanRequest(model=spec, cluster=clus, parallel=par, budget_bytes=2**40,
                       costs=analytic_costs(spec, clus, par))


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_reused_answers_equal_fresh_solves(attention):
    """`Solved` answers a budget from an earlier answer where that answer's counts still keep
    the rows; at falling and rising budgets around the boundary it must equal solving afresh,
    and what it says the counts need must be exactly where they stop fitting."""
    req = _request("gpt-2.7b", attention, "a100-pcie", ParallelSpec(
        tp=2, pp=4, num_microbatches=16, seq_len=2048))
    options = count_options(req.costs.layer)
    rng = random.Random(7)
    for rank in (0, 3):
        period = make_period(req, default_partition(req), rank, windows=False)
        least = least_budget(options, period)
        budgets = sorted((rng.randint(least - 10**6, 3 * least) for _ in range(30)),
                         reverse=True) + [least, least - 1, 2 * least, least + 1]
        solved = Solved(options, period)
        for budget in budgets:
            assert solved.counts(budget) == best_counts(options, period, budget), budget
        assert len(solved.known) < len(budgets)  # answers were reused
        for _, _, counts in solved.known:
            if counts is not None:
                need = needed_budget(options, counts, period)
                assert best_counts(options, period, need) is not None
                assert need == least or best_counts(
                    options, period, need - 1) != counts


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_options_left_out_change_no_answer(attention, monkeypatch):
    """Options no improving plan can use are left out of the programme's levels; over budgets
    from below the least to loose, the answers equal the programme over every option, and
    some budgets do leave options out."""
    import lynxpipe.plan.countdp as countdp

    req = _request("gpt-6.7b", attention, "ascend-910b", ParallelSpec(
        tp=4, pp=2, num_microbatches=8, seq_len=2048))
    options = count_options(req.costs.layer)
    period = make_period(req, default_partition(req), 0, windows=False)
    least = least_budget(options, period)
    budgets = [least - 1, least, least + 1, *range(least, 4 * least, max(1, least // 12))]
    pruned, usable = [], countdp._usable
    for budget in budgets:
        forward, backward = countdp._rows(period, budget)
        upper = countdp._two_option_bound(options, len(period.layers), period.inflight,
                                          forward, backward) * (1 + 1e-9) + 1e-12
        pruned.append(len(usable(options, len(period.layers), period.inflight, forward,
                                 backward, upper)) < len(options))
        with monkeypatch.context() as m:
            m.setattr(countdp, "_usable", lambda opts, *_: list(range(len(opts))))
            every = best_counts(options, period, budget)
        assert best_counts(options, period, budget) == every, budget
    assert any(pruned)


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_least_ms_bound_is_below_every_answer(attention):
    """The forward row's relaxation never exceeds the programme's least time, is infinite only
    where nothing fits, and comes within a few percent where recompute is forced (what lets
    lynx-heu leave checkmate's keep sets out)."""
    req = _request("gpt-13b", attention, "a100-pcie", ParallelSpec(
        tp=8, pp=4, num_microbatches=16, seq_len=2048))
    options = count_options(req.costs.layer)
    close = 0
    for rank in range(4):
        period = make_period(req, default_partition(req), rank, windows=False)
        least = least_budget(options, period)
        for budget in [least - 1, *range(least, 3 * least, least // 20)]:
            bound, counts = least_ms_bound(options, period, budget), \
                best_counts(options, period, budget)
            if counts is None:
                assert budget < least
                continue
            best = sum(c * o.ms for c, o in zip(counts, options))
            assert bound <= best * (1 + 1e-12) + 1e-12, (rank, budget)
            close += best > 0 and bound >= 0.9 * best
    assert close
