"""lynxpipe's own reference layer as a block source (`--module reference`): tracing it must give
the analytic graph's saved bytes exactly, which the tests check for every family and attention
variant."""

from __future__ import annotations

import dataclasses

from lynxpipe.profile.trace import BlockCall
from lynxpipe.specs.model import ModelSpec
from lynxpipe.specs.parallel import ParallelSpec


def reference_source(model: ModelSpec, par: ParallelSpec, seed: int = 1234):  # noqa: ANN201
    """(batch, seq) -> a call of the reference layer (tp = 1, fp32, CPU) built for that shape
    (it holds shape-sized buffers: the causal mask, the RoPE tables)."""
    import torch

    from lynxpipe.runtime.model.env import ModelRng
    from lynxpipe.runtime.model.layer import BuildConfig, TransformerLayer
    from lynxpipe.runtime.model.tp import TPContext

    def call(batch: int, seq: int) -> BlockCall:
        shape = dataclasses.replace(par, tp=1, pp=1, dp=1, sequence_parallel=False,
                                    micro_batch_size=batch, seq_len=seq, schedule="1f1b",
                                    virtual_stages=1)
        cfg = BuildConfig(model, shape, TPContext(), torch.float32, "cpu", seed)
        layer = TransformerLayer(cfg, 0, ModelRng(seed, 0)).train()
        x = torch.randn(seq, batch, model.hidden_size,
                        generator=torch.Generator().manual_seed(seed))
        return BlockCall(layer, (x,), {})

    return call
