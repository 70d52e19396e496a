"""One-GPU check of the executor (world size 1, NCCL, bf16): every policy bitwise equal to
`none` after 3 steps, recompute counters as planned, meter vs prediction vs CUDA peak.

    PYTHONPATH=src python3 tools/gpu_check.py [MODEL_PRESET]     # writes $OUT/gpu_check.json
"""

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

from lynxpipe.cost.table import analytic_costs
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.runtime.pipeline.from_plan import planned_where
from lynxpipe.runtime.pipeline.groups import RankLayout, make_groups
from lynxpipe.runtime.train.data import DataSpec, batches
from lynxpipe.runtime.train.worker import setup_rank
from lynxpipe.specs import ParallelSpec, get_cluster
from lynxpipe.specs.model import MODEL_PRESETS

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
torch.cuda.set_device(0)
dist.init_process_group("nccl")
model = MODEL_PRESETS[sys.argv[1] if len(sys.argv) > 1 else "gpt-tiny"]  # dtype_bytes 2: bf16
par = ParallelSpec(micro_batch_size=2, num_microbatches=4, seq_len=128)
cl = get_cluster("a100-pcie")
costs = analytic_costs(model, cl, par)
probe = PlanRequest(model=model, cluster=cl, parallel=par, budget_bytes=1 << 40, costs=costs)
hi = max(make("none", probe).predicted.peak_memory_bytes)
lo = max(make("full", probe).predicted.peak_memory_bytes)
req = dataclasses.replace(probe, budget_bytes=(hi + lo) // 2)
g = make_groups(RankLayout(1, 1, 1))
ref, rows = None, []
for name in ("none", "full", "selective", "checkmate", "lynx-heu", "lynx-opt"):
    plan = make(name, req)
    s = setup_rank(plan, g, seed=3, device="cuda:0")
    data = DataSpec("synthetic", 3, model.vocab_size, par.seq_len, 2, 4, 1)
    losses, times = [], []
    for step in range(3):
        r = s.executor.run_step(step, batches(data, step, 0, "cuda:0"))
        losses.append(r.losses)
        times.append(r.step_ms)
    ran = {(t.mb, t.layer, t.segment): t.where for t in r.engine.tasks}
    ok_counts = ran == planned_where(plan, 0)
    params = [p.detach().clone() for p in s.chunks[0].parameters()]
    if ref is None:
        ref = (losses, params)
    same = losses == ref[0] and all(torch.equal(a, b) for a, b in zip(ref[1], params))
    rows.append({"policy": name, "bitwise": same, "counters_as_planned": ok_counts,
                 "meter_peak": r.engine.peak_bytes,
                 "predicted": plan.predicted.peak_activation_bytes[0],
                 "cuda_peak": r.cuda_peak_bytes, "step_ms": [round(t, 1) for t in times],
                 "hidden_ms": round(r.engine.hidden_s * 1e3, 2),
                 "exposed_ms": round(r.engine.exposed_s * 1e3, 2)})
    print(rows[-1], flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_check.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
dist.destroy_process_group()
