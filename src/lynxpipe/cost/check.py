"""Semantic checks of a CostTable read from profile.json: every name a graph or a time table
refers to exists, and every time, size and fraction is finite and in range. A hand-edited or
truncated profile is refused here with the key that is wrong, instead of a KeyError or a NaN
step time deep in the simulator."""

from __future__ import annotations

from lynxpipe.checks import integer, number
from lynxpipe.cost.graph import LayerGraph
from lynxpipe.cost.table import CostTable, LayerCost
from lynxpipe.errors import LynxError

MAX_MS = 1e9
"""Longest time accepted for one op or message (11 days): beyond it a value is a typo."""


def _unique(names: list[str], where: str) -> set[str]:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise LynxError(f"{where}: {name!r} appears twice")
        seen.add(name)
    return seen


def _known(names: tuple[str, ...] | list[str], known: set[str], where: str) -> None:
    bad = [n for n in names if n not in known]
    if bad:
        raise LynxError(f"{where}: refers to {bad[0]!r}, which is not one of "
                        f"{', '.join(sorted(known)) or '(none)'}")


def check_graph(graph: LayerGraph, where: str) -> None:
    """Names unique and every reference (producer, users, steps, collectives) resolvable."""
    ops = _unique([o.name for o in graph.ops], f"{where}.ops")
    _unique([t.name for t in graph.tensors], f"{where}.tensors")
    colls = _unique([c.name for c in graph.collectives], f"{where}.collectives")
    segments = graph.num_segments
    for o in graph.ops:
        integer(o.segment, f"{where}.ops.{o.name}.segment", 0, segments - 1)
        for key in ("fwd_flops", "fwd_bytes", "dgrad_flops", "dgrad_bytes", "wgrad_flops",
                    "wgrad_bytes", "kernel_recompute_flops"):
            number(getattr(o, key), f"{where}.ops.{o.name}.{key}", 0.0)
    for t in graph.tensors:
        at = f"{where}.tensors.{t.name}"
        integer(t.segment, f"{at}.segment", 0, segments - 1)
        integer(t.size_bytes, f"{at}.size_bytes", 0)
        _known([t.producer] if t.producer else [], ops, f"{at}.producer")
        _known([t.last_use, *t.used_by], ops, f"{at}.last_use/used_by")
    for c in graph.collectives:
        integer(c.size_bytes, f"{where}.collectives.{c.name}.size_bytes", 0)
    for name, steps in (("fwd_steps", graph.fwd_steps), ("bwd_steps", graph.bwd_steps)):
        for i, step in enumerate(steps):
            _known(step.ops, ops, f"{where}.{name}[{i}].ops")
            if step.kind == "coll":
                _known([step.coll], colls, f"{where}.{name}[{i}].coll")


def check_layer_cost(cost: LayerCost, where: str) -> None:
    """The graph, and a finite time >= 0 for each of its ops and collectives (and no others)."""
    check_graph(cost.graph, f"{where}.graph")
    for table, names in (("op_ms", {o.name for o in cost.graph.ops}),
                         ("coll_ms", {c.name for c in cost.graph.collectives})):
        have = set(getattr(cost, table))
        if have != names:
            missing, extra = sorted(names - have), sorted(have - names)
            raise LynxError(f"{where}.{table}: times must be given for exactly the graph's "
                            f"{'ops' if table == 'op_ms' else 'collectives'}; missing "
                            f"{', '.join(missing) or '-'}, unknown {', '.join(extra) or '-'}")
    for name, t in cost.op_ms.items():
        for key in ("fwd_ms", "dgrad_ms", "wgrad_ms"):
            number(getattr(t, key), f"{where}.op_ms.{name}.{key}", 0.0, MAX_MS)
    for name, ms in cost.coll_ms.items():
        number(ms, f"{where}.coll_ms.{name}", 0.0, MAX_MS)


def check_costs(table: CostTable, where: str) -> None:
    """Everything the planners and the simulator read from `table` is usable."""
    for kind in ("layer", "embed", "head"):
        check_layer_cost(getattr(table, kind), f"{where}: {kind}")
    for key in ("p2p_ms", "dp_alpha_ms"):
        number(getattr(table, key), f"{where}: {key}", 0.0, MAX_MS)
    for key in ("dp_ms_per_byte", "optimizer_ms_per_param"):
        number(getattr(table, key), f"{where}: {key}", 0.0, MAX_MS)
    for key in ("p2p_bytes", "layer_params", "embed_params", "grad_buffer_bytes"):
        integer(getattr(table, key), f"{where}: {key}", 0)
    number(table.bytes_per_param, f"{where}: bytes_per_param", 0.0, 1e3, lo_open=True)
    number(table.contention, f"{where}: contention", 0.0, 1.0, lo_open=True)
