"""Measured profiles: alpha-beta fits of communication and a CostTable built from measurements.

Pure Python + numpy: the torch-side profiler (`lynxpipe.profile.measure`) measures, this module
fits and assembles, so fitting is testable on synthetic data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import theilslopes

from lynxpipe.cost.table import CostTable, LayerCost, OpTime
from lynxpipe.errors import LynxError


@dataclass(frozen=True)
class AlphaBeta:
    """time_ms = alpha_ms + bytes * ms_per_byte (least squares over measured sizes)."""

    alpha_ms: float
    """Fixed cost per message."""
    ms_per_byte: float
    """Inverse bandwidth."""
    r2: float
    """Coefficient of determination of the fit (1 = perfect)."""

    def ms(self, size_bytes: float) -> float:
        """Predicted time of a message of `size_bytes`."""
        return self.alpha_ms + self.ms_per_byte * size_bytes

    @property
    def bytes_per_s(self) -> float:
        """Fitted bandwidth."""
        return 1e3 / self.ms_per_byte if self.ms_per_byte > 0 else float("inf")


def fit_alpha_beta(sizes_bytes: list[float], times_ms: list[float]) -> AlphaBeta:
    """Non-negative least-squares alpha-beta fit; needs at least two distinct sizes."""
    x = np.asarray(sizes_bytes, dtype=float)
    y = np.asarray(times_ms, dtype=float)
    if len(x) != len(y) or len(np.unique(x)) < 2:
        raise LynxError(f"alpha-beta fit needs times at >= 2 distinct sizes, got sizes {sorted(set(x))}")
    design = np.stack([np.ones_like(x), x], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    if beta <= 0:
        # a latency spike at a small size (gloo after idle) can tilt least squares flat or
        # downwards; the median of pairwise slopes ignores such outliers
        beta = float(theilslopes(y, x)[0])
        alpha = float(np.median(y - beta * x))
    if beta <= 0:
        # spikes at most of the small sizes: noise only ever adds time, so the lower envelope
        # (least time at this size or any larger one) keeps the transfer's slope
        order = np.argsort(x)
        x, y = x[order], np.minimum.accumulate(y[order][::-1])[::-1]
        beta = float(theilslopes(y, x)[0])
        alpha = float(np.median(y - beta * x))
    if alpha < 0:  # latency cannot be negative: refit through the origin
        alpha, beta = 0.0, float(x @ y / (x @ x))
    if beta < 0:
        alpha, beta = float(y.mean()), 0.0
    pred = alpha + beta * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return AlphaBeta(float(alpha), float(beta), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0)


def _apply(cost: LayerCost, op_ms: dict[str, OpTime], fits: dict[str, AlphaBeta]) -> LayerCost:
    missing = sorted({op.name for op in cost.graph.ops} - set(op_ms))
    if missing:
        raise LynxError(f"measured profile lacks ops {', '.join(missing)} of the {cost.graph.kind}")
    coll_ms = {}
    for coll in cost.graph.collectives:
        fit = fits.get(coll.kind)
        coll_ms[coll.name] = fit.ms(coll.size_bytes) if fit else cost.coll_ms[coll.name]
    return LayerCost(cost.graph, {k: op_ms[k] for k in cost.op_ms}, coll_ms)


def measured_table(base: CostTable, op_ms: dict[str, dict[str, OpTime]],
                   coll_fits: dict[str, AlphaBeta], p2p_fit: AlphaBeta | None,
                   contention: float | None = None) -> CostTable:
    """`base` (analytic, same specs) with measured op times and fitted communication.

    `op_ms` maps 'layer' / 'embed' / 'head' to per-op times; `coll_fits` maps a collective
    kind ('all_reduce', 'all_gather', 'reduce_scatter') to its fit on the TP group, whose
    size is baked into the measurement.
    """
    kinds = {"layer": base.layer, "embed": base.embed, "head": base.head}
    costs = {k: _apply(v, op_ms[k], coll_fits) if k in op_ms else v for k, v in kinds.items()}
    return replace(base, source="measured", layer=costs["layer"], embed=costs["embed"],
                   head=costs["head"],
                   p2p_ms=p2p_fit.ms(base.p2p_bytes) if p2p_fit else base.p2p_ms,
                   contention=base.contention if contention is None else contention)
