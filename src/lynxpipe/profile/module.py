"""Plan any transformer block from the real module (SPEC §11): the library side of
`lynxpipe profile --module`.

    source = hf_block_source("config.json")                 # or any (batch, seq) -> BlockCall
    graph = block_graph(source, micro_batch=2, seq_len=64)  # the block's own LayerGraph
    costs = module_costs(model, cluster, par, source)       # profile.json with that graph

A block is traced on small inputs (`trace.trace_call`) at the planned micro-batch b and three
sequence lengths s0, 2 s0, 3 s0, and every size, FLOP and byte count is fitted exactly
(rational arithmetic) by c0 + c1 s + c2 s^2, which covers per-token tensors, s x s attention
and constants; the fit is checked on a fourth trace (the planned shape itself when it is small)
and refused if it does not hold. The graph at the planned (b, s) is then exact without running
the block there. (b is not varied: at b = 1 some reshapes are views that copy at b > 1, so a
block's ops may differ between micro-batch sizes.)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from lynxpipe.cost.graph import Collective, LayerGraph, Op, Tensor
from lynxpipe.cost.table import CostTable, analytic_costs, layer_cost
from lynxpipe.errors import LynxError
from lynxpipe.profile.trace import BlockCall, trace_call
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

BlockSource = Callable[[int, int], BlockCall]
"""(micro-batch, sequence length) -> a call of the block at that shape."""
BASE_SEQ = 16
"""Smallest traced sequence length (s0)."""
CHECK_AT_PLAN_TOKENS = 4096
"""Planned shapes up to this many tokens are traced to check the fit; larger ones at 4 s0."""
BWD_TOLERANCE = 0.05
"""Backward FLOPs and bytes (times, not memory) may miss the fit by this much."""
_BASIS: tuple[Callable[[int], int], ...] = (lambda s: 1, lambda s: s, lambda s: s * s)


def fit_lengths(base_seq: int) -> list[int]:
    """The sequence lengths the fit is made on."""
    return [k * base_seq for k in (1, 2, 3)]


def _solve(points: list[int], values: list[int]) -> list[Fraction]:
    """Exact coefficients of the basis through the points (Gauss-Jordan on Fractions)."""
    rows = [[Fraction(f(s)) for f in _BASIS] + [Fraction(v)] for s, v in zip(points, values)]
    n = len(_BASIS)
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * c for a, c in zip(rows[r], rows[col])]
    return [rows[i][n] for i in range(n)]


def _numbers(graph: LayerGraph) -> list[float]:
    """Every shape-dependent number of a graph, in a fixed order."""
    out: list[float] = []
    for op in graph.ops:
        out += [op.fwd_flops, op.fwd_bytes, op.dgrad_flops, op.dgrad_bytes]
    out += [t.size_bytes for t in graph.tensors]
    out += [c.size_bytes for c in graph.collectives]
    return out


def _with_numbers(graph: LayerGraph, numbers: list[int]) -> LayerGraph:
    it = iter(numbers)
    ops = tuple(dataclasses.replace(op, fwd_flops=float(next(it)), fwd_bytes=float(next(it)),
                                    dgrad_flops=float(next(it)), dgrad_bytes=float(next(it)))
                for op in graph.ops)
    tensors = tuple(dataclasses.replace(t, size_bytes=next(it)) for t in graph.tensors)
    colls = tuple(dataclasses.replace(c, size_bytes=next(it)) for c in graph.collectives)
    return dataclasses.replace(graph, ops=ops, tensors=tensors, collectives=colls)


def _skeleton(graph: LayerGraph) -> LayerGraph:
    """The graph with every number zeroed: what must not change with the shape."""
    return _with_numbers(graph, [0] * len(_numbers(graph)))


def block_graph(source: BlockSource, micro_batch: int, seq_len: int,
                base_seq: int = BASE_SEQ) -> LayerGraph:
    """The block's layer graph at (micro_batch, seq_len), fitted from small traces."""
    points = fit_lengths(base_seq)
    small = micro_batch * seq_len <= CHECK_AT_PLAN_TOKENS and seq_len not in points
    check = seq_len if small else 4 * base_seq
    graphs = [trace_call(source(micro_batch, s)) for s in points + [check]]
    skeleton = _skeleton(graphs[0])
    for s, g in zip(points[1:] + [check], graphs[1:]):
        if _skeleton(g) != skeleton:
            raise LynxError(f"the block runs different ops or saves different tensors at "
                            f"sequence length {s} than at {base_seq} (micro-batch "
                            f"{micro_batch}): its structure depends on the input shape, which "
                            f"lynxpipe cannot extrapolate")
    table = [_numbers(g) for g in graphs]
    target = []
    for k, name in enumerate(_number_names(graphs[0])):
        coef = _solve(points, [int(row[k]) for row in table[:-1]])
        at, actual = _evaluate(coef, check), int(table[-1][k])
        if "bwd" in name:  # time estimates only; reductions pick size-dependent buffers
            target.append(max(0, round(_evaluate(coef, seq_len))))
            if abs(at - actual) > BWD_TOLERANCE * actual + 4096:
                raise LynxError(f"{name} of the block is {actual} at micro-batch "
                                f"{micro_batch}, sequence {check}, far from the {float(at):.0f} "
                                f"its growth from short sequences predicts")
            continue
        if at != actual:
            raise LynxError(f"{name} of the block is {int(table[-1][k])} at micro-batch "
                            f"{micro_batch}, sequence {check}, not the {at} its growth from "
                            f"short sequences predicts (not a polynomial of degree 2 in the "
                            f"sequence length)")
        value = _evaluate(coef, seq_len)
        if value.denominator != 1 or value < 0:
            raise LynxError(f"{name} of the block extrapolates to {value} at micro-batch "
                            f"{micro_batch}, sequence {seq_len}: not a whole number")
        target.append(int(value))
    return _with_numbers(graphs[0], target)


