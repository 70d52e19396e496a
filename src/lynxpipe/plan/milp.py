"""The per-rank MILP model shared by lynx-opt and checkmate (HiGHS through scipy.optimize.milp).

`RankMilp` holds one rank's decisions over its period: a keep/drop point per segment of every
layer (or full recompute) and, per point, the window its recompute task runs in (or on demand),
with the memory bounded at every allocation event of the period as the simulator counts it.
lynx-opt adds a step-time timeline on top; checkmate minimises the recompute time alone.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from lynxpipe.errors import LynxError
from lynxpipe.plan.period import NEVER, Key, LayerData, Period, Point
from lynxpipe.schedule.policy import FULL, FULL_SEGMENT, LayerPolicy

F_REACH = 1   # forward windows of layers within this distance (all are alike for memory)
B_REACH = 2   # backward windows of up to this many layers above (longer = held across more)
BUDGET_HAIR = 1e-6  # of a scaled budget row: HiGHS' default feasibility tolerance


class Lp:
    """A small sparse MILP builder on scipy.optimize.milp (HiGHS)."""

    def __init__(self) -> None:
        self.c: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.entries: list[tuple[int, int, float]] = []
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.budget_rows: list[int] = []

    def var(self, ub: float = 1.0, integer: bool = True, cost: float = 0.0) -> int:
        self.c.append(cost)
        self.ub.append(ub)
        self.integer.append(int(integer))
        return len(self.c) - 1

    def row(self, terms: dict[int, float], lo: float = -np.inf, hi: float = np.inf,
            budget: bool = False, byte: float = 0.0) -> None:
        """Add lo <= terms <= hi. A `budget` row (memory <= budget, scaled so that one byte is
        `byte`) counts whole bytes: a plan needing exactly the budget fits, so the bound moves
        half a byte up; it is then kept a hair below that (never a whole byte), since HiGHS may
        overshoot a row by its feasibility tolerance (see `solve`)."""
        r = len(self.lo)
        if budget:
            self.budget_rows.append(r)
            hi += 0.5 * byte - (min(BUDGET_HAIR, 0.25 * byte) if byte else BUDGET_HAIR)
        self.entries += [(r, v, a) for v, a in terms.items() if a]
        self.lo.append(lo)
        self.hi.append(hi)

    def solve(self, time_limit: float) -> tuple[np.ndarray, float] | None:
        """Solution and the absolute gap to HiGHS's dual bound; None when infeasible."""
        rows, cols, vals = zip(*self.entries)
        a = coo_matrix((vals, (rows, cols)), shape=(len(self.lo), len(self.c))).tocsr()
        bound, hi = np.array(self.hi), np.array(self.hi)
        for hair in (0.0, 1e-5, 1e-4):
            hi[self.budget_rows] = bound[self.budget_rows] - hair
            res = milp(np.array(self.c), constraints=LinearConstraint(a, self.lo, hi),
                       integrality=np.array(self.integer), bounds=Bounds(0.0, np.array(self.ub)),
                       options={"time_limit": time_limit, "disp": False})
            # status 4: HiGHS found a point within its feasibility tolerance of a budget row
            # and then rejected it; moving the row a hair further down makes it clearly out
            if res.status != 4:
                break
        if res.x is None:
            if res.status not in (1, 2):  # 1: time limit, nothing found; 2: infeasible
                raise LynxError(f"the MILP solver failed ({res.message}) on a {len(self.lo)}"
                                f" x {len(self.c)} model; try another --budget, or the 'full' / "
                                "'selective' policies, which need no solver")
            return None
        bound = getattr(res, "mip_dual_bound", None)
        return res.x, max(0.0, res.fun - bound) if bound is not None and np.isfinite(bound) \
            else 0.0


Placement = dict[tuple[int, int], Key | None]
"""(layer, segment) -> window of the period (None: on demand)."""


