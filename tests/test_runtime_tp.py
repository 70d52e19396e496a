"""Runtime with TP=2 on two gloo ranks (one launch for every check: each costs seconds).

Per family (GPT, LLaMA with GQA) and with/without sequence parallelism, on each rank:
recompute policies give bitwise-identical losses and gradients, run where planned, and hold the
graph's saved bytes; windows open at the graph's collective steps; and (dropout 0) the TP model
computes the tp=1 model's loss and gradients.
"""

from __future__ import annotations

import gc
import json
import os
import socket
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checks(rank: int) -> list[str]:
    from lynxpipe.runtime.engine.selfcheck import (
        check_step_order,
        check_tp_equivalence,
        self_check,
    )
    from lynxpipe.runtime.model.layer import BuildConfig
    from lynxpipe.runtime.model.stage import Stage
    from lynxpipe.runtime.model.tp import TPContext
    from lynxpipe.specs.model import ModelSpec
    from lynxpipe.specs.parallel import ParallelSpec

    problems = []
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 8), generator=gen),
                torch.randint(0, 64, (2, 8), generator=gen)) for _ in range(2)]
    for family, kv, attention in (("gpt", 4, "explicit"), ("llama", 2, "explicit"),
                                  ("gpt", 4, "fused"), ("llama", 2, "fused")):
        for sp in (False, True):
            model = ModelSpec(f"tiny-{family}", family, 3, 32, 4, kv, 64, 64, attention=attention,
                              attention_dropout=0.1 if attention == "explicit" else 0.0,
                              hidden_dropout=0.1)
            par = ParallelSpec(tp=WORLD, sequence_parallel=sp, seq_len=8, micro_batch_size=2)
            cfg = BuildConfig(model, par, TPContext.from_group(dist.group.WORLD, sp))
            stage = Stage(cfg, range(3), embed=True, head=True)
            found = self_check(stage, batches) + check_step_order(stage, batches[0])
            exact = replace(cfg, model=replace(model, attention_dropout=0.0, hidden_dropout=0.0))
            found += check_tp_equivalence(Stage(exact, range(3), embed=True, head=True),
                                          batches[0])
            problems += [f"[{family} {attention} sp={sp} rank {rank}] {p}" for p in found]
    return problems


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        problems = _checks(rank)
        # modules and engines in reference cycles still hold the process group: free them
        # now, or gloo aborts when the interpreter destroys the group at exit
        gc.collect()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(problems, f)


def test_tp2_policies_windows_and_equivalence(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    problems = []
    for rank in range(WORLD):
        problems += json.loads((tmp_path / f"rank{rank}.json").read_text())
    assert problems == []
