"""Op graphs of Megatron-style decoder layers (every registered family), embedding and LM head
(SPEC §3, §10).

Shapes are per TP rank: s sequence, b micro-batch, h hidden, a heads, t TP degree; with
sequence parallelism (SP) norms, dropout and residuals work on s/t tokens. Saved bytes per
layer and TP rank, 16-bit activations, a GPT layer with attention and hidden dropout, leaving
out the norms' fp32 statistics (16sb bytes, 16sb/t with SP; see `_norm_stats`):

- explicit attention (Korthikanti et al. 2022): sbh(10 + 24/t + 5as/(ht)) without SP,
  (sbh/t)(34 + 5as/h) with SP;
- fused attention (SPEC §10): the s x s scores, probabilities and dropout mask are never
  stored; the kernel keeps its output and the fp32 row logsumexp, b(a/t)s values, plus a 16-byte
  RNG seed/offset when attention dropout is on: sbh(10 + 24/t + 4a/(ht)) + 16 without SP,
  (sbh/t)(34 + 4a/h) + 16 with SP (the 24/t: q, k, v 6, output 2, FC1 8, GeLU 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lynxpipe.cost.graph import Collective, CollKind, LayerGraph, Op, Step, Tensor
from lynxpipe.errors import LynxError
from lynxpipe.specs.families import Family
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

TOKEN_BOOKKEEPING_BYTES = 9
"""Per token: an int64 index plus a bool mask, kept by vocab-parallel embedding and CE."""


@dataclass
class _Builder:
    """Accumulates a layer program; segments advance at every forward collective."""

    kind: str
    ops: list[Op] = field(default_factory=list)
    tensors: list[tuple[str, int, str, tuple[str, ...], bool]] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    fwd: list[Step] = field(default_factory=list)
    segment: int = 0

    def op(self, name: str, inputs: tuple[str, ...], output: str, flops: float, nbytes: float,
           gemm: bool = False, bwd_factor: float = 2.0) -> None:
        """Add a forward op; GEMMs split backward into dgrad and wgrad of equal work, other ops
        take `bwd_factor` x their forward FLOPs (and 1.5 x its bytes) in one backward."""
        wgrad = (flops, nbytes) if gemm else (0.0, 0.0)
        dgrad = (flops, nbytes) if gemm else (bwd_factor * flops, 1.5 * nbytes)
        self.ops.append(Op(name, self.segment, inputs, output, flops, nbytes,
                           dgrad[0], dgrad[1], wgrad[0], wgrad[1],
                           0.0 if gemm else max(0.0, (bwd_factor - 2.0) * flops)))
        if self.fwd and self.fwd[-1].kind == "compute":
            self.fwd[-1] = Step("compute", self.fwd[-1].ops + (name,), "fwd")
        else:
            self.fwd.append(Step("compute", (name,), "fwd"))

    def save(self, name: str, size_bytes: float, producer: str, used_by: tuple[str, ...],
             droppable: bool) -> None:
        """Declare a saved tensor; `used_by` are the ops whose backward reads it."""
        self.tensors.append((name, int(size_bytes), producer, used_by, droppable))

    def coll(self, name: str, kind: CollKind, size_bytes: float) -> None:
        """A blocking forward collective: ends the current segment."""
        self.collectives.append(Collective(name, kind, int(size_bytes)))
        self.fwd.append(Step("coll", coll=name))
        self.segment += 1

    def bwd_coll(self, name: str, kind: CollKind, size_bytes: float) -> None:
        """Declare a backward collective (placed by `build`)."""
        self.collectives.append(Collective(name, kind, int(size_bytes)))

    def build(self, bwd_colls: dict[str, tuple[str, str, str]]) -> LayerGraph:
        """Finish the graph. `bwd_colls[op] = (coll, 'before'|'dgrad'|'wgrad', coll2)`.

        `before`: the collective blocks before the op's backward (SP gradient all-gather);
        `dgrad`/`wgrad`: the collective overlaps that part of the op's backward; for a
        column-parallel linear its input-gradient collective overlaps the wgrad GEMM (Megatron).
        """
        order = {op.name: i for i, op in enumerate(self.ops)}
        tensors = []
        for name, size, producer, used_by, droppable in self.tensors:
            first = min(used_by, key=order.__getitem__)
            seg = self.ops[order[producer]].segment if producer else 0
            tensors.append(Tensor(name, seg, size, producer, droppable, first, tuple(used_by)))
        bwd: list[Step] = []
        for op in reversed(self.ops):
            placement = bwd_colls.get(op.name)
            if placement is None:
                bwd.append(Step("compute", (op.name,), "bwd"))
                continue
            coll, where, _ = placement
            if where == "before":
                bwd += [Step("coll", coll=coll), Step("compute", (op.name,), "bwd")]
            elif where == "wgrad":
                bwd += [Step("compute", (op.name,), "dgrad"),
                        Step("coll", (op.name,), "wgrad", coll)]
            else:  # SP re-gather of the input overlaps dgrad; the grad reduce-scatter overlaps wgrad
                bwd += [Step("coll", (op.name,), "dgrad", coll),
                        Step("coll", (op.name,), "wgrad", placement[2])]
        return LayerGraph(self.kind, tuple(self.ops), tuple(tensors), tuple(self.collectives),
                          tuple(self.fwd), tuple(_merge(bwd)))


def _merge(steps: list[Step]) -> list[Step]:
    """Merge consecutive compute steps of the same part into one."""
    out: list[Step] = []
    for step in steps:
        if out and step.kind == "compute" and out[-1].kind == "compute" and out[-1].part == step.part:
            out[-1] = Step("compute", out[-1].ops + step.ops, step.part)
        else:
            out.append(step)
    return out


@dataclass(frozen=True)
class _Dims:
    """Per-TP-rank sizes shared by the builders."""

    n: int      # tokens of the micro-batch, s * b
    nl: int     # tokens in norm/dropout/residual regions (n / t with SP)
    s: int
    b: int
    h: int
    f: int      # ffn width per rank
    heads: int  # attention heads per rank
    kv: int     # key/value width per rank
    kv_heads: int  # key/value heads per rank
    t: int
    e: int      # bytes per element
    sp: bool
    v: int      # vocabulary shard per rank


def _dims(model: ModelSpec, par: ParallelSpec) -> _Dims:
    t, n = par.tp, par.seq_len * par.micro_batch_size
    return _Dims(n=n, nl=n // t if par.sequence_parallel else n, s=par.seq_len,
                 b=par.micro_batch_size, h=model.hidden_size, f=model.ffn_hidden_size // t,
                 heads=model.num_heads // t,
                 kv=max(1, model.num_kv_heads // t) * model.head_dim,
                 kv_heads=max(1, model.num_kv_heads // t), t=t,
                 e=model.dtype_bytes, sp=par.sequence_parallel, v=model.vocab_size // t)


def _gather(bld: _Builder, d: _Dims, name: str) -> None:
    """SP all-gather of a norm output before a column-parallel GEMM."""
    if d.sp:
        bld.coll(name, "all_gather", d.e * d.n * d.h)


def _reduce(bld: _Builder, d: _Dims, name: str) -> None:
    """Row-parallel output: all-reduce, or reduce-scatter with SP."""
    bld.coll(name, "reduce_scatter" if d.sp else "all_reduce", d.e * d.n * d.h)


def _explicit_attention(bld: _Builder, d: _Dims, qkv: str, dropout: bool) -> None:
    """QK^T + softmax, attention dropout and AV as separate ops (Korthikanti's accounting)."""
    score_elems = d.b * d.heads * d.s * d.s
    bld.op("scores", (qkv,), "probs", 2 * d.n * d.s * (d.h // d.t)
           + 5 * score_elems, 2 * d.e * score_elems, gemm=True)
    bld.save("probs", d.e * score_elems, "scores", ("scores",), True)
    attn_in = "probs"
    if dropout:
        # mask (1 byte) and dropped probabilities (e bytes) are produced together
        bld.op("attn_dropout", ("probs",), "probs_dropped", 2 * score_elems,
               (2 * d.e + 1) * score_elems)
        bld.save("probs_dropped", (d.e + 1) * score_elems, "attn_dropout",
                 ("attn_dropout", "av"), True)
        attn_in = "probs_dropped"
    bld.op("av", (attn_in, qkv), "ctx", 2 * d.n * d.s * (d.h // d.t),
           d.e * (score_elems + 2 * d.n * d.h // d.t), gemm=True)
    bld.save("ctx", d.e * d.n * d.h // d.t, "av", ("proj",), True)


ATTENTION_BWD_FACTOR = 2.5
"""Fused attention backward over its forward matmuls: the kernel recomputes the scores
(FlashAttention-2: 2.5x); a time-model fact, not a recompute task."""
RNG_STATE_BYTES = 16
"""Philox seed and offset (two int64) a fused kernel keeps instead of a dropout mask."""


def _fused_attention(bld: _Builder, d: _Dims, qkv: str, dropout: bool) -> None:
    """One FlashAttention-style kernel: reads q, k, v (views of the QKV output), saves its
    output (`ctx`, which the out-projection reads too) and the fp32 row logsumexp. With GQA
    and several key/value groups on a rank, the query heads of the grouped QKV output
    ([.., group, q heads + k + v, d], Megatron's layout) cannot be merged into one head
    dimension without a copy: the kernel's q is that copy, saved as well."""
    matmul = 4 * d.n * d.s * (d.h // d.t)  # QK^T and AV, as the explicit path counts them
    io = d.e * (d.n * (d.h // d.t + 2 * d.kv) + d.n * d.h // d.t) + 4 * d.b * d.heads * d.s
    bld.op("attn", (qkv,), "ctx", matmul, io, bwd_factor=ATTENTION_BWD_FACTOR)
    bld.save("ctx", d.e * d.n * d.h // d.t, "attn", ("attn", "proj"), True)
    bld.save("attn_lse", 4 * d.b * d.heads * d.s, "attn", ("attn",), True)
    if 1 < d.kv_heads < d.heads:  # GQA with several groups per rank: q is a regrouped copy
        bld.save("attn_q", d.e * d.n * d.h // d.t, "attn", ("attn",), True)
    if dropout:
        bld.save("attn_rng", RNG_STATE_BYTES, "attn", ("attn",), False)


@dataclass(frozen=True)
class AttentionBuilder:
    """How one attention variant (`ModelSpec.attention`) enters the layer graph."""

    readers: tuple[str, ...]
    """Ops whose backward reads the QKV output."""
    build: Callable[[_Builder, _Dims, str, bool], None]
    """Adds the attention's ops and saved tensors (qkv tensor name, attention dropout on)."""


ATTENTION_BUILDERS: dict[str, AttentionBuilder] = {
    "explicit": AttentionBuilder(("scores", "av"), _explicit_attention),
    "fused": AttentionBuilder(("attn",), _fused_attention),
}
"""Graph builder of every attention variant."""


def _norm_stats(bld: _Builder, d: _Dims, norm: str, family: Family) -> None:
    """fp32 statistics a norm keeps for backward: mean and 1/std (LayerNorm) or 1/rms.

    Korthikanti's formulas leave them out as small; autograd holds them, so the memory model
    counts them (as `<norm>_stats`, never droppable: regenerating them is regenerating the norm).
    """
    bld.save(f"{norm}_stats", family.norm_stats_bytes_per_token() * d.nl, norm, (norm,), False)


def _attention_block(bld: _Builder, d: _Dims, model: ModelSpec, mlp_in: str) -> None:
    """Norm, QKV (+RoPE), attention core, out-proj, its reduction, residual, second norm."""
    family, attn = model.family_info, ATTENTION_BUILDERS[model.attention]
    drop = model.hidden_dropout > 0
    q_width, norm_flops = d.h // d.t, family.norm_flops_per_element()
    bld.op("ln1", ("x",), "ln1_out", norm_flops * d.nl * d.h, 2 * d.e * d.nl * d.h)
    bld.save("x", d.e * d.nl * d.h, "", ("ln1",), False)
    _norm_stats(bld, d, "ln1", family)
    bld.save("ln1_out", d.e * d.nl * d.h, "ln1", ("qkv",), True)
    _gather(bld, d, "ag_qkv")
    qkv_width = q_width + 2 * d.kv
    rope_flops, rope_bytes = ((6 * d.n * qkv_width, d.e * d.n * qkv_width) if family.rope
                              else (0, 0))
    bld.op("qkv", ("ln1_out",), "qkv_out", 2 * d.n * d.h * qkv_width + rope_flops,
           d.e * (d.n * d.h + d.n * qkv_width + d.h * qkv_width) + rope_bytes, gemm=True)
    bld.save("qkv_out", d.e * d.n * qkv_width, "qkv", attn.readers, not d.sp)
    attn.build(bld, d, "qkv_out", model.attention_dropout > 0)
    bld.op("proj", ("ctx",), "", 2 * d.n * q_width * d.h,
           d.e * (d.n * q_width + d.n * d.h + q_width * d.h), gemm=True)
    _reduce(bld, d, "ar_proj")
    _residual(bld, d, "res1", "h1", drop, ("ln2",))
    bld.op("ln2", ("h1",), "ln2_out", norm_flops * d.nl * d.h, 2 * d.e * d.nl * d.h)
    _norm_stats(bld, d, "ln2", family)
    bld.save("ln2_out", d.e * d.nl * d.h, "ln2", (mlp_in,), True)
    _gather(bld, d, "ag_fc1")


def _gelu_mlp(bld: _Builder, d: _Dims) -> None:
    """Megatron GPT MLP: FC1 (column-parallel), GeLU, FC2 (row-parallel)."""
    bld.op("fc1", ("ln2_out",), "fc1_out", 2 * d.n * d.h * d.f,
           d.e * (d.n * d.h + d.n * d.f + d.h * d.f), gemm=True)
    bld.save("fc1_out", d.e * d.n * d.f, "fc1", ("gelu",), not d.sp)
    bld.op("gelu", ("fc1_out",), "gelu_out", 8 * d.n * d.f, 2 * d.e * d.n * d.f)
    bld.save("gelu_out", d.e * d.n * d.f, "gelu", ("fc2",), True)
    bld.op("fc2", ("gelu_out",), "", 2 * d.n * d.f * d.h,
           d.e * (d.n * d.f + d.n * d.h + d.h * d.f), gemm=True)


def _swiglu_mlp(bld: _Builder, d: _Dims) -> None:
    """LLaMA MLP: fused gate/up projection (column-parallel), SwiGLU, down (row-parallel)."""
    bld.op("gate_up", ("ln2_out",), "gate_up_out", 2 * d.n * d.h * 2 * d.f,
           d.e * (d.n * d.h + 2 * d.n * d.f + 2 * d.h * d.f), gemm=True)
    bld.save("gate_up_out", d.e * 2 * d.n * d.f, "gate_up", ("swiglu",), not d.sp)
    bld.op("swiglu", ("gate_up_out",), "swiglu_out", 6 * d.n * d.f, 3 * d.e * d.n * d.f)
    bld.save("swiglu_out", d.e * d.n * d.f, "swiglu", ("down",), True)
    bld.op("down", ("swiglu_out",), "", 2 * d.n * d.f * d.h,
           d.e * (d.n * d.f + d.n * d.h + d.h * d.f), gemm=True)


@dataclass(frozen=True)
class MlpBuilder:
    """How one kind of MLP (`Family.mlp`) enters the layer graph."""

    first: str
    """Column-parallel op reading the second norm's output."""
    last: str
    """Row-parallel op whose output is reduced across TP."""
    build: Callable[[_Builder, _Dims], None]
    """Adds the MLP's ops and saved tensors."""


MLP_BUILDERS: dict[str, MlpBuilder] = {
    "gelu": MlpBuilder("fc1", "fc2", _gelu_mlp),
    "swiglu": MlpBuilder("gate_up", "down", _swiglu_mlp),
}
"""Graph builder of every `Family.mlp` kind."""


def transformer_layer(model: ModelSpec, par: ParallelSpec) -> LayerGraph:
    """One decoder layer of `model`'s family: norm, QKV (+RoPE), attention, out-proj, its TP
    reduction, residual; norm, MLP, its TP reduction, residual."""
    family = model.family_info
    mlp = MLP_BUILDERS.get(family.mlp)
    if mlp is None:
        raise LynxError(f"family {family.name}: no graph builder for MLP kind {family.mlp!r}")
    d, drop = _dims(model, par), model.hidden_dropout > 0
    bld = _Builder("layer")
    _attention_block(bld, d, model, mlp.first)
    mlp.build(bld, d)
    _reduce(bld, d, "ar_fc2")
    _residual(bld, d, "res2", "", drop, ())
    return bld.build(_bwd_colls(bld, d, ("qkv", mlp.first), ("proj", mlp.last)))


def _residual(bld: _Builder, d: _Dims, name: str, out: str, dropout: bool,
              out_users: tuple[str, ...]) -> None:
    """Dropout + residual add after a collective; its outputs cannot be regenerated without it."""
    bld.op(name, (), out, 3 * d.nl * d.h, 3 * d.e * d.nl * d.h)
    if dropout:
        bld.save(f"{name}_mask", d.nl * d.h, name, (name,), False)
    if out:
        bld.save(out, d.e * d.nl * d.h, name, out_users, False)


def _bwd_colls(bld: _Builder, d: _Dims, column: tuple[str, ...],
               row: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """Backward collectives of column-parallel (input grad) and row-parallel (SP) linears."""
    placement: dict[str, tuple[str, str, str]] = {}
    size = d.e * d.n * d.h
    for op in column:
        if d.sp:
            bld.bwd_coll(f"{op}_bwd_ag", "all_gather", size)
            bld.bwd_coll(f"{op}_bwd_rs", "reduce_scatter", size)
            placement[op] = (f"{op}_bwd_ag", "dgrad", f"{op}_bwd_rs")
        else:
            bld.bwd_coll(f"{op}_bwd_ar", "all_reduce", size)
            placement[op] = (f"{op}_bwd_ar", "wgrad", "")
    if d.sp:
        for op in row:
            bld.bwd_coll(f"{op}_bwd_ag", "all_gather", size)
            placement[op] = (f"{op}_bwd_ag", "before", "")
    return placement


def embed_graph(model: ModelSpec, par: ParallelSpec) -> LayerGraph:
    """Vocab-parallel embedding (+ position embedding for GPT) and embedding dropout."""
    d = _dims(model, par)
    bld = _Builder("embed")
    bld.op("lookup", (), "", 0.0, 2 * d.e * d.n * d.h)
    _reduce(bld, d, "ar_embed")
    bld.op("embed_dropout", (), "", 3 * d.nl * d.h, 3 * d.e * d.nl * d.h)
    # int64 token ids + the bool "outside my vocab shard" mask for the embedding backward; the
    # runtime hands them over once the reduction is done, so they are held from here
    bld.save("embed_ids", TOKEN_BOOKKEEPING_BYTES * d.n, "embed_dropout", ("lookup",), False)
    if model.hidden_dropout > 0:
        bld.save("embed_mask", d.nl * d.h, "embed_dropout", ("embed_dropout",), False)
    return bld.build(_bwd_colls(bld, d, (), ("lookup",)))


def head_graph(model: ModelSpec, par: ParallelSpec) -> LayerGraph:
    """Final norm, vocab-parallel LM head and vocab-parallel cross-entropy (fp32 softmax)."""
    d = _dims(model, par)
    bld = _Builder("head")
    family = model.family_info
    norm_flops = family.norm_flops_per_element()
    bld.op("final_ln", ("final_ln_in",), "final_ln_out", norm_flops * d.nl * d.h,
           2 * d.e * d.nl * d.h)
    bld.save("final_ln_in", d.e * d.nl * d.h, "", ("final_ln",), False)
    _norm_stats(bld, d, "final_ln", family)
    bld.save("final_ln_out", d.e * d.nl * d.h, "final_ln", ("logits",), False)
    _gather(bld, d, "ag_head")
    bld.op("logits", ("final_ln_out",), "", 2 * d.n * d.h * d.v,
           d.e * (d.n * d.h + d.n * d.v + d.h * d.v), gemm=True)
    bld.op("ce_max", (), "", 2 * d.n * d.v, d.e * d.n * d.v)
    bld.coll("ar_ce_max", "all_reduce", 4 * d.n)
    bld.op("ce_sum", (), "", 4 * d.n * d.v, (d.e + 4) * d.n * d.v)
    bld.coll("ar_ce_sum", "all_reduce", 8 * d.n)
    bld.op("ce_loss", (), "softmax", 2 * d.n, 4 * d.n * d.v)
    bld.save("softmax", 4 * d.n * d.v, "ce_loss", ("ce_loss", "ce_sum", "ce_max"), False)
    bld.save("ce_targets", TOKEN_BOOKKEEPING_BYTES * d.n, "ce_loss", ("ce_loss",), False)
    return bld.build(_bwd_colls(bld, d, ("logits",), ()))


def layer_graph(model: ModelSpec, par: ParallelSpec) -> LayerGraph:
    """The transformer layer of `model`'s family (`specs.families`)."""
    return transformer_layer(model, par)
