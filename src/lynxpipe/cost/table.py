"""CostTable: per-op times, per-collective times and memory constants (the profile artifact).

The analytic table uses the roofline for ops and the ring alpha-beta model for collectives
(SPEC §3); `lynxpipe profile --measure` writes the same type from measurements. Planners and the
simulator read only this table, never the specs' hardware numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lynxpipe.artifact import fingerprint, load_artifact, save_artifact
from lynxpipe.cost.graph import Collective, LayerGraph
from lynxpipe.cost.layers import embed_graph, head_graph, layer_graph
from lynxpipe.specs.cluster import ClusterSpec
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

PROFILE_VERSION = 2
"""2: `traced` layer graphs of a user's block (`block` names it; ops list every tensor they
write)."""


@dataclass(frozen=True)
class OpTime:
    """Measured or modelled times of one op."""

    fwd_ms: float
    """Forward time."""
    dgrad_ms: float
    """Input-gradient time (all of backward for non-GEMM ops)."""
    wgrad_ms: float
    """Weight-gradient time (GEMMs)."""


@dataclass(frozen=True)
class LayerCost:
    """A layer graph with the time of each of its ops and collectives."""

    graph: LayerGraph
    """Structure, saved tensors and programs."""
    op_ms: dict[str, OpTime]
    """Times per op name."""
    coll_ms: dict[str, float]
    """Times per collective name."""

    def fwd_ms(self) -> float:
        """Forward compute time, collectives excluded."""
        return sum(t.fwd_ms for t in self.op_ms.values())

    def bwd_ms(self) -> float:
        """Backward compute time, collectives excluded."""
        return sum(t.dgrad_ms + t.wgrad_ms for t in self.op_ms.values())

    def recompute_ms(self, dropped: frozenset[str], segment: int) -> float:
        """Time to regenerate the `dropped` tensors of `segment` from kept ones."""
        return sum(self.op_ms[op].fwd_ms for op in self.graph.recompute_ops(dropped, segment))

    def part_ms(self, ops: tuple[str, ...], part: str) -> float:
        """Compute time of `part` (fwd, dgrad, wgrad or bwd = both grads) of `ops`."""
        times = [self.op_ms[o] for o in ops]
        if part == "bwd":
            return sum(t.dgrad_ms + t.wgrad_ms for t in times)
        return sum(getattr(t, f"{part}_ms") for t in times)

    def fwd_coll_ms(self) -> float:
        """Blocking forward collective time (what Megatron full recompute replays)."""
        return sum(self.coll_ms[s.coll] for s in self.graph.fwd_steps if s.kind == "coll")


@dataclass(frozen=True)
class CostTable:
    """Everything timing- and memory-related the planners and the simulator consume."""

    source: Literal["analytic", "measured", "traced"]
    """How the times were obtained (`traced`: the layer graph traced from a user's block,
    times from the roofline of its traced FLOPs and bytes)."""
    spec_fingerprint: str
    """Fingerprint of (model, parallel layout) the graphs were built for."""
    layer: LayerCost
    """The repeated transformer layer."""
    embed: LayerCost
    """Embedding (first pipeline stage)."""
    head: LayerCost
    """Final norm, LM head and loss (last pipeline stage)."""
    p2p_ms: float
    """Time to send one micro-batch activation (or its gradient) between pipeline stages."""
    p2p_bytes: int
    """Bytes of that message (also a receive buffer held in memory)."""
    dp_alpha_ms: float
    """Latency term of the DP gradient all-reduce."""
    dp_ms_per_byte: float
    """Bandwidth term of the DP gradient all-reduce (0 when dp == 1)."""
    optimizer_ms_per_param: float
    """Adam step time per local parameter (memory bound)."""
    layer_params: int
    """Parameters of one transformer layer on one TP rank."""
    embed_params: int
    """Embedding parameters on one TP rank (first stage; the last stage holds the tied head)."""
    bytes_per_param: float
    """Static bytes per parameter: weights, grads, optimizer state (sharded if configured)."""
    contention: float
    """Usable fraction of a communication window for overlapped compute."""
    grad_buffer_bytes: int = 0
    """Receive buffer of an output gradient, held from RECV_B until its backward ends."""
    block: str = ""
    """The block the layer graph was traced from ('' for lynxpipe's reference layer); plans
    made from it drop that block's tensors by their traced names (`wrap_blocks(plan=...)`)."""
    device: str = ""
    """Device a measured table was timed on (cpu, cuda, ...); "" for the analytic model."""
    tp_sync_ms: float = 0.0
    """What each TP collective costs in a loop beyond its compute and its own time: the wait
    for the TP rank that reached it last (measured by `profile.comm.sync_probe`; 0 for the
    analytic model, where ranks are taken to run in lockstep)."""
    recv_ahead: bool = False
    """Each pipeline receive is posted one RECV ahead (the first at the step's start), so its
    message moves while the rank computes: gloo moves a message only once its `irecv` is posted
    (`benchmarks/gloo_p2p_probe.py`). The buffer posted ahead is one boundary tensor
    (`grad_buffer_bytes`) every pipeline rank holds through the step, counted in its static
    memory. Set by measured profiles whose messages went through gloo; NCCL pairs each send
    with the receive after it instead."""

    def label(self, cluster: str) -> str:
        """Where the times come from, for titles: `measured profile, cpu` or `analytic,
        a100-pcie` (the cluster whose datasheet the analytic model used)."""
        if self.source == "analytic":
            return f"analytic, {cluster}"
        return f"{self.source} profile" + (f", {self.device}" if self.device else "")


def _roofline_ms(flops: float, nbytes: float, cluster: ClusterSpec) -> float:
    compute = flops / (cluster.peak_flops_per_s * cluster.compute_efficiency)
    memory = nbytes / (cluster.hbm_bytes_per_s * cluster.memory_efficiency)
    return 1e3 * max(compute, memory)


def collective_ms(coll: Collective, group: int, bytes_per_s: float, latency_us: float) -> float:
    """Ring alpha-beta time: all-reduce moves 2(g-1)/g of the bytes, AG/RS (g-1)/g."""
    if group <= 1:
        return 0.0
    if coll.kind == "p2p":
        return 1e3 * (latency_us * 1e-6 + coll.size_bytes / bytes_per_s)
    steps = 2 * (group - 1) if coll.kind == "all_reduce" else group - 1
    return 1e3 * (steps * latency_us * 1e-6 + steps / group * coll.size_bytes / bytes_per_s)


def overlapped_collective(overlap_ms: float, coll_ms: float,
                          contention: float) -> tuple[float, float]:
    """(wall ms of the overlapped compute, window ms left) of a backward collective of `coll_ms`
    that overlaps `overlap_ms` of compute (a column-parallel linear's wgrad GEMM).

    The overlapped GEMM is compute inside the collective's window, so it obeys the window rule
    the simulator applies to recompute (SPEC §4): a window of W ms runs c*W ms of compute for
    free (c: `CostTable.contention`), i.e. compute there advances at rate c. The GEMM takes
    overlap/c of the window's wall time, what it has left after the collective ends runs at full
    speed, and the rest of the window stays open: the step lasts W + max(0, overlap - c*W).
    c = 1 is the uncontended max(W, overlap). Measured on one CPU core per rank, c is ~0.05:
    gloo's threads and the GEMM take turns, and timing the GEMM alone under-predicts the
    backward (the emulated sweep's B sections, BENCHMARKS.md).
    """
    c = max(contention, 1e-9)
    inside = min(overlap_ms / c, coll_ms)
    return inside + max(0.0, overlap_ms - c * coll_ms), max(0.0, coll_ms - overlap_ms / c)


def layer_cost(graph: LayerGraph, cluster: ClusterSpec, tp: int) -> LayerCost:
    op_ms = {op.name: OpTime(_roofline_ms(op.fwd_flops, op.fwd_bytes, cluster),
                             _roofline_ms(op.dgrad_flops, op.dgrad_bytes, cluster),
                             _roofline_ms(op.wgrad_flops, op.wgrad_bytes, cluster)
                             if op.wgrad_flops else 0.0)
             for op in graph.ops}
    coll_ms = {c.name: collective_ms(c, tp, cluster.intra_node_bytes_per_s,
                                     cluster.intra_node_latency_us) for c in graph.collectives}
    return LayerCost(graph, op_ms, coll_ms)


def analytic_costs(model: ModelSpec, cluster: ClusterSpec, par: ParallelSpec) -> CostTable:
    """Roofline + alpha-beta CostTable for the model on the cluster under the layout."""
    inter_pp = par.tp * par.pp > cluster.devices_per_node
    p2p_bw = cluster.inter_node_bytes_per_s if inter_pp else cluster.intra_node_bytes_per_s
    p2p_lat = cluster.inter_node_latency_us if inter_pp else cluster.intra_node_latency_us
    # Megatron scatter/gather optimisation: each TP rank sends 1/t of the activation.
    p2p_bytes = model.dtype_bytes * par.seq_len * par.micro_batch_size * model.hidden_size // par.tp
    p2p = collective_ms(Collective("p2p", "p2p", p2p_bytes), 2, p2p_bw, p2p_lat)
    inter_dp = par.devices > cluster.devices_per_node
    dp_bw = cluster.inter_node_bytes_per_s if inter_dp else cluster.intra_node_bytes_per_s
    dp_lat = cluster.inter_node_latency_us if inter_dp else cluster.intra_node_latency_us
    d = par.dp
    opt_state = 12.0 / d if par.distributed_optimizer else 12.0
    hbm = cluster.hbm_bytes_per_s * cluster.memory_efficiency
    return CostTable(
        source="analytic",
        spec_fingerprint=fingerprint(model, par),
        layer=layer_cost(layer_graph(model, par), cluster, par.tp),
        embed=layer_cost(embed_graph(model, par), cluster, par.tp),
        head=layer_cost(head_graph(model, par), cluster, par.tp),
        p2p_ms=p2p,
        p2p_bytes=p2p_bytes,
        dp_alpha_ms=2 * (d - 1) * dp_lat * 1e-3 if d > 1 else 0.0,
        dp_ms_per_byte=1e3 * 2 * (d - 1) / d / dp_bw if d > 1 else 0.0,
        # Adam reads/writes fp32 master, m, v, grad and writes the bf16 weight: ~34 B/param
        optimizer_ms_per_param=1e3 * 34.0 / hbm / (d if par.distributed_optimizer else 1),
        layer_params=model.layer_params() // par.tp,
        embed_params=model.vocab_size * model.hidden_size // par.tp,
        bytes_per_param=2.0 + 4.0 + opt_state,
        contention=cluster.contention,
        grad_buffer_bytes=boundary_bytes(model, par),
    )


def boundary_bytes(model: ModelSpec, par: ParallelSpec) -> int:
    """Bytes of one micro-batch's activation (or its gradient) crossing pipeline stages on one
    rank: a receive buffer."""
    return model.dtype_bytes * par.boundary_rows * par.micro_batch_size * model.hidden_size


def save_profile(path: str | Path, table: CostTable) -> Path:
    """Write profile.json."""
    return save_artifact(path, "lynxpipe.profile", PROFILE_VERSION, table)


def load_profile(path: str | Path) -> CostTable:
    """Read profile.json (kind and version checked)."""
    return load_artifact(path, "lynxpipe.profile", PROFILE_VERSION, CostTable)


def profile_model(model: ModelSpec, par: ParallelSpec, table: CostTable,
                  widths: tuple[int, ...] = (4, 2, 1)) -> ModelSpec | None:
    """`model` at the activation width the profile was made for (fp32 on CPU: 4), trying
    `model.dtype_bytes` first; None when the profile is for other specs."""
    import dataclasses

    for nbytes in dict.fromkeys((model.dtype_bytes, *widths)):
        candidate = dataclasses.replace(model, dtype_bytes=nbytes)
        if fingerprint(candidate, par) == table.spec_fingerprint:
            return candidate
    return None
