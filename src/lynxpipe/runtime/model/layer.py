"""Reference GPT / LLaMA decoder layers that mirror the planner's op graph (`cost/layers.py`).

A layer is a table of ops with the graph's names, run in the graph's order; the TP collectives
inside `qkv`/`fc1` (SP all-gather), `proj`/`fc2` (all-reduce or reduce-scatter) sit exactly at
the graph's segment boundaries, and every tensor autograd saves is tagged with its graph name
(`x`, `ln1_out`, `qkv_out`, `probs`, `probs_dropped` = dropped probs + mask, `ctx`, `res1_mask`,
`h1`, `ln2_out`, `fc1_out`/`gate_up_out`, `gelu_out`/`swiglu_out`, `res2_mask`). The only
extra saved tensors are the norms' fp32 statistics, tagged `ln1_stats` / `ln2_stats`
(LayerNorm: mean and 1/std; RMSNorm: 1/rms; 4 bytes per token each).

Activations use Megatron's [s, b, h] layout ([s/t, b, h] in SP regions). Attention is explicit
(batched GEMMs on views of `qkv_out`, fused-style scale-mask-softmax, dropout, GEMM), so the
saved tensors are exactly Korthikanti's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lynxpipe.cost.graph import LayerGraph
from lynxpipe.cost.layers import MLP_BUILDERS, layer_graph
from lynxpipe.errors import LynxError
from lynxpipe.runtime.limits import check_runnable
from lynxpipe.runtime.model.env import PLAIN, Env, ModelRng, OpRuntime, _mix
from lynxpipe.runtime.model.ops import (
    apply_dropout,
    apply_rope,
    attention_scale,
    fused_attention,
    layer_norm,
    rms_norm,
    rope_tables,
    scaled_causal_softmax,
    swiglu,
)
from lynxpipe.runtime.model.tp import (
    CollSteps,
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    mark_sequence_parallel,
)
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec

EMBED_LAYER = -1
"""Layer index of the embedding in windows, tasks and meter owners (the head is num_layers)."""
NORM_EPS = 1e-5
"""Epsilon of LayerNorm / RMSNorm."""

@dataclass(frozen=True)
class BuildConfig:
    """Everything needed to build layers of one model replica on one TP rank."""

    model: ModelSpec
    """Model shape; `dtype_bytes` is overridden by `dtype`."""
    par: ParallelSpec
    """Parallel layout (tp, sequence_parallel, seq_len, micro_batch_size are used)."""
    tp: TPContext
    """TP group of this rank."""
    dtype: torch.dtype = torch.float32
    """Parameter and activation dtype (fp32 on CPU)."""
    device: str = "cpu"
    """Device of parameters and activations."""
    seed: int = 1234
    """Seed of weight init and dropout; equal seeds give equal full (unsharded) weights."""

    def __post_init__(self) -> None:
        m, par, tp = self.model, self.par, self.tp
        if par.tp != tp.size or par.sequence_parallel != tp.sequence_parallel:
            raise LynxError(f"ParallelSpec(tp={par.tp}, sp={par.sequence_parallel}) does not match "
                            f"the TP group (size {tp.size}, sp={tp.sequence_parallel})")
        if m.num_heads % tp.size or m.num_kv_heads % tp.size:
            raise LynxError(f"the runtime needs tp={tp.size} to divide num_heads={m.num_heads} "
                            f"and num_kv_heads={m.num_kv_heads}")
        if m.ffn_hidden_size % tp.size or m.vocab_size % tp.size:
            raise LynxError(f"tp={tp.size} must divide ffn_hidden_size and vocab_size")
        check_runnable(m)
        if par.sequence_parallel and par.seq_len % tp.size:
            raise LynxError(f"sequence_parallel needs seq_len={par.seq_len} divisible by tp")

    @property
    def spec(self) -> ModelSpec:
        """The model with dtype_bytes of the runtime dtype (what the planner must be given)."""
        return replace(self.model, dtype_bytes=torch.empty((), dtype=self.dtype).element_size())

    def factory(self) -> dict[str, object]:
        """dtype/device keyword arguments for parameters."""
        return {"dtype": self.dtype, "device": self.device}

    def init_generator(self, layer: int) -> torch.Generator:
        """CPU generator for the full weights of `layer` (independent of TP and stage split)."""
        return torch.Generator().manual_seed(_mix(self.seed, layer, 7919))


def steps_of(graph: LayerGraph, op: str, fwd_coll: str) -> CollSteps:
    """Window steps of a TP module: forward collective `fwd_coll`, backward ones of `op`."""
    fwd = tuple(i for i, s in enumerate(graph.fwd_steps) if s.kind == "coll" and s.coll == fwd_coll)
    bwd = tuple(i for i, s in enumerate(graph.bwd_steps)
                if s.kind == "coll" and s.coll.startswith(f"{op}_bwd_"))
    return CollSteps(fwd, bwd)


def _normal(gen: torch.Generator, *shape: int, std: float = 0.02) -> Tensor:
    return torch.randn(shape, generator=gen) * std


class Norm(nn.Module):
    """LayerNorm (GPT) or RMSNorm (LLaMA); returns (out, stats) so stats can be named."""

    def __init__(self, cfg: BuildConfig, gen: torch.Generator) -> None:
        super().__init__()
        h = cfg.model.hidden_size
        self.weight = nn.Parameter((1.0 + _normal(gen, h, std=0.1)).to(**cfg.factory()))
        self.bias = (nn.Parameter(_normal(gen, h, std=0.1).to(**cfg.factory()))
                     if cfg.model.family_info.norm == "layernorm" else None)
        mark_sequence_parallel(*self.parameters())

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.bias is not None:
            out, mean, rstd = layer_norm(x, self.weight, self.bias, NORM_EPS)
            return out, (mean, rstd)
        out, rstd = rms_norm(x, self.weight, NORM_EPS)
        return out, (rstd,)


class TransformerLayer(nn.Module):
    """One GPT or LLaMA layer on one TP rank; its op table follows `layer_graph(spec, par)`."""

    def __init__(self, cfg: BuildConfig, index: int, rng: ModelRng) -> None:
        super().__init__()
        m, tp = cfg.model, cfg.tp
        self.index, self.rng, self.tp, self.family = index, rng, tp, m.family_info
        self.graph: LayerGraph = layer_graph(cfg.spec, cfg.par)
        """The planner's graph of this layer (names, segments, step programs)."""
        self.p_attn, self.p = m.attention_dropout, m.hidden_dropout
        self.hd, self.kvh = m.head_dim, m.num_kv_heads // tp.size
        self.qpg = m.num_heads // m.num_kv_heads
        self._build_params(cfg, cfg.init_generator(index))
        s = cfg.par.seq_len
        if m.attention == "explicit":
            self.register_buffer("causal", torch.ones(s, s, dtype=torch.bool,
                                                      device=cfg.device).triu(1),
                                 persistent=False)
        if self.family.rope:
            cos, sin = rope_tables(s, self.hd)
            self.register_buffer("cos", cos.to(**cfg.factory()), persistent=False)
            self.register_buffer("sin", sin.to(**cfg.factory()), persistent=False)
        self.op_names = tuple(op.name for op in self.graph.ops)
        missing = [n for n in self.op_names if not hasattr(self, f"_op_{n}")]
        if missing:
            raise LynxError(f"runtime layer has no op for graph ops {missing}")
        self.reads: dict[str, frozenset[str]] | None = None
        """Names each op reads (learned on the first forward); drives recompute inputs."""
        self.writes: dict[str, frozenset[str]] = {}
        """Names each op puts."""

    def _build_params(self, cfg: BuildConfig, gen: torch.Generator) -> None:
        m, tp, kw = cfg.model, cfg.tp, cfg.factory()
        h, f, bias = m.hidden_size, m.ffn_hidden_size, self.family.linear_bias
        mlp, g = MLP_BUILDERS[self.family.mlp], self.graph
        self.norm1, self.norm2 = Norm(cfg, gen), Norm(cfg, gen)
        qkv_rows = m.num_kv_heads * (self.qpg + 2) * self.hd
        self.qkv = ColumnParallelLinear(_normal(gen, qkv_rows, h),
                                        _normal(gen, qkv_rows) if bias else None, tp,
                                        steps_of(g, "qkv", "ag_qkv"), **kw)
        self.proj = RowParallelLinear(_normal(gen, h, h), tp, steps_of(g, "proj", "ar_proj"), **kw)
        if self.family.mlp == "gelu":
            w_up = _normal(gen, f, h)
        else:  # [gate; up] per rank: reorder [2, f, h] so a row split gives each rank both halves
            w_up = _normal(gen, 2, f, h).view(2, tp.size, f // tp.size, h).transpose(0, 1)
            w_up = w_up.reshape(2 * f, h)
        self.fc1 = ColumnParallelLinear(w_up, _normal(gen, f) if bias else None, tp,
                                        steps_of(g, mlp.first, "ag_fc1"), **kw)
        self.fc2 = RowParallelLinear(_normal(gen, h, f), tp,
                                     steps_of(g, mlp.last, "ar_fc2"), **kw)
        self.proj_bias = nn.Parameter(_normal(gen, h).to(**kw)) if bias else None
        self.fc2_bias = nn.Parameter(_normal(gen, h).to(**kw)) if bias else None
        if bias:
            mark_sequence_parallel(self.proj_bias, self.fc2_bias)

    # Ops are methods named _op_<graph op>; looked up per call (a table of bound methods
    # would make every layer a reference cycle, keeping its process group alive until GC).
    def _op_ln1(self, env: Env, rt: OpRuntime) -> None:
        self._norm(env, rt, self.norm1, "x", "ln1")

    def _op_proj(self, env: Env, rt: OpRuntime) -> None:
        env.put("proj_out", self.proj(env["ctx"], rt.window))

    def _op_res1(self, env: Env, rt: OpRuntime) -> None:
        self._put(env, rt, "h1", self._residual(env, rt, "res1"))

    def _op_ln2(self, env: Env, rt: OpRuntime) -> None:
        self._norm(env, rt, self.norm2, "h1", "ln2")

    def _op_res2(self, env: Env, rt: OpRuntime) -> None:
        env.put("out", self._residual(env, rt, "res2"))

    def _op_fc1(self, env: Env, rt: OpRuntime) -> None:
        self._put(env, rt, "fc1_out", self.fc1(env["ln2_out"], rt.window))

    def _op_gelu(self, env: Env, rt: OpRuntime) -> None:
        self._put(env, rt, "gelu_out", F.gelu(env["fc1_out"], approximate="tanh"))

    def _op_fc2(self, env: Env, rt: OpRuntime) -> None:
        env.put("fc2_out", self.fc2(env["gelu_out"], rt.window))

    def _op_gate_up(self, env: Env, rt: OpRuntime) -> None:
        self._put(env, rt, "gate_up_out", self.fc1(env["ln2_out"], rt.window))

    def _op_swiglu(self, env: Env, rt: OpRuntime) -> None:
        self._put(env, rt, "swiglu_out", swiglu(env["gate_up_out"]))

    def _op_down(self, env: Env, rt: OpRuntime) -> None:
        env.put("fc2_out", self.fc2(env["swiglu_out"], rt.window))

    @staticmethod
    def _put(env: Env, rt: OpRuntime, name: str, *parts: Tensor) -> None:
        env.put(name, *parts)
        rt.tag(name, *parts)

    def _norm(self, env: Env, rt: OpRuntime, norm: Norm, src: str, op: str) -> None:
        out, stats = norm(env[src])
        self._put(env, rt, f"{op}_out", out)
        self._put(env, rt, f"{op}_stats", *stats)

    def _op_qkv(self, env: Env, rt: OpRuntime) -> None:
        out = self.qkv(env["ln1_out"], rt.window)
        if self.family.rope:
            s, b = out.shape[:2]
            grouped = out.view(s, b, self.kvh, self.qpg + 2, self.hd)
            out = apply_rope(grouped, self.cos[:s], self.sin[:s], self.qpg + 1).view(s, b, -1)
        self._put(env, rt, "qkv_out", out)

    def _heads(self, qkv: Tensor) -> list[Tensor]:
        """Views [b*groups, s, hd] of each q head of a group, then k, then v (no copies)."""
        s, b = qkv.shape[:2]
        grouped = qkv.view(s, b, self.kvh, self.qpg + 2, self.hd)
        return [grouped[:, :, :, i].permute(1, 2, 0, 3).reshape(b * self.kvh, s, self.hd)
                for i in range(self.qpg + 2)]

    def _op_scores(self, env: Env, rt: OpRuntime) -> None:
        *qs, k, _ = self._heads(env["qkv_out"])
        kt = k.transpose(1, 2)
        scores = _stack([torch.bmm(q, kt) for q in qs])
        self._put(env, rt, "probs", scaled_causal_softmax(scores, attention_scale(self.hd),
                                                          self.causal))

    def _op_attn_dropout(self, env: Env, rt: OpRuntime) -> None:
        probs = env["probs"]
        mask = rt.mask("attn_dropout", tuple(probs.shape), self.p_attn, self.rng.local)
        self._put(env, rt, "probs_dropped", apply_dropout(probs, mask, self.p_attn), mask)

    def _op_av(self, env: Env, rt: OpRuntime) -> None:
        probs = env["probs_dropped"] if self.p_attn > 0 else env["probs"]
        qkv = env["qkv_out"]
        v = self._heads(qkv)[-1]
        ctx = _stack([torch.bmm(probs[:, j], v) for j in range(self.qpg)])
        s, b = qkv.shape[:2]
        ctx = ctx.view(b, self.kvh, self.qpg, s, self.hd).permute(3, 0, 1, 2, 4)
        self._put(env, rt, "ctx", ctx.reshape(s, b, self.kvh * self.qpg * self.hd))

    def _op_attn(self, env: Env, rt: OpRuntime) -> None:
        """Fused attention: one SDPA kernel on views of the QKV output; it saves q, k, v, its
        output (the context the out-projection reads) and the row logsumexp, tagged here."""
        qkv = env["qkv_out"]
        s, b = qkv.shape[:2]
        grouped = qkv.view(s, b, self.kvh, self.qpg + 2, self.hd)
        # GQA: merging (kv group, query in group) copies; keep the copy in [s, b, heads, hd]
        # order, as the kernel lays its output out like q and the context must be a view of it
        q = grouped[:, :, :, :self.qpg].reshape(s, b, self.kvh * self.qpg, self.hd)
        q = q.permute(1, 2, 0, 3)
        k, v = (grouped[:, :, :, i].permute(1, 2, 0, 3) for i in (self.qpg, self.qpg + 1))
        out, lse = fused_attention(q, k, v)
        if self.qpg > 1 and self.kvh > 1:  # the merge copied (the graph's `attn_q`)
            self._put(env, rt, "attn_q", q)
        self._put(env, rt, "attn_lse", lse)
        self._put(env, rt, "ctx", out.permute(2, 0, 1, 3).reshape(s, b, -1))

    def _residual(self, env: Env, rt: OpRuntime, op: str) -> Tensor:
        """Bias + dropout + residual add after a row-parallel linear (Megatron's fused op)."""
        src, skip, bias = (("proj_out", "x", self.proj_bias) if op == "res1"
                           else ("fc2_out", "h1", self.fc2_bias))
        t = env[src] if bias is None else env[src] + bias
        if self.p > 0:
            gen = self.rng.local if self.tp.sequence_parallel else self.rng.shared
            mask = rt.mask(op, tuple(t.shape), self.p, gen)
            self._put(env, rt, f"{op}_mask", mask)
            t = apply_dropout(t, mask, self.p)
        return env[skip] + t

    def run_ops(self, env: Env, rt: OpRuntime, names: Sequence[str]) -> None:
        """Run ops `names` in order on `env` (the recompute engine's entry point)."""
        for name in names:
            with env.op(name):
                getattr(self, f"_op_{name}")(env, rt)

    def forward(self, x: Tensor, rt: OpRuntime = PLAIN) -> Tensor:
        self.rng.for_layer(self.index)
        env = Env(track=self.reads is None)
        self._put(env, rt, "x", x)
        self.run_ops(env, rt, self.op_names)
        if self.reads is None:
            self.reads = {k: frozenset(v) for k, v in env.reads.items()}
            self.writes = {k: frozenset(v) for k, v in env.writes.items()}
        rt.finish(env, self.reads, self.writes)
        return env["out"]


def _stack(parts: list[Tensor]) -> Tensor:
    """Stack per-head results on dim 1 (a view when there is one head per group)."""
    return parts[0].unsqueeze(1) if len(parts) == 1 else torch.stack(parts, dim=1)
