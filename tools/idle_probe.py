"""Does a collective cost more after the link sat idle, or after the core was busy? (fidelity)

    python tools/idle_probe.py [--rate 200mbit] [--bytes 524288]     # root: emulated cluster

Two ranks in an emulated cluster. Per repetition, after a barrier, both ranks spend GAP ms
either sleeping (link idle, core idle) or computing matmuls (link idle, core busy), then time
one all-reduce of BYTES (and rank 0 a send of BYTES to rank 1 with a one-element ack). The
profile measures collectives right after a barrier (gap 0); training issues them after tens of
ms of compute. Prints the median per (mode, gap): if the time grows with the gap, the profile's
alpha-beta fit misses a cost that training pays every collective.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

GAPS_MS = (0.0, 5.0, 20.0, 60.0)


def _busy(ms: float, a) -> None:  # type: ignore[no-untyped-def]
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        a @ a


def rank_main(nbytes: int, reps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    x = torch.ones(nbytes // 4)
    ack = torch.ones(1)
    a = torch.randn(128, 128)
    out = {}
    for mode in ("sleep", "busy"):
        for gap in GAPS_MS:
            coll, p2p = [], []
            for rep in range(reps + 2):
                dist.barrier()
                time.sleep(gap / 1e3) if mode == "sleep" else _busy(gap, a)
                t0 = time.perf_counter()
                dist.all_reduce(x)
                t1 = time.perf_counter()
                dist.barrier()
                time.sleep(gap / 1e3) if mode == "sleep" else _busy(gap, a)
                t2 = time.perf_counter()
                if rank == 0:
                    dist.send(x, 1)
                    dist.recv(ack, 1)
                else:
                    dist.recv(x, 0)
                    dist.send(ack, 0)
                t3 = time.perf_counter()
                if rep >= 2:
                    coll.append(1e3 * (t1 - t0))
                    p2p.append(1e3 * (t3 - t2))
            out[f"{mode} {gap:g} ms"] = (statistics.median(coll), statistics.median(p2p))
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rate", default="200mbit")
    ap.add_argument("--bytes", type=int, default=512 * 1024)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.bytes, args.reps)
        return
    from lynxpipe.testbed import (EmulatedCluster, emulated, free_cluster_id, master_addr,
                                  parse_emulate, run_in_rank)

    mbit, latency = parse_emulate(args.rate)
    cluster = EmulatedCluster(num_ranks=2, rate_mbit=mbit, latency_ms=latency, tp_size=2,
                              pp_size=1, cluster_id=free_cluster_id())
    argv = [sys.executable, __file__, "--rank", "--bytes", str(args.bytes), "--reps",
            str(args.reps)]
    with emulated(cluster) as handle:
        env = {"MASTER_ADDR": master_addr(handle), "MASTER_PORT": "29500",
               "OMP_NUM_THREADS": "1"}
        procs = [run_in_rank(handle, r, argv, env,
                             stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL)
                 for r in range(2)]
        text = procs[0].communicate()[0].decode()
        procs[1].wait()
    result = json.loads(text.strip().splitlines()[-1])
    print(f"{args.rate}, {args.bytes / 1024:.0f} KiB: median ms (all-reduce, send+ack)")
    for key, (coll, p2p) in result.items():
        print(f"  {key:>12}: all-reduce {coll:7.2f}   p2p {p2p:7.2f}")


if __name__ == "__main__":
    main()
