"""The runtime's own overhead: `none` under lynxpipe's executor against a plain PyTorch training
loop of the same model and shapes (issue 9, part 4).

One process (tp = pp = 1, gloo world of one, one thread), the same reference layers, weights and
batches. The plain loop is ordinary autograd with no hooks: per micro-batch `loss = stage(ids,
targets); (loss / m).backward()`, then AdamW. The executor runs the `none` plan: the same work
plus its saved-tensor hooks (the activation meter), action bookkeeping and timers. The two
alternate step by step (ROUNDS pairs, order flipped every round), so drifts of the shared
machine hit both; the overhead is the median of paired ratios. Target: <= 3%.

    python benchmarks/runtime_overhead.py [--rounds 20] [--model gpt-small-cpu]
    python benchmarks/runtime_overhead.py --profile     # cProfile of the executor's steps

Writes benchmarks/results/runtime_overhead/{results.json,results.md} and its BENCHMARKS.md
section.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_md import replace_section

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.runtime.pipeline.groups import RankLayout, make_groups
from lynxpipe.runtime.train.data import DataSpec, batches
from lynxpipe.runtime.train.optim import AdamW
from lynxpipe.runtime.train.worker import setup_rank
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "runtime_overhead"
SEED = 7


def _plan(model_name: str, par: ParallelSpec) -> Any:
    model = dataclasses.replace(get_model(model_name), dtype_bytes=4)
    cluster = get_cluster("a100-pcie")
    req = PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**40,
                      costs=analytic_costs(model, cluster, par))
    return make("none", req)


class PlainLoop:
    """The same chunk and optimizer, driven by ordinary autograd."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.optimizer = AdamW(list(stage.parameters()), lr=1e-3, weight_decay=0.01)

    def step(self, step: int, mbs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        start = time.perf_counter()
        for mb, (ids, targets) in enumerate(mbs):
            self.stage.rng.set_key(step, 0, mb)
            loss = self.stage(ids, targets)
            (loss / len(mbs)).backward()
        self.stage.finish_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return 1e3 * (time.perf_counter() - start)


def measure(model_name: str, par: ParallelSpec, rounds: int, profile: bool) -> dict[str, Any]:
    """Paired step times of the plain loop and the executor."""
    plan = _plan(model_name, par)
    groups = make_groups(RankLayout(1, 1, 1), 60.0)
    setup = setup_rank(plan, groups, seed=SEED)
    plain = PlainLoop(setup_rank(plan, groups, seed=SEED).chunks[0])
    data = DataSpec("synthetic", SEED, plan.model.vocab_size, par.seq_len,
                    par.micro_batch_size, par.num_microbatches, 1)
    plain_ms, exec_ms = [], []
    prof = cProfile.Profile() if profile else None
    for step in range(rounds + 1):
        mbs = batches(data, step, 0)
        runs = [("plain", lambda: plain.step(step, mbs)),
                ("exec", lambda: setup.executor.run_step(step, mbs).step_ms)]
        for name, run in runs if step % 2 == 0 else reversed(runs):
            if prof is not None and name == "exec":
                prof.enable()
            ms = run()
            if prof is not None and name == "exec":
                prof.disable()
            if step > 0:  # step 0 warms both up
                (plain_ms if name == "plain" else exec_ms).append(ms)
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    ratios = [e / p for e, p in zip(exec_ms, plain_ms)]
    return {"model": model_name, "parallel": dataclasses.asdict(par), "rounds": rounds,
            "plain_ms": plain_ms, "executor_ms": exec_ms,
            "plain_median_ms": statistics.median(plain_ms),
            "executor_median_ms": statistics.median(exec_ms),
            "overhead_median": statistics.median(ratios) - 1,
            "overhead_q1": statistics.quantiles(ratios, n=4)[0] - 1,
            "overhead_q3": statistics.quantiles(ratios, n=4)[2] - 1}


def _write(result: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    ok = "met" if result["overhead_median"] <= 0.03 else "missed"
    par = result["parallel"]
    body = (f"Rerun: `python benchmarks/runtime_overhead.py` (commit `{result['commit']}`, "
            f"{result['date']}). `{result['model']}` fp32, tp = pp = 1, one thread, micro-batch "
            f"{par['micro_batch_size']} × {par['num_microbatches']}, seq {par['seq_len']}; "
            f"{result['rounds']} paired steps, order flipped every step.\n\n"
            f"| loop | median step (ms) |\n|:--|--:|\n"
            f"| plain PyTorch (autograd, no hooks) | {result['plain_median_ms']:,.1f} |\n"
            f"| lynxpipe executor, `none` plan | {result['executor_median_ms']:,.1f} |\n\n"
            f"Overhead (median of paired ratios): **{result['overhead_median']:+.1%}** "
            f"(interquartile {result['overhead_q1']:+.1%} … {result['overhead_q3']:+.1%}); "
            f"target ≤ 3%: {ok}.")
    (OUT / "results.md").write_text("# Runtime overhead\n\n" + body + "\n")
    replace_section(ROOT / "BENCHMARKS.md", "runtime_overhead", "Runtime overhead (measured)",
                    body)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="gpt-small-cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="cProfile the executor; no files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29641", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        par = ParallelSpec(micro_batch_size=1, num_microbatches=args.microbatches,
                           seq_len=args.seq_len)
        result = measure(args.model, par, args.rounds, args.profile)
    finally:
        dist.destroy_process_group()
    print(f"plain {result['plain_median_ms']:.1f} ms, executor "
          f"{result['executor_median_ms']:.1f} ms, overhead {result['overhead_median']:+.1%}")
    if not args.profile:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True,
                                          cwd=ROOT).stdout.strip()
        result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write(result)


if __name__ == "__main__":
    main()
