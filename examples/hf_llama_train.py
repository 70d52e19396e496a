"""Train a Hugging Face `LlamaForCausalLM` with a lynxpipe plan: the end of the CLI path
(SPEC §11). From a fresh clone (transformers installed; nothing is downloaded):

    lynxpipe profile --module hf --model examples/llama-tiny.json --tp 1 --pp 1 \\
        --seq-len 128 --micro-batch-size 2 --num-microbatches 2 --out profile.json
    lynxpipe plan --model examples/llama-tiny.json --profile profile.json --tp 1 --pp 1 \\
        --seq-len 128 --micro-batch-size 2 --num-microbatches 2 --budget 6MiB \\
        --policy lynx-heu --out plan.json
    python examples/hf_llama_train.py --config examples/llama-tiny.json --plan plan.json \\
        --steps 3 --check

The training loop is the user's own; lynxpipe adds one line (`wrap_blocks(..., plan=plan)`) and
the engine's forward/backward contexts. With `--check` it trains the unwrapped model too and
reports whether the parameters are bit-for-bit equal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lynxpipe.plan.types import load_plan  # noqa: E402
from lynxpipe.profile.hf import build_hf_model  # noqa: E402
from lynxpipe.runtime.engine import wrap_blocks  # noqa: E402


def train(config: Path, plan_path: Path, steps: int, wrap: bool = True) -> dict[str, Any]:
    """`steps` AdamW steps on random tokens, micro-batches as the plan says; `wrap=False`
    trains the same model and data without lynxpipe."""
    torch.set_num_threads(1)
    plan = load_plan(plan_path)
    model = build_hf_model(config, seed=0)
    engine = None
    if wrap:
        model.model.layers = wrap_blocks(model.model.layers, plan=plan)  # the one line
        engine = model.model.layers.engine
    mbs = plan.parallel.num_microbatches
    batch, seq = plan.parallel.micro_batch_size, plan.parallel.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"losses": [], "recomputes": 0, "saved": None}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses = []
        for mb in range(mbs):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
            with engine.forward(mb) if engine else contextlib.nullcontext():
                losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss / mbs)
            if engine is not None and out["saved"] is None:
                held = engine.meter.breakdown()
                out["saved"] = [sum(held[(0, g)].values()) for g in range(len(plan.layers))]
        for mb, loss in enumerate(losses):
            with engine.backward(mb) if engine else contextlib.nullcontext():
                loss.backward()
        if engine is not None:
            out["recomputes"] += len(engine.end_step().tasks)
        opt.step()
        out["losses"].append(float(sum(x.detach() for x in losses)))
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="The model's config.json.")
    parser.add_argument("--plan", type=Path, required=True, help="plan.json (lynxpipe plan).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--check", action="store_true",
                        help="Also train unwrapped; compare the parameters bit for bit.")
    args = parser.parse_args(argv)
    got = train(args.config, args.plan, args.steps)
    print(f"losses {['%.4f' % x for x in got['losses']]}; {got['recomputes']} recomputes; "
          f"bytes saved per layer {got['saved']}")
    if args.check:
        ref = train(args.config, args.plan, args.steps, wrap=False)
        got["bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(ref["params"],
                                                                      got["params"]))
        print(f"bitwise equal to training without lynxpipe: {got['bitwise_equal']}")
    return got


if __name__ == "__main__":
    main()
