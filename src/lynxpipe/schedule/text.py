"""Compact text of actions, windows and orders: what plan.json stores and what people read.

    F(mb3,s1)  B(mb3,s1)  SEND_F(mb3,s1)  RECV_B(mb2,s0)      s: virtual stage
    R(mb3,L7,seg1,s0)@bwd_coll(mb3,s0,L8,2)    segment 1 of layer 7, in layer 8's collective 2
    R(mb0,L2,full,s0)@on_demand                Megatron full recompute, right before its B
    R(mb1,L5,seg0,s1)@recv(RECV_B,mb1,s1)      in the wait for mb1's output gradient

An R may leave its stage implicit (`R(mb0,L1,seg0)@on_demand`: derived from its layer).

`parse_action(format_action(a)) == a` for every action; a window that does not fit its kind's
short form (never built by lynxpipe itself) is written in the long form `kind[mb,st,L,step,recv]`
so that nothing is lost.
"""

from __future__ import annotations

import re
from typing import Any

from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import ACTION_KINDS, Action, PipelineOrder, Window
from lynxpipe.schedule.windows import WINDOW_KINDS, window_kind

_INT = r"(-?\d+)"
_PLAIN = re.compile(rf"^([A-Z_]+)\(mb{_INT},s{_INT}\)$")
_TASK = re.compile(rf"^R\(mb{_INT},L{_INT},(?:seg{_INT}|(full))(?:,s{_INT})?\)@(.+)$")
_LAYER_WIN = re.compile(rf"^([a-z_]+)\(mb{_INT},s{_INT},L{_INT},{_INT}\)$")
_RECV_WIN = re.compile(rf"^recv\((RECV_F|RECV_B),mb{_INT},s{_INT}\)$")
_LONG_WIN = re.compile(rf"^([a-z_]+)\[{_INT},{_INT},{_INT},{_INT},(RECV_F|RECV_B|)\]$")


def format_window(w: Window) -> str:
    """Short form of a window (long form when its fields do not fit its kind's short form)."""
    info = WINDOW_KINDS.get(w.kind)
    if info is not None:
        if info.in_layer and not w.recv:
            return f"{w.kind}(mb{w.mb},s{w.stage},L{w.layer},{w.step})"
        if info.host == "RECV" and w.recv and w.layer == -1 and w.step == -1:
            return f"recv({w.recv},mb{w.mb},s{w.stage})"
        if not info.host and w == Window(w.kind):
            return w.kind
    return f"{w.kind}[{w.mb},{w.stage},{w.layer},{w.step},{w.recv}]"


def parse_window(text: str) -> Window:
    """Inverse of `format_window`; an unknown kind or a malformed text is a LynxError."""
    text = text.strip()
    if m := _LAYER_WIN.match(text):
        kind, mb, st, layer, step = m.groups()
        win = Window(kind, int(mb), int(st), int(layer), int(step))  # type: ignore[arg-type]
    elif m := _RECV_WIN.match(text):
        recv, mb, st = m.groups()
        win = Window("recv", int(mb), int(st), recv=recv)  # type: ignore[arg-type]
    elif m := _LONG_WIN.match(text):
        kind, mb, st, layer, step, recv = m.groups()
        win = Window(kind, int(mb), int(st), int(layer), int(step), recv)  # type: ignore[arg-type]
    elif re.fullmatch(r"[a-z_]+", text):
        win = Window(text)  # type: ignore[arg-type]
    else:
        raise LynxError(f"window {text!r} is not a window (e.g. bwd_coll(mb3,s0,L8,2), "
                        f"recv(RECV_B,mb1,s0), on_demand)")
    window_kind(win.kind)  # unknown kinds are refused here, not deep in the simulator
    return win


def format_action(a: Action) -> str:
    """Short form of an action (R with its window after `@`)."""
    if a.kind != "R":
        return f"{a.kind}(mb{a.mb},s{a.stage})"
    seg = "full" if a.segment == -1 else f"seg{a.segment}"
    stage = "" if a.stage == -1 else f",s{a.stage}"
    where = format_window(a.window) if a.window is not None else "?"
    return f"R(mb{a.mb},L{a.layer},{seg}{stage})@{where}"


def parse_action(text: str) -> Action:
    """Inverse of `format_action`; errors name the text and the expected form."""
    if not isinstance(text, str):
        raise LynxError(f"action {text!r} must be a string such as F(mb0,s0)")
    text = text.strip()
    if m := _TASK.match(text):
        mb, layer, seg, full, st, where = m.groups()
        return Action("R", int(mb), -1 if st is None else int(st), int(layer),
                      -1 if full else int(seg), parse_window(where))
    if (m := _PLAIN.match(text)) and m.group(1) in ACTION_KINDS and m.group(1) != "R":
        return Action(m.group(1), int(m.group(2)), int(m.group(3)))  # type: ignore[arg-type]
    raise LynxError(f"action {text!r} is not an action; expected one of "
                    f"{', '.join(k for k in ACTION_KINDS if k != 'R')} as KIND(mbM,sS), or "
                    f"R(mbM,LL,segK|full,sS)@WINDOW")


def parse_order_json(data: Any, where: str) -> PipelineOrder:
    """A PipelineOrder from its plan.json form (see `PipelineOrder.__json__`)."""
    if not isinstance(data, dict):
        raise LynxError(f"{where}: expected an object, got {type(data).__name__}")
    keys = {"schedule", "pp", "virtual_stages", "num_microbatches", "ranks"}
    if set(data) != keys:
        raise LynxError(f"{where}: keys must be {', '.join(sorted(keys))}; got "
                        f"{', '.join(sorted(map(str, data)))}")
    ints = {k: data[k] for k in ("pp", "virtual_stages", "num_microbatches")}
    bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad or not isinstance(data["schedule"], str) or not isinstance(data["ranks"], list):
        raise LynxError(f"{where}: schedule must be a string, pp/virtual_stages/"
                        f"num_microbatches integers and ranks a list of lists of actions")
    ranks = []
    for r, actions in enumerate(data["ranks"]):
        if not isinstance(actions, list):
            raise LynxError(f"{where}.ranks[{r}]: expected a list of actions")
        try:
            ranks.append(tuple(parse_action(a) for a in actions))
        except LynxError as exc:
            raise LynxError(f"{where}.ranks[{r}]: {exc}") from None
    return PipelineOrder(data["schedule"], ints["pp"], ints["virtual_stages"],
                         ints["num_microbatches"], tuple(ranks))


def format_order(order: PipelineOrder, recompute: bool = True) -> str:
    """The order as a step x rank grid: row i holds every rank's i-th action.

    Without `recompute`, R actions are left out (the bare schedule).
    """
    columns = [[format_action(a) for a in acts if recompute or a.kind != "R"]
               for acts in order.ranks]
    widths = [max([len(f"rank {r}"), *map(len, col)]) for r, col in enumerate(columns)]
    depth = max((len(col) for col in columns), default=0)
    head = f"{order.schedule} pp={order.pp} v={order.virtual_stages} m={order.num_microbatches}"
    ranks = "  ".join(f"rank {r}".ljust(w) for r, w in enumerate(widths))
    lines = [head, f"step  {ranks}".rstrip()]
    for i in range(depth):
        cells = [(col[i] if i < len(col) else "").ljust(w) for col, w in zip(columns, widths)]
        lines.append(f"{i:<4d}  " + "  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
