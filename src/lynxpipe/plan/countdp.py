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
import math
from dataclasses import replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from lynxpipe.plan.ondemand import CountOption
from lynxpipe.plan.period import Period
from lynxpipe.schedule.policy import LayerPolicy

INF = float("inf")


def _rows(period: Period, budget: int) -> tuple[float, float]:
    """Right-hand sides F (forward) and G (backward) of the rank's memory rows."""
    n, extras = period.inflight, sum(period.extras)
    forward = budget - n * extras - period.buffer
    backward = budget - ((n - 1) * extras + period.extras[0] + period.buffer)
    return forward, backward


def _hull(points: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """Lower convex envelope of (kept bytes, ms) `points`, non-increasing in kept bytes: the
    least mean time per layer of any mix whose mean kept bytes is at most x."""
    pts = sorted(set(points))
    hull: list[tuple[float, float]] = []
    for x, y in pts:
        if hull and y >= hull[-1][1]:
            continue  # keeping more is never needed to be faster than this
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (x - hull[-2][0])
                                  >= (y - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append((x, y))
    return hull


@lru_cache(maxsize=64)
def _suffix_hulls(points: tuple[tuple[float, float], ...],
                  ) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per option j, the hull of options j+1.. as (kept bytes, ms) arrays; keyed by the
    options' (kept bytes, ms) alone, all a hull reads (the same options are asked about at
    many budgets: by the tightening loop and `least_budget`)."""
    return tuple(_hull_arrays(points[j + 1:]) for j in range(len(points)))


def _hull_arrays(points: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    """`_hull(points)` as (kept bytes, ms) arrays, the form `_least_ms` reads."""
    hull = _hull(points)
    return np.array([x for x, _ in hull]), np.array([y for _, y in hull])


def _least_ms(hull: tuple[np.ndarray, np.ndarray], layers: np.ndarray, cap: np.ndarray,
              ) -> np.ndarray:
    """Lower bound on the time of `layers` more layers whose kept bytes total at most `cap`
    (inf: not even the leanest option fits), element-wise."""
    xs, ys = hull
    if not len(xs):
        return np.where(layers == 0, 0.0, INF)
    # no warnings to silence: the divisor is >= 1, cap is finite or +inf, the hull finite
    mean = np.interp(cap / np.maximum(layers, 1), xs, ys) * layers
    return np.where(layers == 0, 0.0, np.where(cap < xs[0] * layers, INF, mean))


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
    upper = _two_option_bound(options, num, n, forward, backward) * (1 + 1e-9) + 1e-12
    usable = _usable(options, num, n, forward, backward, upper)
    found = _programme([options[i] for i in usable], num, n, forward, backward, upper)
    if found is None:
        return None
    levels, at = found
    counts = [0] * len(options)
    for i, (parent, count) in zip(reversed(usable), reversed(levels)):
        counts[i] = int(count[at])
        at = parent[at]
    return tuple(counts)


def _usable(options: list[CountOption], num: int, n: int, forward: float, backward: float,
            upper: float) -> list[int]:
    """Indices of the options one layer of which can be in a plan that keeps the rows and
    beats `upper`: the others would only add levels where every state takes none of them.

    With one layer on option o and the other num - 1 on the leanest or the fastest option,
    the kept bytes, o's backward row and the time are at their least; if even that breaks a
    row or `upper`, no plan uses o.
    """
    least_kept = min(o.kept_bytes for o in options)
    least_ms = min(o.ms for o in options)
    out = []
    for i, o in enumerate(options):
        if n * (o.kept_bytes + (num - 1) * least_kept) > forward:
            continue
        if o.peak_bytes > 0 and (n * o.kept_bytes + (n - 1) * (num - 1) * least_kept
                                 + o.peak_bytes > backward):
            continue
        if o.ms + (num - 1) * least_ms > upper * (1 + 1e-9) + 1e-12:  # a hair over: rounding
            continue
        out.append(i)
    return out


class _Frontier(NamedTuple):
    """Partial assignments with options 0..j decided, one entry per state (numpy arrays)."""

    ms: np.ndarray
    """Recompute time of the layers placed so far."""
    prefix: np.ndarray
    """Their kept bytes (P)."""
    allowance: np.ndarray
    """(n - 1) x the kept bytes later options may still add (inf: no row binds yet)."""
    layers: np.ndarray
    """Layers placed so far (k)."""


def _programme(options: list[CountOption], num: int, n: int, forward: float, backward: float,
               upper: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], int] | None:
    """Add options in Jackson order, keeping per layer count the skyline of states that can
    still beat `upper`. Returns per option each state's (parent index, count on the option),
    and the index of the best complete state; None: no state completes.

    Vectorised over states x counts: every successor of every state in one array operation.
    """
    front = _Frontier(np.zeros(1), np.zeros(1), np.full(1, INF), np.zeros(1, dtype=np.int64))
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    spare = forward / n
    hulls = _suffix_hulls(tuple((float(o.kept_bytes), o.ms) for o in options))
    for o, hull in zip(options, hulls):
        front, parent, count = _successors(front, o, num, n, forward, backward)
        cap = np.minimum(spare - front.prefix,
                         front.allowance / (n - 1) if n > 1 else INF)
        ok = front.ms + _least_ms(hull, num - front.layers, cap) <= upper
        keep = np.flatnonzero(ok)
        keep = keep[_skyline(_Frontier(*(a[keep] for a in front)))]
        front = _Frontier(*(a[keep] for a in front))
        levels.append((parent[keep], count[keep]))
        if not len(keep):
            return None
    done = np.flatnonzero(front.layers == num)
    if not len(done):
        return None
    best = done[np.lexsort((front.prefix[done], front.ms[done]))[0]]
    return levels, int(best)


def _successors(s: _Frontier, o: CountOption, num: int, n: int, forward: float,
                backward: float) -> tuple[_Frontier, np.ndarray, np.ndarray]:
    """Every state with 0..(layers left) more layers on option `o` that keeps every row;
    with each successor's parent index and count."""
    c = np.arange(num + 1)[None, :]
    prefix = s.prefix[:, None] + c * o.kept_bytes
    allowance = s.allowance[:, None] - (n - 1) * c * o.kept_bytes
    if o.peak_bytes > 0:
        allowance = np.minimum(allowance, backward - o.peak_bytes - n * prefix)
    ok = (c <= num - s.layers[:, None]) & (n * prefix <= forward) & (allowance >= 0)
    # the forward row already caps what later options add: room beyond it is worth nothing,
    # and clipping it lets the skyline see more states as dominated (exact)
    allowance = np.minimum(allowance, (n - 1) * (forward / n - prefix))
    allowance[:, 0] = s.allowance  # no layer on `o`: no row of `o` applies, nothing clipped
    ok[:, 0] = True
    parent, count = np.nonzero(ok)
    front = _Frontier(s.ms[parent] + count * o.ms, prefix[parent, count],
                      allowance[parent, count], s.layers[parent] + count)
    return front, parent, count


def _skyline(s: _Frontier) -> np.ndarray:
    """Indices of the states not dominated, at the same layer count, in (ms, prefix bytes,
    -allowance); of equal states the first is kept.

    Sorted by time, only an earlier state can dominate, and by transitivity testing against
    the earlier survivors suffices; they are kept as a staircase (prefix up, allowance
    strictly up), so each test is one bisection: a sweep, not a pairwise table.
    """
    if len(s.ms) <= 1:  # most levels of a regular stage keep one state
        return np.arange(len(s.ms))
    order = np.lexsort((-s.allowance, s.prefix, s.ms, s.layers))
    keep: list[int] = []
    group, stair_p, stair_w = None, [], []
    for i, (p, w, k) in enumerate(zip(s.prefix[order].tolist(), s.allowance[order].tolist(),
                                      s.layers[order].tolist())):
        if k != group:
            group, stair_p, stair_w = k, [], []
        j = bisect.bisect_right(stair_p, p)
        if j and stair_w[j - 1] >= w:
            continue  # a survivor holds no more bytes and leaves no less room
        keep.append(i)
        lo = hi = bisect.bisect_left(stair_p, p)
        while hi < len(stair_w) and stair_w[hi] <= w:
            hi += 1
        stair_p[lo:hi], stair_w[lo:hi] = [p], [w]
    return np.sort(order[keep])


def solve_counts_dp(options: list[CountOption], period: Period, budget: int,
                    ) -> tuple[list[LayerPolicy], float] | None:
    """`ondemand.solve_counts` without a solver: the same policies bottom-up, gap 0."""
    counts = best_counts(options, period, budget)
    if counts is None:
        return None
    return policies_of(options, counts), 0.0


def policies_of(options: list[CountOption], counts: tuple[int, ...]) -> list[LayerPolicy]:
    """The layers' policies bottom-up: `counts[i]` layers on option i, in Jackson order."""
    return [o.policy for o, c in zip(options, counts) for _ in range(c)]


def needed_budget(options: list[CountOption], counts: tuple[int, ...], period: Period) -> int:
    """The least `budget` whose rows `counts` keep (they keep every larger one too)."""
    n, extras = period.inflight, sum(period.extras)
    total = sum(c * o.kept_bytes for o, c in zip(options, counts))
    need = n * total + n * extras + period.buffer
    base = (n - 1) * extras + period.extras[0] + period.buffer
    prefix = 0
    for o, c in zip(options, counts):
        prefix += c * o.kept_bytes
        if c and o.peak_bytes > 0:
            need = max(need, math.ceil((n - 1) * total + prefix + o.peak_bytes + base))
    return need


class Solved:
    """The count programme's answers for one rank's rows at several budgets.

    An answer at budget B stays the answer at every budget from what its counts need up to B:
    the rows only tighten as the budget falls, and it still keeps them. No answer at B means
    none below B either. The tightening loops ask at falling budgets, so they mostly reuse.
    """

    def __init__(self, options: list[CountOption], period: Period) -> None:
        self.options, self.period = options, period
        self.known: list[tuple[int, int, tuple[int, ...] | None]] = []  # (lo, hi, counts)

    def counts(self, budget: int) -> tuple[int, ...] | None:
        """`best_counts(options, period, budget)`, reusing an earlier answer where it holds."""
        for lo, hi, counts in self.known:
            if lo <= budget <= hi:
                return counts
        counts = best_counts(self.options, self.period, budget)
        lo = -math.inf if counts is None else needed_budget(self.options, counts, self.period)
        self.known.append((lo, budget, counts))
        return counts


def least_ms_bound(options: list[CountOption], period: Period, budget: int) -> float:
    """A lower bound on the recompute time of `best_counts(options, period, budget)` (inf:
    nothing fits): the forward row alone with fractional counts, i.e. the options' convex
    hull at the mean kept bytes per layer the row allows (the programme's own cut)."""
    num, n = len(period.layers), period.inflight
    forward, _ = _rows(period, budget)
    if forward < 0:
        return INF
    hull = _hull_arrays(tuple((float(o.kept_bytes), o.ms) for o in options))
    return float(_least_ms(hull, np.array([num]), np.array([forward / n]))[0])


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
