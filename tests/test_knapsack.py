"""lynx-heu's knapsack: the two-option mix search against trying every ordered pair, and its
answers reused across budgets against fresh ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.plan.knapsack import (
    INFEASIBLE,
    Replicated,
    _counts,
    _frontier,
    _pair_argmin,
    _regen,
    _replicated,
    pair_knapsacks,
    replicated_choice,
)
from lynxpipe.plan.options import LayerOption
from lynxpipe.schedule.policy import KEEP_ALL

small = st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0])  # few values: ties everywhere


def _every_pair(kept, regen, cost, count, inflight, budget):
    """The first least (i, j, n) in row-major order over all ordered pairs: n layers on i."""
    best, arg = INFEASIBLE, ()
    for i in range(len(kept)):
        for j in range(len(kept)):
            for n in range(count + 1):
                mem = inflight * (n * kept[i] + (count - n) * kept[j]) + max(regen[i], regen[j])
                total = n * cost[i] + (count - n) * cost[j]
                if mem <= budget and total < best:
                    counts = [0] * len(kept)
                    counts[i] += n
                    counts[j] += count - n
                    best, arg = total, tuple(counts)
    return best, arg


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(small, small, small), min_size=1, max_size=6),
       st.integers(1, 5), st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from([0.0, 6.0, 14.0, 40.0]))
def test_pair_search_gives_the_first_least_mix_of_all_pairs(opts, count, inflight, budget):
    kept, regen, cost = (np.array(col) for col in zip(*opts))
    assert _pair_argmin(kept, regen, cost, count, inflight, budget)[:2] == \
        _every_pair(kept, regen, cost, count, inflight, budget)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(small, small), min_size=1, max_size=6), st.data(),
       st.lists(st.integers(0, 60), min_size=1, max_size=12))
def test_reused_choices_equal_fresh_ones(opts, data, budgets):
    """`Replicated` reuses an answer at a lower budget while the winner's mix still fits; at
    any sequence of budgets it must equal `replicated_choice` asked afresh."""
    options = [LayerOption(KEEP_ALL, int(k), {0: 1.0}, {0: int(r)}) for k, r in opts]
    sizes = [data.draw(st.integers(2, 6)), data.draw(st.integers(1, 2))]
    cost = np.array([[data.draw(small) for _ in options] for _ in sizes])
    cached = Replicated(sizes, options, cost, 2.0, 0)
    for budget in budgets:
        assert cached.choice(budget) == replicated_choice(sizes, options, cost, 2.0, budget, 0)


def _one_combination_at_a_time(sizes, options, cost, inflight, budget, credit):
    """lynx-heu's replicated search as first written: one two-option search per boundary
    combination, each with its own budget and transient peak."""
    big = int(np.argmax(sizes))
    small = [k for k in range(len(sizes)) if k != big]
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    regen = _regen(options, credit)
    front = _frontier(kept, cost[big])
    best, hold = None, (np.inf, 0.0)
    for combo in itertools.product(*(_frontier(kept, cost[k]) for k in small)):
        fixed_mem = sum(inflight * kept[o] * sizes[k] for k, o in zip(small, combo))
        fixed_cost = sum(cost[k, o] * sizes[k] for k, o in zip(small, combo))
        peak = max((regen[o] for o in combo), default=0.0)
        obj, sub, mem = _pair_argmin(kept[front], np.maximum(regen[front], peak),
                                     cost[big][front], sizes[big], inflight,
                                     budget - fixed_mem)
        if obj == INFEASIBLE or (best is not None and obj + fixed_cost >= best[1]):
            continue
        best = (_counts(sizes, len(options), big, front, sub, small, combo),
                float(obj + fixed_cost))
        hold = (mem, fixed_mem)
    return best, hold


@pytest.mark.parametrize("block", [1, 2, 32])
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(small, small), min_size=1, max_size=7), st.data(),
       st.integers(0, 80))
def test_combinations_searched_together_equal_one_at_a_time(block, opts, data, budget):
    """The boundary combinations' two-option searches run as blocks of one array operation;
    winner, objective and held memory must be those of searching them one at a time, for
    one or two boundary classes and blocks that split the combinations anywhere."""
    import lynxpipe.plan.knapsack as knapsack

    options = [LayerOption(KEEP_ALL, int(k), {0: 1.0}, {0: int(r)}) for k, r in opts]
    sizes = [data.draw(st.integers(2, 6))] + [1] * data.draw(st.integers(1, 2))
    cost = np.array([[data.draw(small) for _ in options] for _ in sizes])
    credit = data.draw(st.sampled_from([0, 1]))
    saved, knapsack.COMBO_BLOCK = knapsack.COMBO_BLOCK, block
    try:
        found, hold = _replicated(sizes, options, cost, 2.0, budget, credit)
    finally:
        knapsack.COMBO_BLOCK = saved
    ref, ref_hold = _one_combination_at_a_time(sizes, options, cost, 2.0, budget, credit)
    assert (found.counts, found.objective) == ref if ref else found is None
    assert hold == ref_hold


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(small, small, small), min_size=1, max_size=6),
       st.integers(1, 6), st.integers(0, 7), st.sampled_from([1.0, 2.0, 3.0]),
       st.lists(st.sampled_from([0.0, 6.0, 14.0, 40.0, 90.0]), min_size=8, max_size=8))
def test_counts_searched_together_equal_one_at_a_time(opts, first, extra, inflight, budgets):
    """The partitioner asks a stage's exposed recompute for a block of layer counts in one
    array operation: each count's least cost must be the one-count search's, infeasible
    included (mixes beyond a count are masked, not searched)."""
    kept, regen, cost = (np.array(col) for col in zip(*opts))
    counts = range(first, first + extra + 1)
    block = pair_knapsacks(kept, regen, cost, counts, inflight, budgets[:len(counts)])
    assert block == [_pair_argmin(kept, regen, cost, n, inflight, b)[0]
                     for n, b in zip(counts, budgets)]
    assert block == [_every_pair(kept, regen, cost, n, inflight, b)[0]
                     for n, b in zip(counts, budgets)]
