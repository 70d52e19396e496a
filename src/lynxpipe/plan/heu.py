"""`lynx-heu` (SPEC §5): solve the repeated layer once, replicate, patch boundaries, verify.

Layers whose natural windows have the same capacities form one class (all interior layers of a
stage are identical; the stage's top layer differs). For each class the exposed time of every
option is computed against its natural windows; a tiny integer-count knapsack per rank picks how
many layers of each class take each option under the memory budget. Where its conservative
memory bound sends layers to `full` (one stage per rank), checkmate's exact count programme
(`countdp`) re-picks the counts with the same prices: every byte of the budget works. The
simulator checks the full timeline and the rank's budget is tightened and re-solved when it is
violated. A final pass moves still-exposed tasks into windows the simulation shows idle (RECV
waits, bubbles).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from lynxpipe.cost.memory import RankBudget
from lynxpipe.plan.checkmate import checkmate_run, least_step_ms, rank_counts
from lynxpipe.plan.finalize import base_order
from lynxpipe.plan.knapsack import Replicated, choose_counts, improve
from lynxpipe.plan.loop import assign, tighten_loop
from lynxpipe.plan.ondemand import CountOption, count_options
from lynxpipe.plan.options import layer_options
from lynxpipe.plan.partition import choose_partition, default_partition
from lynxpipe.plan.period import Period, make_period
from lynxpipe.plan.recompute import TaskKey, required_tasks
from lynxpipe.plan.refine import refine, trim_to_fit
from lynxpipe.plan.types import Plan, PlanRequest
from lynxpipe.plan.windows import Slot, exposure, natural_slots
from lynxpipe.schedule.actions import Window
from lynxpipe.schedule.policy import FULL, KEEP_ALL, LayerPolicy, stage_layers
from lynxpipe.schedule.windows import BWD_COLL
from lynxpipe.sim.engine import simulate
from lynxpipe.sim.result import SimResult

TIE_BREAK = 1e-3
ASIDE_LIMIT_S = 0.2  # per-rank MILP limit for checkmate keep sets on the balanced partition


class HeuPlanner:
    """State shared by the solver and placer of one lynx-heu run."""

    def __init__(self, req: PlanRequest, partition: tuple[int, ...]):
        self.req, self.partition = req, partition
        costs, num_layers = req.costs, req.model.num_layers
        self.options = layer_options(costs.layer)
        self.stage_of: dict[int, int] = {}
        self.slots: dict[tuple[int, int], Slot] = {}
        stages = stage_layers(partition)
        for s, rng in enumerate(stages):
            self.stage_of.update({g: s for g in rng})
            self.slots.update(natural_slots(costs, rng, s == len(stages) - 1, num_layers))
        self.stage_of[num_layers] = len(stages) - 1
        self._costs: dict[int, tuple[float, ...]] = {}
        self._periods: dict[int, Period] = {}
        self._by_shape: dict[tuple, tuple[float, ...]] = {}
        self._segs: dict[int, dict[int, Slot]] = {}
        self._priced: dict[tuple[float, ...], list[CountOption]] = {}
        self._replicated: dict[tuple, Replicated] = {}
        self._placed: dict[TaskKey, Window | None] = {}
        for (g, seg), slot in self.slots.items():
            self._segs.setdefault(g, {})[seg] = slot

    def layer_costs(self, layer: int) -> tuple[float, ...]:
        """Exposed time of every option for this layer (each tightening round asks again).

        Layers whose segments sit in windows of the same shape (same capacities, shared the
        same way) have the same costs: all interior layers of a stage are computed once.
        """
        if layer not in self._costs:
            segs = self._segs.get(layer, {})
            shape = tuple(sorted((seg, slot.host - layer, slot.step, slot.capacity_ms)
                                 for seg, slot in segs.items()))
            if shape not in self._by_shape:
                c = self.req.costs.contention
                # a small weight on total recompute breaks ties towards less (hidden)
                # recompute, which leaves the windows' contention and memory lighter
                self._by_shape[shape] = tuple(
                    round(exposure(o, segs, c) + TIE_BREAK * o.total_ms, 9) for o in self.options)
            self._costs[layer] = self._by_shape[shape]
        return self._costs[layer]

    def solve(self, rb: RankBudget, margin: int) -> tuple[dict[int, LayerPolicy], float]:
        """Per-rank keep sets: the count knapsack over classes of identically-windowed layers;
        where it sends a layer to `full` and one stage sits on the rank, the exact count
        programme instead (a `full` layer costs a whole forward: the bytes the knapsack's
        bound leaves unused are worth most there; elsewhere the programme's extra time buys
        little, measured on the 90 paper-scale rows)."""
        classes: dict[tuple[float, ...], list[int]] = {}
        for g in rb.layers:
            classes.setdefault(self.layer_costs(g), []).append(g)
        chosen, gap = self._solve_classes(rb, margin, classes)
        if self.req.parallel.virtual_stages == 1 and any(p.full for p in chosen.values()):
            return self._solve_counts(rb, margin, max(classes, key=lambda k: len(classes[k])))
        return chosen, gap

    def _solve_counts(self, rb: RankBudget, margin: int, cost: tuple[float, ...],
                      ) -> tuple[dict[int, LayerPolicy], float]:
        """Checkmate's exact on-demand memory rows (`countdp`, Jackson order) with each option
        priced at its exposed time in the stage's interior windows.

        The rows let every byte of the budget work, where the knapsack's bound (in-flight x
        kept + one layer's regenerated bytes) leaves some unused; a task regenerated in a
        window holds its bytes a little earlier than on demand, which the tightening loop
        corrects. The stage's top layer (no window above it) is priced as an interior one.
        """
        period = self._periods.get(rb.rank)
        if period is None:
            period = self._periods[rb.rank] = make_period(self.req, self.partition, rb.rank,
                                                          windows=False)
        options = self._priced.get(cost)
        if options is None:  # each tightening round asks again with the same prices
            price = dict(zip((o.policy for o in self.options), cost))
            options = self._priced[cost] = [replace(o, ms=price[o.policy])
                                            for o in count_options(self.req.costs.layer)]
        return rank_counts(self.req, period, options, rb, margin, ("heu-dp", cost))

    def _solve_classes(self, rb: RankBudget, margin: int,
                       classes: dict[tuple[float, ...], list[int]],
                       ) -> tuple[dict[int, LayerPolicy], float]:
        """Replicated solve over classes, then greedy single-layer upgrades."""
        keys = list(classes)
        sizes = [len(classes[k]) for k in keys]
        cost = np.array(keys)
        budget = rb.activation_bytes - margin
        if len(keys) <= 3:
            key = (tuple(keys), tuple(sizes), rb.inflight, rb.transient_credit)
            if key not in self._replicated:  # asked again at each tightening round's budget
                self._replicated[key] = Replicated(sizes, self.options, cost, rb.inflight,
                                                   rb.transient_credit)
            choice = self._replicated[key].choice(budget)
        else:  # irregular stages (many distinct windows): fall back to the exact MILP
            choice = choose_counts(sizes, self.options, cost, rb.inflight, budget,
                                   self.req.time_limit_s, rb.transient_credit)
        if choice is None:
            return {g: FULL for g in rb.layers}, 0.0
        choice = improve(choice, sizes, self.options, cost, rb.inflight, budget,
                         rb.transient_credit)
        out: dict[int, LayerPolicy] = {}
        for key, counts in zip(keys, choice.counts):
            out.update(assign(tuple(classes[key]), counts, self.options))
        return out, choice.mip_gap

    def place(self, layers: tuple[LayerPolicy, ...]) -> dict[TaskKey, Window]:
        """Every task into its natural slot (full recompute replays collectives: on demand).

        Empty windows (tp = 1, fully overlapped collectives) are skipped: a task there would
        only hold its tensors longer.
        """
        placement: dict[TaskKey, Window] = {}
        graph, known = self.req.costs.layer.graph, self._placed
        for task in required_tasks(graph, layers, self.req.parallel.num_microbatches):
            if task not in known:  # each tightening round places mostly the same tasks
                mb, layer, seg = task
                slot = self.slots.get((layer, seg)) if seg >= 0 else None
                known[task] = (Window(BWD_COLL, mb, self.stage_of[slot.host], slot.host,
                                      slot.step)
                               if slot is not None and slot.capacity_ms > 0 else None)
            if known[task] is not None:
                placement[task] = known[task]
        return placement


def plan_lynx_heu(req: PlanRequest) -> Plan:
    """lynx-heu: window-aware replicated-layer knapsack + natural placement + refinement.

    Tried on the balanced partition and, when it differs, on the uniform one (the partitioner's
    estimate ignores pipeline dependencies). Unless the fastest of them, refined, already runs
    as fast as keeping everything, checkmate's exact keep sets on each of those partitions are
    candidates too (refined where they beat it), so lynx-heu is never slower than checkmate
    (nor than adapipe, when the partitions agree). Refinement costs simulations and only keeps
    what is faster, so only those two candidates get one.
    """
    start = time.perf_counter()
    uniform = default_partition(req)
    partitions = list(dict.fromkeys([choose_partition(req, "lynx"), uniform]))
    candidates: list[tuple[str, tuple[Plan, SimResult]]] = []
    for partition in partitions:
        heu = HeuPlanner(req, partition)
        # the top hosts' windows may hold the peak: handing them back can beat tightening
        candidates.append((f"window-aware keep sets, partition {partition}", tighten_loop(
            req, partition, "lynx-heu", heu.solve, start, place=heu.place, relax=False,
            notes=(f"partition {partition}; keep sets by natural windows",),
            repair=lambda plan: trim_to_fit(req, plan))))
    # refinement only keeps what is faster, and each costs several simulations: only the
    # fastest window-aware candidate, and checkmate's keep sets where they beat it, get one
    source, run = min(candidates, key=lambda c: _rank_key(c[1][0]))
    found = [(source, refine(req, *run))]
    # checkmate's plans are only worth making on partitions where they might be faster
    behind = [] if _at_floor(req, found[0][1], uniform) else [
        p for p in partitions if not _ahead_of_checkmate(req, found[0][1], p)]
    if behind:
        # off the uniform partition no guarantee is owed, so an interleaved schedule's
        # knapsack MILP gets a short limit (on regular stages `countdp` is exact, no MILP)
        aside = [(f"checkmate keep sets, partition {partition}", checkmate_run(
            req if partition == uniform else replace(req, time_limit_s=ASIDE_LIMIT_S),
            partition, "lynx-heu", start, (f"partition {partition}; checkmate keep sets",)))
            for partition in behind]
        source, run = min(aside, key=lambda c: _rank_key(c[1][0]))
        found.append((source, refine(req, *run) if _rank_key(run[0]) < _rank_key(found[0][1])
                      else run[0]))
    source, best = min(found, key=lambda c: _rank_key(c[1]))
    return replace(best, planner_ms=1e3 * (time.perf_counter() - start), chosen_from=source)


def _at_floor(req: PlanRequest, plan: Plan, uniform: tuple[int, ...]) -> bool:
    """Whether `plan` fits and runs as fast as keeping everything on the uniform partition,
    which no on-demand plan there (checkmate's included) can beat.

    Nothing exposed means every action takes its keep-everything time, so on the uniform
    partition the step is that floor; another partition needs the floor simulated.
    """
    if not plan.predicted.fits_budget or plan.predicted.recompute_exposed_ms > 0:
        return False
    if plan.partition == uniform:
        return True
    keep = simulate(req.costs, uniform, (KEEP_ALL,) * req.model.num_layers, base_order(req))
    return plan.predicted.step_time_ms <= keep.step_time_ms


def _ahead_of_checkmate(req: PlanRequest, plan: Plan, partition: tuple[int, ...]) -> bool:
    """Whether `plan` fits and is faster than every plan checkmate can make on `partition`
    (its lower bound, `checkmate.least_step_ms`, first without a solve, then with checkmate's
    own; a hair of slack for float rounding): then checkmate's keep sets there could only
    lose, and making their plan is not worth its time."""
    return plan.predicted.fits_budget and any(
        least_step_ms(req, partition, exact) > plan.predicted.step_time_ms * (1 + 1e-9)
        for exact in (False, True))


def _rank_key(plan: Plan) -> tuple[bool, float]:
    """Plans that fit first, then the faster."""
    return (not plan.predicted.fits_budget, plan.predicted.step_time_ms)
