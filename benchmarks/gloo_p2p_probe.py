"""Does gloo move a point-to-point message before the receiver posts its `irecv`?

Two ranks in network namespaces on a tbf-shaped link (root; `lynxpipe.testbed`). Rank 0 posts
an `isend` and stays busy; rank 1 stays busy for --busy-ms, then waits for the message, having
posted its `irecv` either after the busy time ("late post", what the executor does at a RECV
action) or before it ("early post"). If the message travelled while the receiver was busy, both
waits are ~0; if gloo waits for the receiver, the late post waits the whole transfer. Median,
min and max over 2 rounds x --repeats per case.

    python benchmarks/gloo_p2p_probe.py            # 100 Mbit and 1 Gbit, 16 KiB .. 4 MiB

Writes results.json and results.md under --out (default benchmarks/results/gloo_p2p).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(100, 16 << 10), (100, 512 << 10), (100, 4 << 20), (1000, 512 << 10)]


def worker(nbytes: int, busy_ms: float, repeats: int) -> None:
    """One rank of the probe (run inside its namespace); rank 1 prints the waits as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    rank, x = dist.get_rank(), torch.ones(nbytes // 4)
    waits: dict[str, list[float]] = {"late_post": [], "early_post": []}
    for mode in [*waits] * 2:
        for _ in range(repeats):
            dist.barrier()
            if rank == 0:
                work = dist.isend(x, 1, tag=7)
                time.sleep(busy_ms / 1e3)
                work.wait()
            else:
                buf = torch.empty_like(x)
                work = dist.irecv(buf, 0, tag=7) if mode == "early_post" else None
                time.sleep(busy_ms / 1e3)  # the receiver computes meanwhile
                start = time.perf_counter()
                (work or dist.irecv(buf, 0, tag=7)).wait()
                waits[mode].append((time.perf_counter() - start) * 1e3)
            dist.barrier()
    if rank == 1:
        print(json.dumps(waits))
    dist.destroy_process_group()


def probe(rate_mbit: float, nbytes: int, busy_ms: float, repeats: int) -> dict:
    """Both ranks of one case on a fresh emulated cluster."""
    from lynxpipe.testbed.netns import emulated, free_cluster_id, run_in_rank
    from lynxpipe.testbed.spec import EmulatedCluster

    argv = [sys.executable, __file__, "--worker", str(nbytes), str(busy_ms), str(repeats)]
    cluster = EmulatedCluster(num_ranks=2, rate_mbit=rate_mbit, cluster_id=free_cluster_id())
    with emulated(cluster) as handle:
        procs = [run_in_rank(handle, r, argv, env={"MASTER_PORT": "29533"},
                             stdout=subprocess.PIPE) for r in (0, 1)]
        out = [p.communicate(timeout=600)[0].decode() for p in procs][1]
    waits = json.loads(out.strip().splitlines()[-1])
    return {"rate_mbit": rate_mbit, "bytes": nbytes, "busy_ms": busy_ms,
            "transfer_ms_at_rate": nbytes * 8 / (rate_mbit * 1e3),
            **{mode: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
               for mode, v in waits.items()}}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy-ms", type=float, default=500.0)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gloo_p2p")
    args = ap.parse_args()
    rows = []
    for rate, nbytes in CASES:
        rows.append(probe(rate, nbytes, args.busy_ms, args.repeats))
        r = rows[-1]
        print(f"{rate:g} Mbit, {nbytes >> 10} KiB: late post {r['late_post']['median_ms']:.2f} ms,"
              f" early post {r['early_post']['median_ms']:.2f} ms (transfer at the rate "
              f"{r['transfer_ms_at_rate']:.1f} ms)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"busy_ms": args.busy_ms, "rows": rows},
                                                      indent=1))
    lines = ["| link | message | transfer at the rate | wait, irecv posted late | "
             "wait, irecv posted early |", "|:--|--:|--:|--:|--:|"]
    lines += [f"| {r['rate_mbit']:g} Mbit | {r['bytes'] >> 10} KiB | "
              f"{r['transfer_ms_at_rate']:.1f} ms | {r['late_post']['median_ms']:.2f} ms | "
              f"{r['early_post']['median_ms']:.2f} ms |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
    main()
