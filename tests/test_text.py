"""The compact text of actions, windows and orders: it parses back to the same objects, plans
round-trip through plan.json in it, and the bare schedules print as the golden grids under
tests/golden (regenerate with LYNX_UPDATE_GOLDEN=1 after a deliberate change)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lynxpipe.cost.table import analytic_costs
from lynxpipe.errors import LynxError
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest, load_plan, save_plan
from lynxpipe.schedule.actions import ACTION_KINDS, Action, Window
from lynxpipe.schedule.orders import make_order
from lynxpipe.schedule.text import (
    format_action,
    format_order,
    format_window,
    parse_action,
    parse_window,
)
from lynxpipe.schedule.windows import WINDOW_KINDS
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

GOLDEN = Path(__file__).parent / "golden"
SCHEDULES = {"gpipe_pp2_m4": ("gpipe", 2, 1, 4), "1f1b_pp4_m8": ("1f1b", 4, 1, 8),
             "interleaved_pp2_v2_m4": ("interleaved", 2, 2, 4)}

small = st.integers(-1, 40)
windows = st.builds(Window, st.sampled_from(sorted(WINDOW_KINDS)), small, small, small, small,
                    st.sampled_from(["", "RECV_F", "RECV_B"]))
plain = st.builds(Action, st.sampled_from([k for k in ACTION_KINDS if k != "R"]), small, small)
tasks = st.builds(Action, st.just("R"), small, small, small, small, windows)


@given(st.one_of(plain, tasks))
def test_every_action_round_trips(action: Action) -> None:
    text = format_action(action)
    assert parse_action(text) == action
    assert format_action(parse_action(text)) == text


@given(windows)
def test_every_window_round_trips(window: Window) -> None:
    assert parse_window(format_window(window)) == window


def test_short_forms_read_as_documented() -> None:
    r = Action("R", 3, 0, 7, 1, Window("bwd_coll", 3, 0, 8, 2))
    assert str(r) == "R(mb3,L7,seg1,s0)@bwd_coll(mb3,s0,L8,2)"
    assert str(Action("R", 1, 1, 5, 0, Window("recv", 1, 1, recv="RECV_B"))) == \
        "R(mb1,L5,seg0,s1)@recv(RECV_B,mb1,s1)"
    assert str(Action("R", 0, 0, 2, -1, Window("on_demand"))) == "R(mb0,L2,full,s0)@on_demand"
    assert str(Action("SEND_F", 2, 1)) == "SEND_F(mb2,s1)"


@pytest.mark.parametrize("text", ["F(mb1)", "X(mb0,s0)", "R(mb0,L1,seg0)@nowhere(mb0,s0,L1,1)",
                                  "R(mb0,L1,seg0)", "R(mb0,L1,seg0)@warp", 7, "F(mb0,s0) junk"])
def test_bad_text_is_a_clear_error(text: object) -> None:
    with pytest.raises(LynxError):
        parse_action(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_orders_match_the_golden_grids(name: str) -> None:
    text = format_order(make_order(*SCHEDULES[name]))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("LYNX_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_plan_json_stores_one_line_per_action_and_round_trips(tmp_path: Path) -> None:
    model, cluster = get_model("gpt-tiny"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, seq_len=64)
    costs = analytic_costs(model, cluster, par)
    none = make("none", PlanRequest(model=model, cluster=cluster, parallel=par,
                                    budget_bytes=2**40, costs=costs))
    budget = none.predicted.ranks[0].static_bytes + none.predicted.ranks[0].peak_activation_bytes // 3
    plan = make("lynx-heu", PlanRequest(model=model, cluster=cluster, parallel=par,
                                        budget_bytes=budget, costs=costs))
    assert any(a.kind == "R" for r in plan.order.ranks for a in r)
    path = save_plan(tmp_path / "plan.json", plan)
    ranks = json.loads(path.read_text())["data"]["order"]["ranks"]
    assert all(isinstance(a, str) for r in ranks for a in r)
    assert load_plan(path) == plan