def _evaluate(coef: list[Fraction], s: int) -> Fraction:
    return sum((c * f(s) for c, f in zip(coef, _BASIS)), Fraction(0))


def _number_names(graph: LayerGraph) -> list[str]:
    out = []
    for op in graph.ops:
        out += [f"op {op.name} {k}" for k in ("fwd FLOPs", "fwd bytes", "bwd FLOPs", "bwd bytes")]
    out += [f"saved tensor {t.name}" for t in graph.tensors]
    out += [f"collective {c.name}" for c in graph.collectives]
    return out


def module_costs(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec,
                 source: BlockSource, block: str, base_seq: int = BASE_SEQ) -> CostTable:
    """The analytic CostTable with the layer replaced by the traced block (roofline times of
    its traced FLOPs and bytes on `cluster`); embedding and head stay analytic."""
    graph = block_graph(source, par.micro_batch_size, par.seq_len, base_seq)
    call = source(par.micro_batch_size, base_seq)
    params = sum(p.numel() for p in call.block.parameters())
    base = analytic_costs(model, cluster, par)
    return dataclasses.replace(base, source="traced", layer=layer_cost(graph, cluster, par.tp),
                               layer_params=params, block=block)


def load_source(spec: str, model: ModelSpec, par: ParallelSpec,
                config: Path | None) -> tuple[BlockSource, str]:
    """A block source from `--module`: `hf` (the config.json given as --model), `reference`
    (lynxpipe's own layer of --model), or `path/to/file.py:fn` / `package.module:fn`, a
    function fn(model, parallel) returning a BlockSource. Returns it with a label."""
    if spec == "hf":
        if config is None:
            raise LynxError("--module hf traces the Hugging Face model of a config.json: give "
                            "its path as --model")
        from lynxpipe.profile.hf import hf_block_source

        return hf_block_source(config), f"hf:{config}"
    if spec == "reference":
        from lynxpipe.profile.reference import reference_source

        return reference_source(model, par), f"reference:{model.name}"
    if ":" not in spec:
        raise LynxError(f"--module {spec!r}: use hf, reference, or FILE.py:FUNCTION / "
                        f"package.module:FUNCTION")
    where, fn_name = spec.rsplit(":", 1)
    module = _import(where)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LynxError(f"--module {spec!r}: {where} has no function {fn_name!r}")
    return fn(model, par), spec


def _import(where: str) -> Any:
    path = Path(where)
    if where.endswith(".py"):
        if not path.is_file():
            raise LynxError(f"--module: no such file {where}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise LynxError(f"--module: cannot import {where} ({exc})") from None


__all__ = ["BlockCall", "BlockSource", "Collective", "Op", "Tensor", "block_graph",
           "load_source", "module_costs", "trace_call"]
