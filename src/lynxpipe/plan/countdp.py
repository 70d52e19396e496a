"""Exact on-demand keep sets without a solver: a dynamic programme over option counts.

Checkmate's count model (`ondemand.py`) has one integer count per option and, with the options
in Jackson order (largest regenerated peak R first, so placed lowest), the memory rows

    forward:           n * S                          <= F
    backward, option i: (n - 1) * S + P_i + R_i       <= G     (only if option i is used)

where S is the kept bytes of all the rank's layers and P_i those of options 0..i. Writing
S = P_i + T_i (T_i: kept bytes of the options after i), row i reads n*P_i + (n-1)*T_i + R_i <= G:
it caps the kept bytes still to be added after option i. So options are added in order with
the state (layers placed k, prefix P, allowance W = least remaining cap, scaled by n - 1), and a
state is dominated by one with no more layers' time, no larger P and no smaller W at the same k.
That skyline is small because layers are identical: the programme is exact, needs no MILP, and
on regular stages it runs in milliseconds (tested against the MILP and exhaustive search).
"""

from __future__ import annotations

import bisect
from dataclasses import replace

import numpy as np

from lynxpipe.plan.ondemand import CountOption
from lynxpipe.plan.period import Period
from lynxpipe.schedule.policy import LayerPolicy

INF = float("inf")


State = tuple[float, int, float, int, tuple]
"""One partial assignment with options 0..j decided: (ms, P, W, c, parent). ms: recompute time
of the layers placed so far; P: their kept bytes; W: (n - 1) x kept bytes the later options may
still add (inf: no row binds yet); c: layers on option j; parent: the counts before, as a
linked list (c_{j-1}, (c_{j-2}, ...)), so a successor costs O(1). Plain tuples, not dataclasses:
the programme builds tens of thousands of them."""


def _rows(period: Period, budget: int) -> tuple[float, float]:
    """Right-hand sides F (forward) and G (backward) of the rank's memory rows."""
    n, extras = period.inflight, sum(period.extras)
    forward = budget - n * extras - period.buffer
    backward = budget - ((n - 1) * extras + period.extras[0] + period.buffer)
    return forward, backward


def _skyline(states: list[State]) -> list[State]:
    """States not dominated in (ms, prefix bytes, -allowance), cheapest first."""
    states.sort(key=lambda s: (s[0], s[1], -s[2]))
    keys: list[int] = []       # prefix bytes, ascending
    caps: list[float] = []     # allowance, strictly ascending along keys
    out = []
    for s in states:
        i = bisect.bisect_right(keys, s[1])
        if i and caps[i - 1] >= s[2]:
            continue  # a cheaper state holds no more bytes and leaves at least as much room
        out.append(s)
        j = i
        while j < len(keys) and caps[j] <= s[2]:
            j += 1
        keys[i:j], caps[i:j] = [s[1]], [s[2]]
    return out