class RankMilp:
    """The decisions and memory rows of one rank's period, inside a shared `Lp`.

    Variables: y[layer, segment, point] (the keep/drop point; u = full recompute) and, per
    point, x[.., window] (the task runs there if that point is chosen; None = on demand):
    per-point placement binaries keep durations and bytes linear without big-M.
    """

    def __init__(self, lp: Lp, data: LayerData, period: Period, num_layers: int,
                 budget: int) -> None:
        self.lp, self.data, self.p, self.num_layers, self.budget = lp, data, period, \
            num_layers, budget
        self.scale = float(max(1, period.inflight * (len(period.layers) * data.saved
                                                     + sum(period.extras))))
        self.y: dict[tuple[int, int], list[int]] = {}
        self.u: dict[int, int] = {}
        # (layer, seg) -> [(point, {window or None: x var})] for every point that recomputes
        self.x: dict[tuple[int, int], list[tuple[Point, dict[Key | None, int]]]] = {}
        self.tie: dict[int, float] = {}

    def build(self) -> RankMilp:
        """Add the rank's variables and rows to the shared `Lp`; returns self."""
        for layer in self.p.layers:
            self._choices(layer)
            for seg in self._segments():
                self._placements(layer, seg)
        self._memory()
        return self

    def load(self, keys: list[Key | None]) -> list[list[tuple[int, float]]]:
        """Per task, its (x var, duration) pairs in any of `keys` (one list per task)."""
        out = []
        for choices in self.x.values():
            task = [(xs[k], pt.ms) for pt, xs in choices for k in keys if k in xs]
            if task:
                out.append(task)
        return out

    def _segments(self) -> list[int]:
        return list(self.data.points) + ([FULL_SEGMENT] if self.data.full else [])

    def _pts(self, layer: int, seg: int) -> list[tuple[int, Point]]:
        if seg == FULL_SEGMENT:
            return [(self.u[layer], self.data.full)]
        return list(zip(self.y[(layer, seg)], self.data.points[seg]))

    def _choices(self, layer: int) -> None:
        lp, data = self.lp, self.data
        if data.full:
            self.u[layer] = lp.var()
            self.tie[self.u[layer]] = data.full.ms
        for seg, pts in data.points.items():
            self.y[(layer, seg)] = [lp.var() for _ in pts]
            self.tie.update(zip(self.y[(layer, seg)], (pt.ms for pt in pts)))
            lp.row({**{v: 1.0 for v in self.y[(layer, seg)]},
                    **({self.u[layer]: 1.0} if data.full else {})}, 1.0, 1.0)
        if data.options is None:
            return
        z = [lp.var() for _ in data.options]
        lp.row({**{v: 1.0 for v in z}, **({self.u[layer]: 1.0} if data.full else {})}, 1.0, 1.0)
        for seg in data.points:
            for i, v in enumerate(self.y[(layer, seg)]):
                lp.row({v: 1.0, **{zv: -1.0 for zv, o in zip(z, data.options) if o[seg] == i}},
                       0.0, 0.0)

    def _eligible(self, layer: int, need: int) -> list[Key]:
        near = [k for k in self.p.pre if k[0] != "F" or not 0 <= k[2] < self.num_layers
                or abs(k[2] - layer) <= F_REACH]
        return near + [k for k in self.p.bwd if (k[1] == layer and k[2] < need)
                       or layer < k[1] <= layer + B_REACH]

    def _placements(self, layer: int, seg: int) -> None:
        out = []
        for v, pt in self._pts(layer, seg):
            if pt.regen or pt.ms:
                # full recompute replays the layer's forward collectives: on demand only
                near = self._eligible(layer, pt.need) if seg != FULL_SEGMENT else []
                xs = {k: self.lp.var() for k in near + [None]}
                self.lp.row({**{x: 1.0 for x in xs.values()}, v: -1.0}, 0.0, 0.0)
                out.append((pt, xs))
        self.x[(layer, seg)] = out

    def _kept(self, layer: int, mult: float, terms: dict[int, float]) -> float:
        """Add `mult` x the layer's kept bytes (scaled) to `terms`; return the constant part."""
        data = self.data
        for seg, pts in data.points.items():
            for v, pt in zip(self.y[(layer, seg)], pts):
                terms[v] += mult * pt.kept / self.scale
        if data.full:
            terms[self.u[layer]] += mult * (data.full.kept - data.pinned) / self.scale
        return mult * data.pinned

    def _bound(self, mult: dict[int, float], live: set[int], pos: tuple[int, int, int],
               const: float, own: tuple[int, int] | None) -> None:
        """Memory at one event <= budget: kept of every held copy, tensors of the period's
        micro-batch regenerated so far whose layer is not yet backwarded (`live`), and the
        on-demand ones of the layer at `own` = (layer, step)."""
        terms: dict[int, float] = defaultdict(float)
        for layer, m in mult.items():
            const += self._kept(layer, m, terms)
        for (layer, _), choices in self.x.items():
            if layer not in live:
                continue
            for pt, xs in choices:
                for k, x in xs.items():
                    if k is None:
                        due = own is not None and own[0] == layer and pt.need <= own[1]
                    else:
                        due = k[0] != "B" or (self.p.order[k[1]], k[2], 1) <= pos
                    if due:
                        terms[x] += pt.regen / self.scale
        self.lp.row(terms, hi=(self.budget - const) / self.scale, budget=True,
                    byte=1.0 / self.scale)

    def _memory(self) -> None:
        p, n = self.p, self.p.inflight
        every, extras = set(p.layers), sum(p.extras)
        self._bound({g: n for g in every}, every, (-1, 0, 0), n * extras + p.buffer, None)
        steps: dict[int, set[int]] = defaultdict(set)
        for _, unit, k in p.bwd:
            steps[unit].add(k)
        for unit, idx in p.order.items():
            base = (n - 1) * extras + p.extras[0] + p.buffer
            if unit == self.num_layers:
                for k in sorted(steps[unit]):
                    self._bound({g: n for g in every}, every, (idx, k, 1),
                                base + p.extras[1] - p.head_freed[k], None)
            elif unit >= 0:
                held = {g: n - 1 + (g <= unit) for g in every}
                below = {g for g in every if g <= unit}
                for k, phase in self._events(unit, steps[unit]):
                    self._bound(held, below, (idx, k, phase), base - self.data.freed[k],
                                (unit, k))

    def _events(self, layer: int, windows: set[int]) -> list[tuple[int, int]]:
        """(step, 0) before a step some task may need; (step, 1) at a backward window."""
        needs = {pt.need for seg in self._segments() for _, pt in self._pts(layer, seg)
                 if pt.regen and pt.need < NEVER}
        return sorted([(k, 0) for k in needs] + [(k, 1) for k in windows])

    def extract(self, x: np.ndarray) -> tuple[dict[int, LayerPolicy], Placement]:
        """Policies of the rank's layers and the window of each task."""
        policies: dict[int, LayerPolicy] = {}
        placement: Placement = {}
        for layer in self.p.layers:
            full = self.data.full is not None and x[self.u[layer]] > 0.5
            dropped: set[str] = set()
            for seg in ([FULL_SEGMENT] if full else list(self.data.points)):
                for pt, xs in self.x.get((layer, seg), []):
                    chosen = [k for k, v in xs.items() if x[v] > 0.5]
                    if chosen:
                        dropped |= pt.dropped
                        placement[(layer, seg)] = chosen[0]
            policies[layer] = FULL if full else LayerPolicy(frozenset(dropped))
        return policies, placement
