"""Validation of pipeline orders (SPEC §4): completeness, p2p matching, deadlock, recompute rules.

Communication semantics assumed here, shared with the simulator and the runtime: a RECV blocks
its rank until the matching SEND has been issued on the neighbour; a SEND never blocks. Every
message is one line: `rank R action I <action>: <rule broken>`.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import Action, PipelineOrder
from lynxpipe.schedule.windows import WINDOW_KINDS

Key = tuple[str, int, int]
"""(kind, micro-batch, stage) of a non-R action: unique within an order."""

_P2P_PEER: dict[str, tuple[str, int]] = {
    # kind -> (matching kind on the neighbour, stage offset of the neighbour's action)
    "RECV_F": ("SEND_F", -1),
    "SEND_F": ("RECV_F", +1),
    "RECV_B": ("SEND_B", +1),
    "SEND_B": ("RECV_B", -1),
}


def _fail(rank: int, idx: int | str, action: Action | str, rule: str) -> LynxError:
    return LynxError(f"rank {rank} action {idx} {action}: {rule}")


def _key(a: Action) -> Key:
    return (a.kind, a.mb, a.stage)


def _show(key: Key) -> str:
    return str(Action(key[0], key[1], key[2]))  # type: ignore[arg-type]


def validate_order(
    order: PipelineOrder, layers_per_stage: tuple[int, ...] | None = None
) -> None:
    """Raise LynxError on the first broken rule of `order`; return None when it is valid.

    `layers_per_stage[s]` is the layer count of virtual stage s (layers numbered globally and
    contiguously along the stages); with it the R actions are checked against their layers.
    """
    _check_shape(order)
    index = _index(order)
    _check_p2p_matching(order, index)
    _check_compute(order, index)
    _check_deadlock(order)
    _check_recomputes(order, index, layers_per_stage)


def inflight_peak(order: PipelineOrder) -> list[int]:
    """Per rank, the most (micro-batch, stage) pairs forwarded and not yet backwarded.

    With interleaving a micro-batch in flight on two chunks counts twice, as Megatron counts
    activation memory per model chunk.
    """
    peaks: list[int] = []
    for actions in order.ranks:
        live: set[tuple[int, int]] = set()
        peak = 0
        for a in actions:
            if a.kind == "F":
                live.add((a.mb, a.stage))
                peak = max(peak, len(live))
            elif a.kind == "B":
                live.discard((a.mb, a.stage))
        peaks.append(peak)
    return peaks


def _check_shape(order: PipelineOrder) -> None:
    """Sizes, index ranges, stage placement, and p2p only across existing stage boundaries."""
    if order.pp < 1 or order.virtual_stages < 1 or order.num_microbatches < 1:
        raise LynxError(
            f"order pp={order.pp} v={order.virtual_stages} m={order.num_microbatches}: "
            "all must be >= 1"
        )
    if len(order.ranks) != order.pp:
        raise LynxError(f"order has {len(order.ranks)} rank lists for pp={order.pp}")
    last = order.num_stages - 1
    for r, actions in enumerate(order.ranks):
        for i, a in enumerate(actions):
            if not 0 <= a.mb < order.num_microbatches:
                raise _fail(r, i, a, f"micro-batch outside 0..{order.num_microbatches - 1}")
            if a.kind == "R" and a.stage == -1:
                continue  # an R may leave its stage implicit (derived from its layer)
            if not 0 <= a.stage <= last:
                raise _fail(r, i, a, f"stage outside 0..{last}")
            if order.rank_of(a.stage) != r:
                raise _fail(r, i, a, f"stage {a.stage} is hosted on rank {order.rank_of(a.stage)}")
            if a.kind in ("RECV_F", "SEND_B") and a.stage == 0:
                raise _fail(r, i, a, "the first stage has no previous stage to talk to")
            if a.kind in ("SEND_F", "RECV_B") and a.stage == last:
                raise _fail(r, i, a, "the last stage has no next stage to talk to")


def _index(order: PipelineOrder) -> list[dict[Key, int]]:
    """Position of every non-R action on its rank; a second occurrence is an error."""
    index: list[dict[Key, int]] = []
    for r, actions in enumerate(order.ranks):
        pos: dict[Key, int] = {}
        for i, a in enumerate(actions):
            if a.kind == "R":
                continue
            k = _key(a)
            if k in pos:
                raise _fail(r, i, a, f"duplicate of action {pos[k]} (each runs exactly once)")
            pos[k] = i
        index.append(pos)
    return index


def _check_p2p_matching(order: PipelineOrder, index: list[dict[Key, int]]) -> None:
    """Every SEND has exactly one RECV on the neighbouring stage's rank and vice versa."""
    for r, actions in enumerate(order.ranks):
        for i, a in enumerate(actions):
            if a.kind not in _P2P_PEER:
                continue
            peer_kind, offset = _P2P_PEER[a.kind]
            peer_stage = a.stage + offset
            peer_rank = order.rank_of(peer_stage)
            if (peer_kind, a.mb, peer_stage) not in index[peer_rank]:
                peer = Action(peer_kind, a.mb, peer_stage)  # type: ignore[arg-type]
                raise _fail(r, i, a, f"no matching {peer} on rank {peer_rank}")


