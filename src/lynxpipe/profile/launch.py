"""Launching the profiling ranks (`python -m lynxpipe.profile.comm`), on plain loopback or inside
the emulated cluster, relaying rank 0's progress and naming a rank that fails or hangs."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from lynxpipe.artifact import from_dict, to_dict, write_json_atomic
from lynxpipe.errors import LynxError
from lynxpipe.profile.samples import Measurement, ProfileJob, Progress


def _pump(stream: IO[bytes], lines: queue.Queue[str]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace"))


def _tail(log: Path, lines: int = 3) -> str:
    text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    useful = [ln for ln in text if "Warning" not in ln and "return func" not in ln]
    return " | ".join(useful[-lines:]) or "(no output)"


def _supervise(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout_s: float,
               progress: Progress) -> None:
    """Relay rank 0's progress; on a failed rank or the timeout, kill all and say which."""
    lines: queue.Queue[str] = queue.Queue()
    assert procs[0].stdout is not None
    threading.Thread(target=_pump, args=(procs[0].stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                event = json.loads(lines.get(timeout=0.1))
                progress(event["what"], event["done"], event["total"])
            except (queue.Empty, ValueError, KeyError, TypeError):
                pass
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                r, c = bad[0]
                raise LynxError(f"profiling rank {r} failed (exit {c}): {_tail(logs[r])}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                late = [r for r, c in enumerate(codes) if c is None]
                raise LynxError(f"profiling timed out after {timeout_s:.0f} s (--timeout); ranks "
                                f"{late} still running: {_tail(logs[late[0]])}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _start(job: ProfileJob, argv: list[str], logs: list[Path], handle: Any) -> list[Any]:
    """Start every rank: on loopback, or in the emulated cluster's namespaces (`handle`)."""
    from lynxpipe.testbed import run_in_rank

    env = {"TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    if job.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    procs = []
    for r in range(job.ranks):
        out = subprocess.PIPE if r == 0 else subprocess.DEVNULL
        with open(logs[r], "wb") as log:
            if handle is None:
                plain = {"GLOO_SOCKET_IFNAME": "lo", "WORLD_SIZE": str(job.ranks), "RANK": str(r)}
                procs.append(subprocess.Popen(argv, env={**os.environ, **env, **plain},
                                              stdout=out, stderr=log))
            else:  # run_in_rank sets RANK, WORLD_SIZE and the rank's own interface
                procs.append(run_in_rank(handle, r, argv, env, stdout=out, stderr=log))
    return procs


def launch(job: ProfileJob, emulate: tuple[float, float] | None, timeout_s: float,
           progress: Progress) -> Measurement:
    """Run `job` on `job.ranks` processes (inside an emulated cluster of `emulate` =
    (rate Mbit/s, latency ms) when given) and return rank 0's Measurement."""
    with tempfile.TemporaryDirectory(prefix="lynxpipe-profile-") as tmp:
        job_path = write_json_atomic(Path(tmp) / "job.json", to_dict(job))
        out = Path(tmp) / "measurement.json"
        logs = [Path(tmp) / f"rank{r}.log" for r in range(job.ranks)]
        argv = [sys.executable, "-m", "lynxpipe.profile.comm", str(job_path), str(out),
                str(Path(tmp) / "rendezvous")]
        if emulate is None:
            _supervise(_start(job, argv, logs, None), logs, timeout_s, progress)
        else:
            from lynxpipe.testbed import (
                EmulatedCluster,
                emulated,
                free_cluster_id,
                require_privileges,
            )

            require_privileges()
            cluster = EmulatedCluster(num_ranks=job.ranks, rate_mbit=emulate[0],
                                      latency_ms=emulate[1], cluster_id=free_cluster_id())
            with emulated(cluster) as handle:
                _supervise(_start(job, argv, logs, handle), logs, timeout_s, progress)
        if not out.exists():
            raise LynxError(f"profiling ranks exited without a result: {_tail(logs[0])}")
        return from_dict(Measurement, json.loads(out.read_text()), "measurement")
