"""Pipeline order generators and the order validator (SPEC §4)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import Action, PipelineOrder, Window
from lynxpipe.schedule.orders import gpipe, interleaved, make_order, one_f_one_b
from lynxpipe.schedule.validate import inflight_peak, validate_order

PP = st.integers(1, 6)
M = st.integers(1, 12)
V = st.integers(2, 3)
FAST = settings(max_examples=60, deadline=None)

_PEER = {"RECV_F": ("SEND_F", -1), "RECV_B": ("SEND_B", +1)}


def simulate(order: PipelineOrder, t_f: float = 1.0, t_b: float = 2.0) -> float:
    """Step time with blocking receives, instant non-blocking sends and free communication.

    Written independently of the library's simulator on purpose: it is the oracle.
    """
    clock = [0.0] * order.pp
    pos = [0] * order.pp
    sent: dict[tuple[str, int, int], float] = {}
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(order.ranks):
            while pos[r] < len(actions):
                a = actions[pos[r]]
                if a.kind in _PEER:
                    kind, offset = _PEER[a.kind]
                    ready = sent.get((kind, a.mb, a.stage + offset))
                    if ready is None:
                        break
                    clock[r] = max(clock[r], ready)
                elif a.kind in ("SEND_F", "SEND_B"):
                    sent[(a.kind, a.mb, a.stage)] = clock[r]
                elif a.kind == "F":
                    clock[r] += t_f
                elif a.kind == "B":
                    clock[r] += t_b
                pos[r] += 1
                progress = True
    assert all(pos[r] == len(acts) for r, acts in enumerate(order.ranks)), "oracle deadlocked"
    return max(clock)


def compute(order: PipelineOrder, rank: int) -> list[tuple[str, int, int]]:
    return [(a.kind, a.mb, a.stage) for a in order.ranks[rank] if a.kind in ("F", "B")]


def with_ranks(order: PipelineOrder, ranks: list[list[Action]]) -> PipelineOrder:
    return dataclasses.replace(order, ranks=tuple(tuple(r) for r in ranks))


def edit(order: PipelineOrder) -> list[list[Action]]:
    return [list(r) for r in order.ranks]


def find(actions: list[Action], kind: str, mb: int, stage: int) -> int:
    return next(i for i, a in enumerate(actions) if (a.kind, a.mb, a.stage) == (kind, mb, stage))


# --- generators --------------------------------------------------------------------------------


@FAST
@given(pp=PP, m=M)
def test_gpipe_and_1f1b_are_valid(pp: int, m: int) -> None:
    for order in (gpipe(pp, m), one_f_one_b(pp, m)):
        validate_order(order)
        assert (order.pp, order.virtual_stages, order.num_microbatches) == (pp, 1, m)


@FAST
@given(pp=PP, v=V, k=st.integers(1, 12))
def test_interleaved_is_valid(pp: int, v: int, k: int) -> None:
    m = pp * min(k, max(1, 12 // pp))
    order = interleaved(pp, v, m)
    validate_order(order)
    assert order.num_stages == pp * v


@FAST
@given(pp=PP, m=M)
def test_1f1b_inflight_bound(pp: int, m: int) -> None:
    assert inflight_peak(one_f_one_b(pp, m)) == [min(pp - r, m) for r in range(pp)]
    assert inflight_peak(gpipe(pp, m)) == [m] * pp


@FAST
@given(pp=PP, m=M)
def test_step_time_gpipe_and_1f1b(pp: int, m: int) -> None:
    for order in (gpipe(pp, m), one_f_one_b(pp, m)):
        assert simulate(order, 1.0, 2.0) == (m + pp - 1) * (1.0 + 2.0)


@FAST
@given(pp=PP, v=V, k=st.integers(1, 4))
def test_step_time_interleaved(pp: int, v: int, k: int) -> None:
    # Per-chunk t_f=1, t_b=2: the bubble shrinks by v to (p - 1)(t_f + t_b) per chunk.
    m = pp * k
    assert simulate(interleaved(pp, v, m), 1.0, 2.0) == (m * v + pp - 1) * 3.0


@FAST
@given(pp=PP, m=M)
def test_p2p_wraps_its_compute_step(pp: int, m: int) -> None:
    """RECV right before its consumer, SEND right after its producer (the contract)."""
    for order in (gpipe(pp, m), one_f_one_b(pp, m), interleaved(pp, 2, pp)):
        last = order.num_stages - 1
        for actions in order.ranks:
            for i, a in enumerate(actions):
                nxt = actions[i + 1] if i + 1 < len(actions) else None
                prev = actions[i - 1] if i else None
                if a.kind.startswith("RECV"):
                    assert nxt is not None and (nxt.kind, nxt.mb, nxt.stage) == (
                        a.kind[-1], a.mb, a.stage)
                if a.kind.startswith("SEND"):
                    assert prev is not None and (prev.kind, prev.mb, prev.stage) == (
                        a.kind[-1], a.mb, a.stage)
                if a.kind == "F":
                    assert (prev is not None and prev.kind == "RECV_F") == (a.stage > 0)
                    assert (nxt is not None and nxt.kind == "SEND_F") == (a.stage < last)


def test_1f1b_last_rank_alternates_from_mb0() -> None:
    # torch 2.13's Schedule1F1B.pipeline_order shifts the last rank by one micro-batch.
    order = one_f_one_b(4, 6)
    expect = [(k, j, 3) for j in range(6) for k in ("F", "B")]
    assert compute(order, 3) == expect
    assert compute(order, 0)[:4] == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("F", 3, 0)]
    assert compute(order, 0)[4] == ("B", 0, 0)


def test_1f1b_fewer_microbatches_than_stages() -> None:
    order = one_f_one_b(4, 2)
    assert compute(order, 0) == [("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("B", 1, 0)]


def test_interleaved_matches_megatron_order() -> None:
    # pp=2, v=2, m=4: rank 0 warms up with (2-0-1)*2 + (2-1)*2 = 4 forwards, rank 1 with 2.
    # Forward k -> chunk (k % 4) // 2, mb (k // 4) * 2 + k % 2; backward chunks run downwards.
    order = interleaved(2, 2, 4)
    f = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]  # (mb, chunk)
    b = [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]
    for rank, warm in ((0, 4), (1, 2)):
        fs = [("F", mb, c * 2 + rank) for mb, c in f]
        bs = [("B", mb, c * 2 + rank) for mb, c in b]
        steady = [x for pair in zip(fs[warm:], bs) for x in pair]
        assert compute(order, rank) == fs[:warm] + steady + bs[len(fs) - warm:]


def test_make_order_dispatch_and_errors() -> None:
    assert make_order("1F1B", 3, 1, 5) == one_f_one_b(3, 5)
    assert make_order("gpipe", 3, 1, 5) == gpipe(3, 5)
    assert make_order("interleaved", 2, 3, 4) == interleaved(2, 3, 4)
    with pytest.raises(LynxError, match="unknown"):
        make_order("zb-h1", 2, 1, 4)
    with pytest.raises(LynxError, match="v=2"):
        make_order("1f1b", 2, 2, 4)
    with pytest.raises(LynxError, match="multiple of pp"):
        interleaved(4, 2, 6)
    with pytest.raises(LynxError, match="m=0"):
        one_f_one_b(2, 0)


# --- validator rejections ----------------------------------------------------------------------


def test_rejects_missing_backward() -> None:
    order = one_f_one_b(3, 4)
    ranks = edit(order)
    del ranks[1][find(ranks[1], "B", 2, 1)]
    with pytest.raises(LynxError, match=r"rank 1 action \d+ .*backward B is missing"):
        validate_order(with_ranks(order, ranks))


def test_rejects_duplicated_forward() -> None:
    order = gpipe(2, 3)
    ranks = edit(order)
    ranks[0].insert(3, Action("F", 1, 0))
    with pytest.raises(LynxError, match=r"rank 0 action \d+ F\(mb1,s0\): duplicate"):
        validate_order(with_ranks(order, ranks))


def test_rejects_forward_on_wrong_rank() -> None:
    order = one_f_one_b(2, 2)
    ranks = edit(order)
    i = find(ranks[1], "F", 0, 1)
    ranks[1][i] = Action("F", 0, 0)
    rule = r"rank 1 action 1 F\(mb0,s0\): stage 0 is hosted on rank 0"
    with pytest.raises(LynxError, match=rule):
        validate_order(with_ranks(order, ranks))


def test_rejects_recv_without_send() -> None:
    order = one_f_one_b(3, 3)
    ranks = edit(order)
    del ranks[0][find(ranks[0], "SEND_F", 1, 0)]
    with pytest.raises(LynxError, match=r"rank 1 action \d+ RECV_F\(mb1,s1\): no matching SEND_F"):
        validate_order(with_ranks(order, ranks))


def test_rejects_send_without_recv() -> None:
    order = one_f_one_b(2, 2)
    ranks = edit(order)
    del ranks[0][find(ranks[0], "RECV_B", 1, 0)]
    with pytest.raises(LynxError, match=r"rank 1 action \d+ SEND_B\(mb1,s1\): no matching RECV_B"):
        validate_order(with_ranks(order, ranks))


def test_rejects_deadlocking_swap_of_recvs() -> None:
    # The last rank takes mb2's RECV_F first, but rank 1 only sends mb2 after receiving mb0's
    # gradient, which the last rank produces only after it got mb0: a cycle.
    order = one_f_one_b(3, 3)
    ranks = edit(order)
    blocks = [ranks[2][4 * j: 4 * j + 4] for j in range(3)]
    assert [b[0] for b in blocks] == [Action("RECV_F", j, 2) for j in range(3)]
    ranks[2] = blocks[2] + blocks[1] + blocks[0]
    with pytest.raises(LynxError, match=r"deadlock.*rank 2 action 0 RECV_F\(mb2,s2\) waits"):
        validate_order(with_ranks(order, ranks))


def test_rejects_recv_hoisted_above_send() -> None:
    # Rank 0 waits for the gradient before sending the activation that produces it.
    order = one_f_one_b(2, 1)
    ranks = edit(order)
    assert [a.kind for a in ranks[0]] == ["F", "SEND_F", "RECV_B", "B"]
    ranks[0][1], ranks[0][2] = ranks[0][2], ranks[0][1]
    with pytest.raises(LynxError, match=r"rank 0 action 1 RECV_B.*deadlock.*rank 1 action 0"):
        validate_order(with_ranks(order, ranks))


def test_rejects_backward_before_forward_and_recv_after_use() -> None:
    order = gpipe(1, 2)
    ranks = edit(order)
    ranks[0] = [ranks[0][2], ranks[0][0], ranks[0][1], ranks[0][3]]  # B0 F0 F1 B1
    with pytest.raises(LynxError, match="backward before its forward"):
        validate_order(with_ranks(order, ranks))
    order = one_f_one_b(2, 2)
    ranks = edit(order)
    i = find(ranks[1], "RECV_F", 1, 1)
    ranks[1].insert(i + 2, ranks[1].pop(i))
    with pytest.raises(LynxError, match=r"RECV_F\(mb1,s1\): must come before F\(mb1,s1\)"):
        validate_order(with_ranks(order, ranks))


# --- recompute actions -------------------------------------------------------------------------

LAYERS = (2, 2)  # stage 0: layers 0-1, stage 1: layers 2-3


def r_action(mb: int, layer: int, window: Window | None, seg: int = 0, stage: int = -1) -> Action:
    return Action("R", mb, stage, layer=layer, segment=seg, window=window)


def r_order(*inserts: tuple[str, int, int, Action]) -> PipelineOrder:
    """1F1B pp=2 m=3 with each R inserted on rank 0 right before the named action."""
    order = one_f_one_b(2, 3)
    ranks = edit(order)
    for kind, mb, stage, action in inserts:
        ranks[0].insert(find(ranks[0], kind, mb, stage), action)
    return with_ranks(order, ranks)


def test_accepts_recompute_in_every_window_kind() -> None:
    order = r_order(
        # F(2) sits right before B(1) on rank 0: its forward collectives host mb1's recompute.
        ("F", 2, 0, r_action(1, 1, Window("fwd_coll", mb=2, stage=0, layer=0, step=0))),
        # Layer 1's backward collective runs before layer 0's backward within the same B.
        ("B", 0, 0, r_action(0, 0, Window("bwd_coll", mb=0, stage=0, layer=1, step=0))),
        ("RECV_B", 0, 0, r_action(0, 1, Window("recv", mb=0, stage=0, recv="RECV_B"))),
        ("B", 2, 0, r_action(2, 0, Window("on_demand"), seg=-1, stage=0)),
    )
    validate_order(order, LAYERS)
    validate_order(order)  # without a layer map only stage-anchored checks apply


def test_rejects_recompute_after_its_backward() -> None:
    order = one_f_one_b(2, 3)
    ranks = edit(order)
    ranks[0].insert(find(ranks[0], "B", 0, 0) + 1, r_action(0, 1, Window("on_demand")))
    with pytest.raises(LynxError, match=r"rank 0 action \d+ R\(mb0,L1,seg0\)@on_demand: must lie"):
        validate_order(with_ranks(order, ranks), LAYERS)


def test_rejects_recompute_whose_window_host_is_absent() -> None:
    # RECV_F does not exist on stage 0, so a recv window there has no host.
    bad = r_order(("B", 0, 0, r_action(0, 1, Window("recv", mb=0, stage=0, recv="RECV_F"))))
    with pytest.raises(LynxError, match=r"recv window host RECV_F\(mb0,s0\) is not on this rank"):
        validate_order(bad, LAYERS)
    # F(1) of stage 1 lives on rank 1, not here.
    bad = r_order(("B", 0, 0, r_action(0, 1, Window("fwd_coll", mb=1, stage=1, layer=2))))
    with pytest.raises(LynxError, match="fwd_coll window host F\\(mb1,s1\\) is not on this rank"):
        validate_order(bad, LAYERS)


def test_rejects_recompute_window_in_wrong_place() -> None:
    # The host F(1) comes before the R in the list: the window is already over.
    bad = r_order(("RECV_B", 0, 0, r_action(0, 1, Window("fwd_coll", mb=1, stage=0, layer=0))))
    with pytest.raises(LynxError, match="precedes it"):
        validate_order(bad, LAYERS)
    # F(2) runs after B(0) which needs the tensors.
    bad = r_order(("F", 1, 0, r_action(0, 1, Window("fwd_coll", mb=2, stage=0, layer=0))))
    with pytest.raises(LynxError, match="comes after the backward"):
        validate_order(bad, LAYERS)
    # Layer 0's backward collective runs after layer 1's backward already needed the tensors.
    bad = r_order(("B", 0, 0, r_action(0, 1, Window("bwd_coll", mb=0, stage=0, layer=0))))
    with pytest.raises(LynxError, match="runs after layer 1's backward"):
        validate_order(bad, LAYERS)
    # A whole-layer recompute replays collectives: on demand only.
    bad = r_order(("B", 0, 0, r_action(0, 0, Window("bwd_coll", mb=0, stage=0, layer=1),
                                       seg=-1, stage=0)))
    with pytest.raises(LynxError, match="whole-layer recompute"):
        validate_order(bad, LAYERS)
    # Same layer (a later forward segment's collective) is left to the simulator.
    ok = r_order(("B", 0, 0, r_action(0, 1, Window("bwd_coll", mb=0, stage=0, layer=1))))
    validate_order(ok, LAYERS)


def test_rejects_recompute_on_wrong_rank_duplicate_or_unpinned() -> None:
    bad = r_order(("B", 0, 0, r_action(0, 2, Window("on_demand"))))
    with pytest.raises(LynxError, match="layer 2 is on stage 1, hosted on rank 1"):
        validate_order(bad, LAYERS)
    twice = r_action(0, 1, Window("on_demand"))
    with pytest.raises(LynxError, match="already recomputed"):
        validate_order(r_order(("B", 0, 0, twice), ("B", 0, 0, twice)), LAYERS)
    whole = r_action(0, 1, Window("on_demand"), seg=-1)
    with pytest.raises(LynxError, match="already recomputed"):
        validate_order(r_order(("B", 0, 0, twice), ("B", 0, 0, whole)), LAYERS)
    with pytest.raises(LynxError, match="pinned to a window"):
        validate_order(r_order(("B", 0, 0, r_action(0, 1, None))), LAYERS)
    with pytest.raises(LynxError, match="layers_per_stage"):
        validate_order(one_f_one_b(2, 3), (4,))
    # Interleaved: rank 0 hosts stages 0 and 2, so the stage field is placed right but wrong.
    order = interleaved(2, 2, 2)
    ranks = edit(order)
    ranks[0].insert(find(ranks[0], "B", 0, 0), r_action(0, 0, Window("on_demand"), stage=2))
    with pytest.raises(LynxError, match="layer 0 belongs to stage 0, not 2"):
        validate_order(with_ranks(order, ranks), (1, 1, 1, 1))
