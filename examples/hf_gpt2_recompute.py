"""Plan recomputation for Hugging Face GPT-2 blocks and apply it in training (SPEC §11).

A small GPT-2 (random weights, offline, dropout on; transformers 5.x) from a config.json:

1. `lynxpipe.profile.module` traces one real `GPT2Block` (eager attention) forward and backward
   into its layer graph: the tensors autograd really saves, named by the op that made them;
2. every policy plans over those tensors for a byte budget three quarters of what keeping
   everything needs;
3. `wrap_blocks(model.transformer.h, plan=plan)` drops exactly what the plan drops, and
   recomputes it when backward needs it (a one-rank plan has no idle window to hide it in).

Three AdamW steps of two micro-batches must leave the parameters bit-for-bit equal to the
unwrapped model's, each layer must hold the bytes its plan predicts, and the recompute must
have run.

    pip install transformers   # optional, test-only dependency of lynxpipe
    python examples/hf_gpt2_recompute.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lynxpipe import workflow  # noqa: E402
from lynxpipe.cost.table import CostTable  # noqa: E402
from lynxpipe.integrations.flat import layer_saved_bytes  # noqa: E402
from lynxpipe.plan.types import Plan  # noqa: E402
from lynxpipe.profile.hf import build_hf_model, hf_block_source  # noqa: E402
from lynxpipe.profile.module import module_costs  # noqa: E402
from lynxpipe.runtime.engine import wrap_blocks  # noqa: E402
from lynxpipe.specs import ParallelSpec, get_cluster  # noqa: E402
from lynxpipe.specs.hf import load_hf_config  # noqa: E402

CONFIG = {"model_type": "gpt2", "n_layer": 3, "n_embd": 64, "n_head": 4, "n_positions": 64,
          "vocab_size": 128, "bos_token_id": 0, "eos_token_id": 0, "loss_type": "ForCausalLM",
          "_attn_implementation": "eager"}
"""GPT-2's own dropout (attention, residual, embedding: 0.1) stays on."""
PARALLEL = ParallelSpec(micro_batch_size=2, num_microbatches=2, seq_len=32)
POLICIES = ("none", "selective", "checkmate", "lynx-heu", "full")


def write_config(folder: Path, layers: int) -> Path:
    """A GPT-2 config.json, as a user would have one."""
    path = folder / "config.json"
    path.write_text(json.dumps({**CONFIG, "n_layer": layers}))
    return path


def plan_all(config: Path) -> tuple[CostTable, dict[str, Plan]]:
    """Trace the block, then plan every policy under a budget that forces recomputation."""
    model = dataclasses.replace(load_hf_config(config), dtype_bytes=4)  # CPU: fp32
    cluster = get_cluster("a100-pcie")
    costs = module_costs(model, cluster, PARALLEL, hf_block_source(config), "hf:gpt2")
    roomy = workflow.build_request(model, cluster, PARALLEL, budget_bytes=1 << 40, costs=costs)
    budget = 3 * max(workflow.plan_policy("none", roomy).predicted.peak_memory_bytes) // 4
    req = workflow.build_request(model, cluster, PARALLEL, budget_bytes=budget, costs=costs)
    return costs, {name: workflow.plan_policy(name, req) for name in POLICIES}


def train(config: Path, plan: Plan | None, steps: int = 3) -> tuple[list[torch.Tensor], dict]:
    """`steps` AdamW steps (two micro-batches each); with a plan, through its engine."""
    model = build_hf_model(config, seed=0)
    engine = None
    if plan is not None:
        model.transformer.h = wrap_blocks(model.transformer.h, plan=plan)
        engine = model.transformer.h.engine
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    seen: dict = {"tasks": [], "saved": None}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(1234)  # dropout draws from the global RNG
        losses = []
        for mb in range(PARALLEL.num_microbatches):
            ids = torch.randint(0, CONFIG["vocab_size"], (2, PARALLEL.seq_len), generator=gen)
            with engine.forward(mb) if engine else _nothing():
                # use_cache=False: a KV cache is state a recompute would append to again
                losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss)
            if engine is not None and seen["saved"] is None:
                held = engine.meter.breakdown()
                seen["saved"] = [sum(held[(0, g)].values()) for g in range(len(plan.layers))]
        for mb, loss in enumerate(losses):
            with engine.backward(mb) if engine else _nothing():
                loss.backward()
        if engine is not None:
            seen["tasks"] += list(engine.end_step().tasks)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], seen


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def main(layers: int = 3) -> dict[str, dict]:
    """Every policy: bitwise equal?, recomputes run, saved bytes per layer, the plan's bytes."""
    with tempfile.TemporaryDirectory() as folder:
        config = write_config(Path(folder), layers)
        costs, plans = plan_all(config)
        reference, _ = train(config, None)
        results = {}
        for name, plan in plans.items():
            params, seen = train(config, plan)
            results[name] = {
                "bitwise_equal": all(torch.equal(a, b) for a, b in zip(reference, params)),
                "recomputes": len(seen["tasks"]),
                "recompute_gflop": sum(t.flops for t in seen["tasks"]) / 1e9,
                "saved_bytes": seen["saved"],
                "predicted_bytes": [layer_saved_bytes(costs.layer.graph, p.full, p.dropped)
                                    for p in plan.layers],
                "fits_budget": plan.predicted.fits_budget}
    return results


if __name__ == "__main__":
    for policy, r in main().items():
        print(f"{policy:10s} bitwise equal: {r['bitwise_equal']}  recomputes: "
              f"{r['recomputes']:3d} ({r['recompute_gflop']:.3f} GFLOP)  saved per layer: "
              f"{r['saved_bytes']} (plan: {r['predicted_bytes']})")