def _hull(options: list[CountOption]) -> list[tuple[float, float]]:
    """Lower convex envelope of (kept bytes, ms) over `options`, non-increasing in kept bytes:
    the least mean time per layer of any mix whose mean kept bytes is at most x."""
    pts = sorted({(float(o.kept_bytes), o.ms) for o in options})
    hull: list[tuple[float, float]] = []
    for x, y in pts:
        if hull and y >= hull[-1][1]:
            continue  # keeping more is never needed to be faster than this
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (x - hull[-2][0])
                                  >= (y - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append((x, y))
    return hull


def _least_ms(hull: list[tuple[float, float]], layers: int, cap: float) -> float:
    """Lower bound on the time of `layers` more layers whose kept bytes total at most `cap`
    (inf: not even the leanest option fits)."""
    if layers == 0:
        return 0.0
    if not hull or cap < hull[0][0] * layers:
        return INF
    x = cap / layers
    i = bisect.bisect_right(hull, (x, INF)) - 1
    if i == len(hull) - 1:
        return hull[-1][1] * layers
    (x0, y0), (x1, y1) = hull[i], hull[i + 1]
    return (y0 + (y1 - y0) * (x - x0) / (x1 - x0)) * layers


def _two_option_bound(options: list[CountOption], num: int, n: int, forward: float,
                      backward: float) -> float:
    """Least time of the plans that mix at most two options (an upper bound on the optimum,
    checked on the exact rows; vectorised over every pair and split)."""
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    peak = np.array([o.peak_bytes for o in options], dtype=float)
    ms = np.array([o.ms for o in options])
    a, b = np.triu_indices(len(options))  # a lies below b (Jackson order)
    c = np.arange(num + 1)[:, None]       # layers on option a
    total = c * kept[a] + (num - c) * kept[b]
    ok = n * total <= forward
    ok &= (c == 0) | (peak[a] <= 0) | ((n - 1) * total + c * kept[a] + peak[a] <= backward)
    ok &= (c == num) | (peak[b] <= 0) | (n * total + peak[b] <= backward)
    time_ms = np.where(ok, c * ms[a] + (num - c) * ms[b], INF)
    return float(time_ms.min()) if time_ms.size else INF


def best_counts(options: list[CountOption], period: Period, budget: int,
                ) -> tuple[int, ...] | None:
    """Layers per option with least recompute time whose rows fit `budget` (None: none fit).

    States that cannot beat the best two-option mix, by the convex bound on the layers still
    to place, are cut: the programme stays exact and small. (A beam run of the programme as a
    tighter incumbent was measured: the two-option mix is already optimal or within 0.01% on
    the paper-scale stages, so it only added time.)
    """
    num, n = len(period.layers), period.inflight
    forward, backward = _rows(period, budget)
    if forward < 0:
        return None
    hulls = [_hull(options[j + 1:]) for j in range(len(options))]
    upper = _two_option_bound(options, num, n, forward, backward) * (1 + 1e-9) + 1e-12
    done = _programme(options, hulls, num, n, forward, backward, upper)
    if not done:
        return None
    counts, link = [], (done[3], done[4])
    while link:
        counts.append(link[0])
        link = link[1]
    return tuple(reversed(counts))


def _programme(options: list[CountOption], hulls: list[list[tuple[float, float]]], num: int,
               n: int, forward: float, backward: float, upper: float) -> State | None:
    """Add options in Jackson order, keeping per layer count the skyline of states that can
    still beat `upper`; the best complete state."""
    frontier: dict[int, list[State]] = {0: [(0.0, 0, INF, 0, None)]}  # None: no option yet
    spare = forward / n
    for j, o in enumerate(options):
        hull, nxt = hulls[j], {}
        for k, states in frontier.items():
            for state in states:
                for t in _extend(state, o, num - k, n, forward, backward):
                    left = num - k - t[3]
                    cap = min(spare - t[1], t[2] / (n - 1) if n > 1 else INF)
                    if t[0] + _least_ms(hull, left, cap) <= upper:
                        nxt.setdefault(k + t[3], []).append(t)
        frontier = {k: _skyline(v) for k, v in nxt.items()}
    done = frontier.get(num)
    return min(done, key=lambda s: (s[0], s[1])) if done else None


def _extend(s: State, o: CountOption, left: int, n: int, forward: float,
            backward: float) -> list[State]:
    """`s` with 0..left more layers on option `o`, each successor within every row."""
    ms, prefix0, allowance0 = s[0], s[1], s[2]
    parent = (s[3], s[4]) if s[4] is not None else ()
    out = [(ms, prefix0, allowance0, 0, parent)]
    kept, peak = o.kept_bytes, o.peak_bytes
    for c in range(1, left + 1):
        prefix = prefix0 + c * kept
        if n * prefix > forward:
            break
        allowance = allowance0 - (n - 1) * c * kept
        if peak > 0:
            allowance = min(allowance, backward - peak - n * prefix)
        if allowance < 0:
            break  # more copies only add bytes
        # the forward row already caps what later options add: room beyond it is worth
        # nothing, and clipping it lets the skyline see more states as dominated (exact)
        allowance = min(allowance, (n - 1) * (forward / n - prefix))
        out.append((ms + c * o.ms, prefix, allowance, c, parent))
    return out


def solve_counts_dp(options: list[CountOption], period: Period, budget: int,
                    ) -> tuple[list[LayerPolicy], float] | None:
    """`ondemand.solve_counts` without a solver: the same policies bottom-up, gap 0."""
    counts = best_counts(options, period, budget)
    if counts is None:
        return None
    return [o.policy for o, c in zip(options, counts) for _ in range(c)], 0.0


def least_budget(options: list[CountOption], period: Period) -> int:
    """Smallest `budget` (bytes for the rank's activations and extras) any option mix fits."""
    options = [replace(o, ms=0.0) for o in options]  # feasibility only: a smaller skyline
    lo, hi = 0, 1
    while best_counts(options, period, hi) is None:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: hi fits, lo does not (or is 0)
        mid = (lo + hi) // 2
        if best_counts(options, period, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi if best_counts(options, period, lo) is None else lo
