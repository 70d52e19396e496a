"""Embedding, LM head + loss, and `Stage`: a contiguous range of layers of one pipeline stage.

Window/owner indices: the embedding is layer `EMBED_LAYER` (-1), the head is layer
`num_layers`; their window steps index `embed_graph` / `head_graph` programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from lynxpipe.cost.graph import LayerGraph
from lynxpipe.cost.layers import embed_graph, head_graph
from lynxpipe.runtime.model.env import PLAIN, Env, ModelRng, OpRuntime
from lynxpipe.runtime.model.layer import (
    EMBED_LAYER,
    BuildConfig,
    Norm,
    TransformerLayer,
    _normal,
    steps_of,
)
from lynxpipe.runtime.model.ops import apply_dropout
from lynxpipe.runtime.model.tp import (
    CollSteps,
    ColumnParallelLinear,
    mark_sequence_parallel,
    reduce_sequence_parallel_grads,
    shard,
)
from lynxpipe.runtime.model.vocab import (
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

if TYPE_CHECKING:
    from lynxpipe.runtime.engine.recompute import RecomputeEngine


class Embedding(nn.Module):
    """Vocab-parallel word embedding (+ learned positions for GPT) and embedding dropout.

    Saves `embed_mask` (graph) and `embed_ids` (local ids int64 + outside mask bool: 9 bytes
    per token, not in the graph).
    """

    def __init__(self, cfg: BuildConfig, rng: ModelRng) -> None:
        super().__init__()
        m, gen = cfg.model, cfg.init_generator(EMBED_LAYER)
        self.tp, self.rng, self.p, self.index = cfg.tp, rng, m.hidden_dropout, EMBED_LAYER
        self.graph: LayerGraph = embed_graph(cfg.spec, cfg.par)
        self.steps = steps_of(self.graph, "lookup", "ar_embed")
        self.weight = nn.Parameter(shard(_normal(gen, m.vocab_size, m.hidden_size), 0, cfg.tp)
                                   .to(**cfg.factory()))
        self.pos = None
        if m.family_info.learned_positions:
            pos = _normal(gen, cfg.par.seq_len, m.hidden_size)
            self.pos = nn.Parameter(pos.to(**cfg.factory()))
            mark_sequence_parallel(self.pos)

    def forward(self, ids: Tensor, rt: OpRuntime = PLAIN) -> Tensor:
        """ids [b, s] -> hidden [s, b, h] ([s/t, b, h] with SP)."""
        self.rng.for_layer(self.index)
        out, local, outside = vocab_parallel_embedding(ids.t().contiguous(), self.weight, self.tp,
                                                       rt.window, self.steps)
        rt.tag("embed_ids", local, outside)
        if self.pos is not None:
            rows = out.shape[0]
            first = self.tp.rank * rows if self.tp.sequence_parallel else 0
            out = out + self.pos[first:first + rows].unsqueeze(1)
        if self.p > 0:
            gen = self.rng.local if self.tp.sequence_parallel else self.rng.shared
            mask = rt.mask("embed_dropout", tuple(out.shape), self.p, gen)
            rt.tag("embed_mask", mask)
            out = apply_dropout(out, mask, self.p)
        rt.finish(Env(), {}, {})
        return out


class Head(nn.Module):
    """Final norm, vocab-parallel LM head (column-parallel) and vocab-parallel cross-entropy.

    Saves `final_ln_in`, `final_ln_out`, `softmax` (graph), `final_ln_stats` and `ce_targets`
    (local target int64 + outside mask bool: 9 bytes per token), the last two not in the graph.
    """

    def __init__(self, cfg: BuildConfig, rng: ModelRng) -> None:
        super().__init__()
        m = cfg.model
        self.index = m.num_layers
        gen = cfg.init_generator(self.index)
        self.tp, self.rng = cfg.tp, rng
        self.graph: LayerGraph = head_graph(cfg.spec, cfg.par)
        self.norm = Norm(cfg, gen)
        self.logits = ColumnParallelLinear(_normal(gen, m.vocab_size, m.hidden_size), None, cfg.tp,
                                           steps_of(self.graph, "logits", "ag_head"),
                                           **cfg.factory())
        ce = [i for i, s in enumerate(self.graph.fwd_steps) if s.coll in ("ar_ce_max", "ar_ce_sum")]
        self.ce_steps = CollSteps(tuple(ce))

    def forward(self, x: Tensor, targets: Tensor, rt: OpRuntime = PLAIN) -> Tensor:
        """Mean token loss of hidden `x` against `targets` [b, s]."""
        rt.tag("final_ln_in", x)
        out, stats = self.norm(x)
        rt.tag("final_ln_out", out)
        rt.tag("final_ln_stats", *stats)
        logits = self.logits(out, rt.window)
        loss, softmax, local, outside = vocab_parallel_cross_entropy(
            logits, targets.t().contiguous(), self.tp, rt.window, self.ce_steps)
        rt.tag("softmax", softmax)
        rt.tag("ce_targets", local, outside)
        rt.finish(Env(), {}, {})
        return loss.mean()


class Stage(nn.Module):
    """Layers `layers` of the model (+ embedding on the first stage, + head on the last).

    forward(inputs, targets, engine): inputs are token ids [b, s] with the embedding, else the
    hidden state [s, b, h] ([s/t, b, h] with SP) received from the previous stage; returns the
    mean loss with the head, else the hidden state. With an engine, call it inside
    `engine.forward(mb, stage)`. Call `stage.rng.set_key(step, mb)` before each forward so
    every micro-batch draws its own dropout masks.
    """

    def __init__(self, cfg: BuildConfig, layers: range, *, embed: bool, head: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.rng = ModelRng(cfg.seed, cfg.tp.rank, cfg.device)
        self.embed = Embedding(cfg, self.rng) if embed else None
        self.layers = nn.ModuleList(TransformerLayer(cfg, i, self.rng) for i in layers)
        self.head = Head(cfg, self.rng) if head else None

    def forward(self, inputs: Tensor, targets: Tensor | None = None,
                engine: "RecomputeEngine | None" = None) -> Tensor:
        if engine is not None:
            engine.register_params(self.parameters())
        x = inputs
        if self.embed is not None:
            x = self.embed(inputs, self._rt(engine, self.embed))
        for layer in self.layers:
            x = layer(x, self._rt(engine, layer))
        if self.head is not None:
            if targets is None:
                raise ValueError("the last stage needs targets")
            return self.head(x, targets, self._rt(engine, self.head))
        return x

    @staticmethod
    def _rt(engine: "RecomputeEngine | None", module: nn.Module) -> OpRuntime:
        return PLAIN if engine is None else engine.record(module.index, module)

    def finish_grads(self) -> None:
        """Sum the grads of SP-replicated params over TP (call after the last backward)."""
        reduce_sequence_parallel_grads(self.parameters(), self.cfg.tp)