def _check_compute(order: PipelineOrder, index: list[dict[Key, int]]) -> None:
    """F and B of every (micro-batch, stage) on its host, B after F, p2p around them."""
    last = order.num_stages - 1
    for s in range(order.num_stages):
        r = order.rank_of(s)
        pos = index[r]
        for mb in range(order.num_microbatches):
            f = pos.get(("F", mb, s))
            b = pos.get(("B", mb, s))
            if f is None:
                where = "end" if b is None else b
                raise _fail(r, where, f"F(mb{mb},s{s})", "missing: every micro-batch is "
                            "forwarded once per stage on the rank hosting it")
            if b is None:
                raise _fail(r, f, order.ranks[r][f], "its backward B is missing")
            if b < f:
                raise _fail(r, b, order.ranks[r][b], f"backward before its forward (action {f})")
            # Data dependencies of the rank itself: receive before use, send after produce.
            needs = [
                ("RECV_F", s > 0, f, "before"),
                ("SEND_F", s < last, f, "after"),
                ("RECV_B", s < last, b, "before"),
                ("SEND_B", s > 0, b, "after"),
            ]
            for kind, required, anchor, side in needs:
                _check_p2p_position(r, pos, (kind, mb, s), required, anchor, side, order)


def _check_p2p_position(
    r: int, pos: dict[Key, int], key: Key, required: bool, anchor: int, side: str,
    order: PipelineOrder,
) -> None:
    at = pos.get(key)
    anchor_action = order.ranks[r][anchor]
    if at is None:
        if required:
            raise _fail(r, anchor, anchor_action, f"needs {_show(key)} {side} it")
        return
    if (side == "before" and at > anchor) or (side == "after" and at < anchor):
        rule = f"must come {side} {anchor_action} (action {anchor})"
        raise _fail(r, at, order.ranks[r][at], rule)


def _check_deadlock(order: PipelineOrder) -> None:
    """Zero-time symbolic execution: blocking RECV, non-blocking SEND, round-robin to a fixpoint."""
    pos = [0] * order.pp
    sent: set[Key] = set()
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(order.ranks):
            while pos[r] < len(actions):
                a = actions[pos[r]]
                if a.kind in ("RECV_F", "RECV_B"):
                    peer_kind, offset = _P2P_PEER[a.kind]
                    if (peer_kind, a.mb, a.stage + offset) not in sent:
                        break
                elif a.kind in ("SEND_F", "SEND_B"):
                    sent.add(_key(a))
                pos[r] += 1
                progress = True
    stuck = [r for r in range(order.pp) if pos[r] < len(order.ranks[r])]
    if not stuck:
        return
    waits = []
    for r in stuck:
        a = order.ranks[r][pos[r]]
        peer_kind, offset = _P2P_PEER[a.kind]
        peer_stage = a.stage + offset
        peer = Action(peer_kind, a.mb, peer_stage)  # type: ignore[arg-type]
        waits.append(f"rank {r} action {pos[r]} {a} waits for {peer} on rank "
                     f"{order.rank_of(peer_stage)}")
    r0 = stuck[0]
    raise _fail(r0, pos[r0], order.ranks[r0][pos[r0]],
                "deadlock with blocking RECV / non-blocking SEND: " + "; ".join(waits))


def _check_recomputes(
    order: PipelineOrder, index: list[dict[Key, int]], layers_per_stage: tuple[int, ...] | None
) -> None:
    """R actions: on the layer's rank, between its F and B, in an existing window, once each."""
    starts = _layer_starts(order, layers_per_stage)
    done: dict[tuple[int, int], dict[int, int]] = {}  # (mb, layer) -> segment -> rank
    for r, actions in enumerate(order.ranks):
        for i, a in enumerate(actions):
            if a.kind != "R":
                continue
            _check_unique_recompute(r, i, a, done)
            stage = _recompute_stage(r, i, a, order, starts)
            if stage < 0:
                continue  # no layer map and no stage: nothing to anchor the checks to
            pos = index[r]
            f, b = pos[("F", a.mb, stage)], pos[("B", a.mb, stage)]
            if not f < i < b:
                raise _fail(r, i, a, f"must lie after F (action {f}) and before B (action {b}) "
                            f"of mb{a.mb} on stage {stage}")
            _check_window(r, i, a, b, pos, starts)


