"""Overlapped recomputation on Hugging Face GPT-2 blocks: the user-model API in use.

Builds a small GPT-2 (random weights, offline) from a `GPT2Config`, wraps its blocks with
`lynxpipe.runtime.engine.blocks.wrap_blocks`, and trains one step of two micro-batches under several
policies: blocks dropped and recomputed on demand, per segment (attention | MLP), pinned to an
idle window (a pipeline RECV wait), and whole-block (Megatron full recompute). Every policy must
give the same loss and gradients, bit for bit, as keeping everything.

    pip install transformers   # optional, test-only dependency of lynxpipe
    python examples/hf_gpt2_recompute.py
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lynxpipe.runtime.engine.blocks import use_engine, wrap_blocks  # noqa: E402
from lynxpipe.runtime.engine.meter import EngineStats  # noqa: E402
from lynxpipe.runtime.engine.recompute import RecomputeEngine  # noqa: E402
from lynxpipe.schedule.actions import Window  # noqa: E402

RECV = Window("recv", mb=0, stage=0, recv="RECV_B")
"""The idle window used here: as if waiting for micro-batch 0's output gradient."""


def gpt2_segments(block: nn.Module) -> list[Callable[..., Any]]:
    """GPT2Block as two segments, attention + residual and MLP + residual (its own forward)."""
    signature = inspect.signature(block.forward)

    def attention(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(hidden, *args, **kwargs).arguments
        out, _ = block.attn(block.ln_1(hidden), past_key_values=bound.get("past_key_values"),
                            attention_mask=bound.get("attention_mask"),
                            use_cache=bound.get("use_cache", False), **bound.get("kwargs", {}))
        return out + hidden

    def mlp(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden + block.mlp(block.ln_2(hidden))

    return [attention, mlp]


def build_model(layers: int = 3, seed: int = 0) -> nn.Module:
    """A small GPT-2 LM with random weights; its blocks wrapped for recomputation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=32, vocab_size=128,
                        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    model.transformer.h = wrap_blocks(model.transformer.h, segments=gpt2_segments)
    return model.train()


def train_step(model: nn.Module, engine: RecomputeEngine, batches: list[torch.Tensor]
               ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], EngineStats]:
    """F0 F1 (RECV window) B0 B1 under `engine`; returns losses, gradients and counters."""
    use_engine(model.transformer.h, engine)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # dropout draws from the global RNG
    losses = []
    for mb, ids in enumerate(batches):
        with engine.forward(mb):
            # use_cache=False: a KV cache is state the block mutates, so a replay would differ
            losses.append(model(ids, labels=ids, use_cache=False).loss)
    engine.run_tasks(RECV)
    for mb, loss in enumerate(losses):
        with engine.backward(mb):
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [x.detach() for x in losses], grads, engine.end_step()


def policies(layers: int) -> dict[str, RecomputeEngine]:
    """Engines for the demo's policies."""
    every = range(layers)
    return {
        "keep everything": RecomputeEngine(),
        "attention dropped, on demand": RecomputeEngine({i: {"seg0"} for i in every}),
        "blocks dropped, last in RECV": RecomputeEngine(
            {i: {"seg0", "seg1"} for i in every},
            tasks={RECV: [(0, layers - 1, 0), (0, layers - 1, 1)]}),
        "full recompute": RecomputeEngine(full_layers=every),
    }


def main(layers: int = 3) -> dict[str, tuple[bool, EngineStats]]:
    """Run every policy; returns policy -> (bitwise equal to keeping everything, counters)."""
    model = build_model(layers)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(2)]
    results, ref = {}, None
    for name, engine in policies(layers).items():
        losses, grads, stats = train_step(model, engine, batches)
        ref = ref or (losses, grads)
        equal = (all(torch.equal(a, b) for a, b in zip(ref[0], losses))
                 and ref[1].keys() == grads.keys()
                 and all(torch.equal(ref[1][k], grads[k]) for k in grads))
        results[name] = (equal, stats)
    return results


if __name__ == "__main__":
    for policy, (equal, stats) in main().items():
        where = sorted({t.where for t in stats.tasks}) or ["-"]
        print(f"{policy:32s} bitwise equal: {equal}  peak saved: {stats.peak_bytes / 1024:7.1f} KiB"
              f"  recomputes: {len(stats.tasks):2d} ({', '.join(where)})")
