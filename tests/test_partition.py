"""The balanced partition's DP: the least slowest stage over every contiguous split."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.plan.partition import _dp


def _splits(num_layers: int, p: int):
    for cuts in itertools.combinations(range(1, num_layers), p - 1):
        bounds = (0, *cuts, num_layers)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(1, 4), st.data())
def test_dp_finds_the_least_slowest_stage(num_layers, p, data):
    p = min(p, num_layers)
    # per stage, a time that never falls as the stage takes more layers (what the DP's early
    # stop relies on); some stages cannot hold many layers at all
    steps = [data.draw(st.lists(st.floats(0, 5), min_size=num_layers, max_size=num_layers))
             for _ in range(p)]
    caps = [data.draw(st.integers(1, num_layers + 1)) for _ in range(p)]

    def stage_ms(stage: int, count: int) -> float:
        if count > caps[stage]:
            return float("inf")
        return sum(steps[stage][:count])

    found = _dp(num_layers, p, stage_ms)
    best = min((max(stage_ms(s, k) for s, k in enumerate(split)), split)
               for split in _splits(num_layers, p))
    if best[0] == float("inf"):
        assert found is None
    else:
        assert found is not None
        assert max(stage_ms(s, k) for s, k in enumerate(found)) == best[0]
