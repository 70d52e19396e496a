"""Choosing one option per layer under a memory budget: a multiple-choice knapsack MILP.

Layers of a rank fall into *classes* of identical layers (same costs); the MILP picks how many
layers of each class take each option (integer counts), so its size does not grow with depth.
Solved with HiGHS through `scipy.optimize.milp`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from lynxpipe.plan.options import LayerOption

INFEASIBLE = float("inf")


@dataclass(frozen=True)
class Choice:
    """Solution: options per class (count of layers taking each), objective and MIP gap."""

    counts: tuple[tuple[int, ...], ...]
    """counts[k][o]: layers of class k taking option o."""
    objective: float
    """Total cost (ms per micro-batch) of the choice."""
    mip_gap: float
    """Relative gap reported by HiGHS (0 when proven optimal)."""


def choose_counts(class_sizes: list[int], options: list[LayerOption], cost: np.ndarray,
                  inflight: float, activation_bytes: int, time_limit_s: float = 10.0,
                  transient_credit: int = 0) -> Choice | None:
    """Minimise sum(cost[k, o] * x[k, o]) with inflight * kept + transient <= activation_bytes.

    The transient term is the largest regenerated-bytes of any option in use (one layer's
    tensors come back at a time), less `transient_credit` (memory already freed by then).
    Returns None when no choice fits.
    """
    nk, no = len(class_sizes), len(options)
    nx = nk * no
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    regen = _regen(options, transient_credit)
    scale = max(float(activation_bytes), 1.0)
    # variables: x[k, o] (integer counts), y[o] (option used), t (transient bytes / scale)
    c = np.concatenate([cost.reshape(-1), np.zeros(no), [0.0]])
    rows, lo, hi = [], [], []
    for k, size in enumerate(class_sizes):
        row = np.zeros(nx + no + 1)
        row[k * no:(k + 1) * no] = 1.0
        rows.append(row), lo.append(size), hi.append(size)
    mem = np.zeros(nx + no + 1)
    for k in range(nk):
        mem[k * no:(k + 1) * no] = inflight * kept / scale
    mem[-1] = 1.0
    rows.append(mem), lo.append(-np.inf), hi.append(activation_bytes / scale)
    for o in range(no):
        row = np.zeros(nx + no + 1)
        row[-1], row[nx + o] = 1.0, -regen[o] / scale
        rows.append(row), lo.append(0.0), hi.append(np.inf)
        for k, size in enumerate(class_sizes):
            row = np.zeros(nx + no + 1)
            row[k * no + o], row[nx + o] = 1.0, -float(size)
            rows.append(row), lo.append(-np.inf), hi.append(0.0)
    upper = np.concatenate([np.repeat(class_sizes, no).astype(float), np.ones(no), [np.inf]])
    integrality = np.concatenate([np.ones(nx + no), [0]])
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nx + no + 1), upper),
               options={"time_limit": time_limit_s, "disp": False})
    if res.x is None:
        return None
    x = np.rint(res.x[:nx]).astype(int).reshape(nk, no)
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    return Choice(tuple(tuple(int(v) for v in row) for row in x), float(res.fun), gap)


def pair_knapsacks(kept: np.ndarray, regen: np.ndarray, cost: np.ndarray,
                   counts: range, inflight: float, budgets: list[float]) -> list[float]:
    """Least cost of `count` identical layers mixing at most two options under the budget,
    for each count of `counts` with the matching budget, in one array operation (the
    partitioner asks a stage for one layer count after another).

    The LP optimum of a one-class multiple-choice knapsack mixes two adjacent hull options, so
    two-option mixes are (nearly) optimal and cheap enough to run for every DP cell. The same
    element-wise operations as `_pair_argmin`, one count at a time (mixes n > count masked
    out), so the same least costs.
    """
    ii, jj = _upper_pairs(len(kept))
    c = np.array(counts)[:, None, None]
    k = np.arange(counts[-1] + 1)[None, None, :]
    kept_mem = inflight * (k * kept[ii][None, :, None] + (c - k) * kept[jj][None, :, None])
    time_ms = k * cost[ii][None, :, None] + (c - k) * cost[jj][None, :, None]
    mem = kept_mem + np.maximum(regen[ii], regen[jj])[None, :, None]
    fits = (mem <= np.array(budgets, dtype=float)[:, None, None]) & (k <= c)
    best = np.where(fits, time_ms, np.inf).reshape(len(counts), -1).min(axis=1)
    return [INFEASIBLE if b == np.inf else float(b) for b in best.tolist()]


def _pair_argmin(kept: np.ndarray, regen: np.ndarray, cost: np.ndarray, count: int,
                 inflight: float, budget: float) -> tuple[float, tuple[int, ...], float]:
    """`pair_knapsacks` for one count, with the counts per option and their memory too: the
    first least (i, j, n) in row-major order, n layers on option i and the rest on j."""
    return _pair_argmins(kept, regen[None, :], cost, count, inflight, np.array([budget]))[0]


COMBO_BLOCK = 32
"""Boundary combinations searched per array operation (a block's arrays stay a few MB)."""


def _pair_argmins(kept: np.ndarray, regens: np.ndarray, cost: np.ndarray, count: int,
                  inflight: float, budgets: np.ndarray,
                  ) -> list[tuple[float, tuple[int, ...], float]]:
    """`_pair_argmin` for each row of `regens` with the matching budget, in blocks of rows:
    lynx-heu asks once per boundary combination, which differ only in those two. The same
    element-wise operations as one search at a time, so the same answers, ties included.

    Only pairs i <= j are searched: (j, i, n) is (i, j, count - n) with the same two
    products added the other way round, so the same floats, and row-major order reaches the
    i < j copy first.
    """
    ii, jj = _upper_pairs(len(kept))
    k = np.arange(count + 1)[None, :]
    kept_mem = inflight * (k * kept[ii][:, None] + (count - k) * kept[jj][:, None])
    time_ms = k * cost[ii][:, None] + (count - k) * cost[jj][:, None]
    out: list[tuple[float, tuple[int, ...], float]] = []
    for lo in range(0, len(budgets), COMBO_BLOCK):
        regen = regens[lo:lo + COMBO_BLOCK]
        # taken along the options axis, so the rows stay C-ordered (plain indexing there
        # yields a column-major array, and every operation after it strides)
        peak = np.maximum(np.take(regen, ii, axis=1), np.take(regen, jj, axis=1))
        mem = kept_mem[None] + peak[:, :, None]
        total = np.where(mem <= budgets[lo:lo + COMBO_BLOCK, None, None], time_ms[None],
                         np.inf).reshape(len(regen), -1)
        flat = np.argmin(total, axis=1)
        for row, at in enumerate(flat.tolist()):
            best = float(total[row, at])
            if best == np.inf:
                out.append((INFEASIBLE, (), np.inf))
                continue
            pair, n = divmod(at, count + 1)
            counts = [0] * len(kept)
            counts[int(ii[pair])] += n
            counts[int(jj[pair])] += count - n
            out.append((best, tuple(counts), float(mem[row].reshape(-1)[at])))
    return out


@functools.cache
def _upper_pairs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i <= j over `size` options, in row-major order (shared: read-only)."""
    pairs = np.triu_indices(size)
    for a in pairs:
        a.flags.writeable = False
    return pairs


def replicated_choice(class_sizes: list[int], options: list[LayerOption], cost: np.ndarray,
                      inflight: float, activation_bytes: int,
                      transient_credit: int = 0) -> Choice | None:
    """HEU's solve: one option for each layer of the small classes (boundary layers), and a mix
    of at most two options replicated over the big class (the repeated interior layer).

    Exhaustive over the boundary options, so it costs O(options^(small classes)) pair solves;
    meant for one or two boundary classes.
    """
    return _replicated(class_sizes, options, cost, inflight, activation_bytes,
                       transient_credit)[0]


class Replicated:
    """`replicated_choice` of one set of classes, asked at several budgets.

    Lowering the budget only shrinks what each boundary combination may choose, so every
    combination's least cost can only rise; while the winner's own mix still fits, it stays
    the first least one: the same answer. No answer means none below. The tightening loop
    asks at falling budgets, often a few MB apart.
    """

    def __init__(self, class_sizes: list[int], options: list[LayerOption], cost: np.ndarray,
                 inflight: float, transient_credit: int) -> None:
        self.args = (class_sizes, options, cost, inflight)
        self.credit = transient_credit
        self.known: list[tuple[int, Choice | None, tuple[float, float]]] = []

    def choice(self, activation_bytes: int) -> Choice | None:
        """`replicated_choice(..., activation_bytes, ...)`, reusing an answer where it holds."""
        for budget, found, (mem, fixed_mem) in self.known:
            if activation_bytes <= budget and (
                    found is None or mem <= activation_bytes - fixed_mem):
                return found
        found, hold = _replicated(*self.args, activation_bytes, self.credit)
        self.known.append((activation_bytes, found, hold))
        return found


def _replicated(class_sizes: list[int], options: list[LayerOption], cost: np.ndarray,
                inflight: float, activation_bytes: int, transient_credit: int,
                ) -> tuple[Choice | None, tuple[float, float]]:
    """`replicated_choice`, with the winner's big-class memory and boundary memory."""
    big = int(np.argmax(class_sizes))
    small = [k for k in range(len(class_sizes)) if k != big]
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    regen = _regen(options, transient_credit)
    front = _frontier(kept, cost[big])
    combos = list(itertools.product(*(_frontier(kept, cost[k]) for k in small)))
    fixed_mem = [sum(inflight * kept[o] * class_sizes[k] for k, o in zip(small, combo))
                 for combo in combos]
    peak_regen = [max((regen[o] for o in combo), default=0.0) for combo in combos]
    mixes = _pair_argmins(kept[front], np.maximum(regen[front][None, :],
                                                  np.array(peak_regen)[:, None]),
                          cost[big][front], class_sizes[big], inflight,
                          activation_bytes - np.array(fixed_mem, dtype=float))
    best: Choice | None = None
    hold = (np.inf, 0.0)
    for combo, (obj, sub, mem), held in zip(combos, mixes, fixed_mem):
        fixed_cost = sum(cost[k, o] * class_sizes[k] for k, o in zip(small, combo))
        if obj == INFEASIBLE or (best is not None and obj + fixed_cost >= best.objective):
            continue
        best = Choice(_counts(class_sizes, len(options), big, front, sub, small, combo),
                      float(obj + fixed_cost), 0.0)
        hold = (mem, held)
    return best, hold


def _counts(class_sizes: list[int], num_options: int, big: int, front: list[int],
            sub: tuple[int, ...], small: list[int], combo: tuple[int, ...],
            ) -> tuple[tuple[int, ...], ...]:
    """Layers per class and option: the big class's mix `sub` over its frontier `front`,
    every layer of small class `small[i]` on option `combo[i]`."""
    rows = [[0] * num_options for _ in class_sizes]
    for idx, n in zip(front, sub):
        rows[big][idx] += n
    for k, o in zip(small, combo):
        rows[k][o] = class_sizes[k]
    return tuple(tuple(r) for r in rows)


def _frontier(kept: np.ndarray, cost: np.ndarray) -> list[int]:
    """Indices of options not dominated in (kept bytes, cost)."""
    out: list[int] = []
    for idx in sorted(range(len(kept)), key=lambda i: (kept[i], cost[i])):
        if not out or cost[idx] < cost[out[-1]] - 1e-12:
            out.append(idx)
    return out


def improve(choice: Choice, class_sizes: list[int], options: list[LayerOption], cost: np.ndarray,
            inflight: float, activation_bytes: int, transient_credit: int = 0) -> Choice:
    """Greedy upgrades: spend leftover memory moving single layers to cheaper options.

    The replicated solution mixes at most two options per class; optimal solutions may mix more,
    and single-layer upgrades into the leftover memory recover most of that difference.
    """
    counts = [list(row) for row in choice.counts]
    kept = np.array([o.kept_bytes for o in options], dtype=float)
    regen = _regen(options, transient_credit)
    while True:
        used = [o for row in counts for o, n in enumerate(row) if n]
        mem = inflight * sum(kept[o] * n for row in counts for o, n in enumerate(row))
        left = activation_bytes - mem - max(regen[o] for o in used)
        best = None
        for k, row in enumerate(counts):
            for src in (o for o, n in enumerate(row) if n):
                gain = cost[k, src] - cost[k]
                extra = inflight * (kept - kept[src])
                peak = np.maximum(regen, max(regen[o] for o in used)) - max(regen[o] for o in used)
                ok = (gain > 1e-12) & (extra + peak <= left)
                if ok.any():
                    dst = int(np.argmax(np.where(ok, gain, -np.inf)))
                    if best is None or gain[dst] > best[0]:
                        best = (gain[dst], k, src, dst)
        if best is None:
            break
        _, k, src, dst = best
        counts[k][src] -= 1
        counts[k][dst] += 1
    objective = float(sum(cost[k, o] * n for k, row in enumerate(counts) for o, n in enumerate(row)))
    return Choice(tuple(tuple(r) for r in counts), objective, choice.mip_gap)


def _regen(options: list[LayerOption], credit: int) -> np.ndarray:
    """Transient bytes of each option once `credit` bytes have been freed."""
    return np.maximum(np.array([o.regen_bytes for o in options], dtype=float) - credit, 0.0)
