"""The count programme's skyline sweep against the definition of dominance, pair by pair."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.plan.countdp import _Frontier, _skyline

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