def _layer_starts(order: PipelineOrder, layers_per_stage: tuple[int, ...] | None) -> list[int]:
    """First global layer of every stage, plus the total at the end ([] without a layer map)."""
    if layers_per_stage is None:
        return []
    if len(layers_per_stage) != order.num_stages or min(layers_per_stage, default=0) < 0:
        raise LynxError(
            f"layers_per_stage={layers_per_stage}: need {order.num_stages} counts >= 0, "
            "one per virtual stage"
        )
    return [0, *accumulate(layers_per_stage)]


def _stage_of_layer(layer: int, starts: list[int]) -> int:
    """Stage holding a global layer; -1 when the layer lies outside the model."""
    if not 0 <= layer < starts[-1]:
        return -1
    return bisect_right(starts, layer) - 1


def _recompute_stage(r: int, i: int, a: Action, order: PipelineOrder, starts: list[int]) -> int:
    """The stage whose F/B bracket an R: its layer's stage (checked against a.stage and rank)."""
    if a.window is None:
        raise _fail(r, i, a, "a recompute task must be pinned to a window")
    if not starts:
        return a.stage
    stage = _stage_of_layer(a.layer, starts)
    if stage < 0:
        raise _fail(r, i, a, f"layer {a.layer} outside 0..{starts[-1] - 1}")
    if a.stage not in (-1, stage):
        raise _fail(r, i, a, f"layer {a.layer} belongs to stage {stage}, not {a.stage}")
    if order.rank_of(stage) != r:
        raise _fail(r, i, a, f"layer {a.layer} is on stage {stage}, hosted on rank "
                    f"{order.rank_of(stage)}")
    return stage


def _check_unique_recompute(
    r: int, i: int, a: Action, done: dict[tuple[int, int], dict[int, int]]
) -> None:
    """Each (mb, layer, segment) once; a whole-layer R (segment -1) covers every segment."""
    segs = done.setdefault((a.mb, a.layer), {})
    clash = [s for s in segs if s == a.segment or -1 in (s, a.segment)]
    if clash:
        raise _fail(r, i, a, f"mb{a.mb} layer {a.layer} segment {clash[0]} already recomputed "
                    f"on rank {segs[clash[0]]}")
    segs[a.segment] = r


def _check_window(
    r: int, i: int, a: Action, b: int, pos: dict[Key, int], starts: list[int]
) -> None:
    """The window's host action is on this rank, at or after the R and not after the B."""
    w = a.window
    assert w is not None  # _recompute_stage rejected a missing window
    if w.kind not in WINDOW_KINDS:
        raise _fail(r, i, a, f"unknown window kind {w.kind!r}; known: {', '.join(WINDOW_KINDS)}")
    info = WINDOW_KINDS[w.kind]
    if not info.host:
        return
    if a.segment < 0:
        raise _fail(r, i, a, "a whole-layer recompute replays the layer's forward collectives; "
                    "it runs on demand, not inside a communication window")
    if info.host == "RECV" and w.recv not in ("RECV_F", "RECV_B"):
        raise _fail(r, i, a, f"recv window names receive {w.recv!r}, not RECV_F/RECV_B")
    key: Key = w.host()  # type: ignore[assignment]
    if info.in_layer:
        if starts and 0 <= w.layer < starts[-1] and _stage_of_layer(w.layer, starts) != w.stage:
            raise _fail(r, i, a, f"{w.kind} window layer {w.layer} is not on stage {w.stage}")
        # layer -1 (embedding) and num_layers (LM head) host windows on the first/last stage
        if starts and w.layer == starts[-1] and w.stage != len(starts) - 2:
            raise _fail(r, i, a, f"{w.kind} window of the LM head is not on the last stage")
    host = pos.get(key)
    if host is None:
        raise _fail(r, i, a, f"{w.kind} window host {_show(key)} is not on this rank")
    if host < i:
        raise _fail(r, i, a, f"{w.kind} window host {_show(key)} (action {host}) precedes it")
    if host > b:
        raise _fail(r, i, a, f"{w.kind} window host {_show(key)} (action {host}) comes after "
                    f"the backward that needs it (action {b})")
    # Inside the very backward that consumes it, only a layer whose backward runs no later works
    # (backward walks layers downwards); -1 (embed/head) is left to the simulator.
    if host == b and 0 <= w.layer < a.layer:
        raise _fail(r, i, a, f"bwd_coll window in layer {w.layer} runs after layer {a.layer}'s "
                    "backward needs the tensors")
