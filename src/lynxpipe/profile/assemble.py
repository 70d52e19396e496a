"""From measurements to a CostTable (pure): per-op times from timed pieces, alpha-beta fits of
the message series, and the measured table assembled over the analytic one."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import replace

from lynxpipe.cost.fit import AlphaBeta, fit_alpha_beta, measured_table
from lynxpipe.cost.table import CostTable, LayerCost, OpTime
from lynxpipe.profile.samples import (
    GROUP_SEP,
    MIN_OP_MS,
    CommSamples,
    KindTimes,
    Measurement,
    OpSamples,
)
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec


def _spread(times: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Per-op times from per-piece times, a piece split in proportion to `weights`."""
    out: dict[str, float] = {}
    for key, ms in times.items():
        ops = key.split(GROUP_SEP)
        total = sum(weights[o] for o in ops)
        for o in ops:
            out[o] = ms * (weights[o] / total if total > 0 else 1.0 / len(ops))
    return out


def op_times(measured: KindTimes, analytic: LayerCost) -> dict[str, OpTime]:
    """Per-op OpTime from a KindTimes. A forward piece of several ops is split by the analytic
    forward times; a backward piece by each op's measured forward times the analytic
    backward/forward ratio (this device's balance of GEMMs and memory-bound ops, which an
    analytic split would take from the cluster preset instead)."""
    fwd = _spread(measured.fwd_ms, {k: t.fwd_ms for k, t in analytic.op_ms.items()})
    bwd = _spread(measured.bwd_ms, {k: fwd.get(k, 0.0) * (t.dgrad_ms + t.wgrad_ms) / t.fwd_ms
                                    if t.fwd_ms > 0 else 0.0 for k, t in analytic.op_ms.items()})
    scale = measured.bwd_total_ms / sum(bwd.values()) if sum(bwd.values()) > 0 else 1.0
    out = {}
    for name, ana in analytic.op_ms.items():
        b = max(MIN_OP_MS, bwd.get(name, 0.0) * scale)
        share = ana.dgrad_ms / (ana.dgrad_ms + ana.wgrad_ms) if ana.wgrad_ms > 0 else 1.0
        wgrad = b * (1.0 - share) if ana.wgrad_ms > 0 else 0.0
        out[name] = OpTime(max(MIN_OP_MS, fwd.get(name, 0.0)), max(MIN_OP_MS, b - wgrad), wgrad)
    return out


def compute_times(ops: OpSamples, base: CostTable) -> dict[str, dict[str, OpTime]]:
    """Per-op OpTime of the layer, embedding and head (`base`: the analytic table, whose
    op times split the measured pieces)."""
    kinds = {"layer": (ops.layer, base.layer), "embed": (ops.embed, base.embed),
             "head": (ops.head, base.head)}
    return {k: op_times(measured, analytic) for k, (measured, analytic) in kinds.items()}


def comm_fits(comm: CommSamples | None) -> tuple[dict[str, AlphaBeta], AlphaBeta | None]:
    """Alpha-beta fits per collective kind and for p2p."""
    if comm is None:
        return {}, None
    fits = {k: fit_alpha_beta(list(s.sizes_bytes), list(s.times_ms))
            for k, s in comm.collectives.items()}
    p2p = fit_alpha_beta(list(comm.p2p.sizes_bytes), list(comm.p2p.times_ms)) if comm.p2p else None
    return fits, p2p


def assemble(base: CostTable, m: Measurement, model: ModelSpec, par: ParallelSpec) -> CostTable:
    """The measured CostTable: `base` (analytic, for `model` and `par`) with every measured number.

    DP gradient all-reduce terms stay analytic (the profile launches one TP group, or one
    pipeline pair, not a DP group). Static bytes per parameter follow the dtype: fp32 training
    keeps weights, grads and Adam's two moments (16 B/param, moments sharded over DP with the
    distributed optimizer); 16-bit keeps the analytic mixed-precision figure.
    """
    ops = compute_times(m.ops, base)
    fits, p2p = comm_fits(m.comm)
    contention = m.comm.contention if m.comm is not None else None
    table = measured_table(base, ops, fits, p2p, contention)
    bytes_per_param = base.bytes_per_param
    if model.dtype_bytes == 4:
        bytes_per_param = 8.0 + 8.0 / (par.dp if par.distributed_optimizer else 1)
    sync_ms = m.comm.sync_ms if m.comm is not None and m.comm.sync_ms is not None else 0.0
    # the runtime takes gloo unless every rank has a GPU (profile.comm._devices does the same)
    backend = m.comm.backend if m.comm is not None else (
        "nccl" if m.device.startswith("cuda") else "gloo")
    return replace(table, optimizer_ms_per_param=m.ops.optimizer_ms_per_param,
                   bytes_per_param=bytes_per_param, device=m.device, tp_sync_ms=sync_ms,
                   recv_ahead=backend == "gloo")


def median_ops(runs: list[OpSamples]) -> OpSamples:
    """Per-op medians over several timings of the same ops (e.g. one per measured round)."""
    if not runs:
        raise ValueError("median_ops needs at least one timing")

    def kind(name: str) -> KindTimes:
        times = [getattr(r, name) for r in runs]
        fwd = {k: statistics.median(t.fwd_ms[k] for t in times) for k in times[0].fwd_ms}
        bwd = {k: statistics.median(t.bwd_ms[k] for t in times) for k in times[0].bwd_ms}
        return KindTimes(fwd, bwd, statistics.median(t.bwd_total_ms for t in times))

    return OpSamples(kind("layer"), kind("embed"), kind("head"),
                     statistics.median(r.optimizer_ms_per_param for r in runs))


def retime(table: CostTable, base: CostTable, ops: OpSamples) -> CostTable:
    """The measured `table` with its compute re-timed by `ops` (timed again later, e.g. in the
    same minutes as a run on a CPU whose speed drifts): op times and the optimizer come from
    `ops`, split as `assemble` splits them (`base`: the analytic table of the same specs);
    communication fits, contention and the sync wait stay the table's own."""
    return replace(measured_table(table, compute_times(ops, base), {}, None),
                   optimizer_ms_per_param=ops.optimizer_ms_per_param)
