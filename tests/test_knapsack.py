"""lynx-heu's knapsack: the two-option mix search against trying every ordered pair, and its
answers reused across budgets against fresh ones."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.plan.knapsack import (
    INFEASIBLE,
    Replicated,
    _pair_argmin,
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
