"""Generators of pipeline orders (SPEC §4): GPipe, 1F1B (PipeDream-flush) and interleaved 1F1B.

Each generator first decides the per-rank sequence of compute steps (F/B of a micro-batch on a
virtual stage) and then wraps every step in its p2p actions: the RECV goes immediately before the
step that consumes it (so a blocking wait happens where the data is needed, and the wait itself
is a window the planner can fill), the SEND immediately after the step that produced it (sends
never stall the sender, so sending as early as possible never hurts).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import Action, PipelineOrder

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved")
"""Names accepted by `make_order`."""

Step = tuple[Literal["F", "B"], int, int]
"""A compute step before p2p wrapping: (kind, micro-batch, virtual stage)."""


def _check_sizes(pp: int, v: int, m: int) -> None:
    if pp < 1:
        raise LynxError(f"pp={pp}: the pipeline needs at least one rank")
    if v < 1:
        raise LynxError(f"v={v}: each rank needs at least one virtual stage")
    if m < 1:
        raise LynxError(f"m={m}: a step needs at least one micro-batch")


def _wrap(step: Step, num_stages: int) -> list[Action]:
    """A compute step with its receive right before and its send right after."""
    kind, mb, s = step
    if kind == "F":
        before = [Action("RECV_F", mb, s)] if s > 0 else []
        after = [Action("SEND_F", mb, s)] if s < num_stages - 1 else []
    else:
        before = [Action("RECV_B", mb, s)] if s < num_stages - 1 else []
        after = [Action("SEND_B", mb, s)] if s > 0 else []
    return [*before, Action(kind, mb, s), *after]


def _build(schedule: str, pp: int, v: int, m: int, steps: list[list[Step]]) -> PipelineOrder:
    num_stages = pp * v
    ranks = tuple(
        tuple(a for step in rank_steps for a in _wrap(step, num_stages)) for rank_steps in steps
    )
    return PipelineOrder(
        schedule=schedule, pp=pp, virtual_stages=v, num_microbatches=m, ranks=ranks
    )


def _fwd(mbs: Iterable[int], s: int) -> list[Step]:
    return [("F", mb, s) for mb in mbs]


def _bwd(mbs: Iterable[int], s: int) -> list[Step]:
    return [("B", mb, s) for mb in mbs]


def gpipe(pp: int, m: int) -> PipelineOrder:
    """GPipe: every rank runs all forwards, then all backwards, both in micro-batch order.

    Backwards run in ascending order (as torch's ScheduleGPipe does): the last stage can start
    B(0) right after F(m-1) and the backward wave then mirrors the forward one, giving
    (m + p - 1)(t_f + t_b) with equal stages.
    """
    _check_sizes(pp, 1, m)
    steps = [_fwd(range(m), r) + _bwd(range(m), r) for r in range(pp)]
    return _build("gpipe", pp, 1, m, steps)


def one_f_one_b(pp: int, m: int) -> PipelineOrder:
    """1F1B (PipeDream-flush): w = min(pp - r - 1, m) warm-up forwards, steady F/B, cool-down.

    Stage r therefore never holds more than min(pp - r, m) micro-batches in flight. The last rank
    (w = 0) alternates F(j), B(j) from the start — torch 2.13's Schedule1F1B.pipeline_order
    shifts its micro-batches by one, which is why this is written out rather than copied.
    """
    _check_sizes(pp, 1, m)
    steps: list[list[Step]] = []
    for r in range(pp):
        w = min(pp - r - 1, m)
        seq = _fwd(range(w), r)
        for j in range(m - w):
            seq += _fwd([j + w], r) + _bwd([j], r)
        seq += _bwd(range(m - w, m), r)
        steps.append(seq)
    return _build("1f1b", pp, 1, m, steps)


def _interleaved_step(k: int, pp: int, v: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward or backward on a rank, as in Megatron-LM.

    Megatron's `get_model_chunk_id` walks groups of pp micro-batches through the chunks (forward:
    chunk 0 upwards; backward: the last chunk downwards), and each chunk's data iterator hands
    out micro-batches in order, so the micro-batch is pp * group + position-in-group.
    """
    group, in_group = divmod(k, pp * v)
    chunk = in_group // pp
    if not forward:
        chunk = v - 1 - chunk
    return group * pp + in_group % pp, chunk


def interleaved(pp: int, v: int, m: int) -> PipelineOrder:
    """Megatron interleaved 1F1B: virtual stage s = chunk * pp + rank lives on rank s % pp.

    Rank r runs min((pp - r - 1) * 2 + (v - 1) * pp, m * v) warm-up forwards, then alternates
    one forward and one backward, then drains the remaining backwards (Megatron-LM's
    `forward_backward_pipelining_with_interleaving`, as in megatron-core where m == pp is not
    special-cased into all-forward-then-all-backward).
    """
    _check_sizes(pp, v, m)
    if m % pp:
        raise LynxError(f"m={m}: interleaved 1F1B needs micro-batches a multiple of pp={pp}")
    total = m * v
    steps: list[list[Step]] = []
    for r in range(pp):
        warmup = min((pp - r - 1) * 2 + (v - 1) * pp, total)

        def fwd(k: int, r: int = r) -> Step:
            mb, chunk = _interleaved_step(k, pp, v, forward=True)
            return ("F", mb, chunk * pp + r)

        def bwd(k: int, r: int = r) -> Step:
            mb, chunk = _interleaved_step(k, pp, v, forward=False)
            return ("B", mb, chunk * pp + r)

        seq = [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            seq += [fwd(k + warmup), bwd(k)]
        seq += [bwd(k) for k in range(total - warmup, total)]
        steps.append(seq)
    return _build("interleaved", pp, v, m, steps)


@functools.lru_cache(maxsize=64)
def make_order(schedule: str, pp: int, v: int, m: int) -> PipelineOrder:
    """The order of a named schedule; gpipe and 1f1b take v == 1 only (memoised: a planner
    run asks for its base order at every candidate, and the order is immutable)."""
    name = schedule.lower()
    if name in ("gpipe", "1f1b") and v != 1:
        raise LynxError(f"v={v}: schedule {name!r} has one stage per rank; use 'interleaved'")
    if name == "gpipe":
        return gpipe(pp, m)
    if name == "1f1b":
        return one_f_one_b(pp, m)
    if name == "interleaved":
        return interleaved(pp, v, m)
    raise LynxError(f"schedule {schedule!r}: unknown; choose one of {', '.join(SCHEDULES)}")
