"""Start the ranks of a training job and watch them (SPEC §7 "Launch").

- Built-in: a fork server (`runtime.pipeline.zygote`) imports torch once and forks tp*pp*dp ranks, all
  in one new process group, each dying with its parent (PR_SET_PDEATHSIG); rendezvous on
  127.0.0.1.
- `--emulate`: the same processes, each in its own network namespace of an emulated cluster
  (`lynxpipe.testbed`), so gloo traffic crosses tbf-shaped links.
- torchrun: detected from RANK / WORLD_SIZE / LOCAL_RANK; `lynxpipe train` then *is* a rank.

The launcher polls exit codes and heartbeats (`runtime.pipeline.health`). When a rank fails, the others
get a second to report, then everything left is killed and the error names the culprit: a rank
that died on its own (exit code, signal, or its own exception), else the peer the others timed
out waiting for, else the ranks still running. When no rank makes progress for --timeout
seconds, all are killed likewise. No rank outlives the launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lynxpipe.errors import DEBUG_ENV, LynxError
from lynxpipe.runtime.pipeline.health import (
    FAULT_ENV,
    RUN_DIR_ENV,
    classify,
    short_error,
)
from lynxpipe.runtime.pipeline.zygote import ForkedRank, zygote_main
from lynxpipe.runtime.train.job import TrainJob, save_job


class RankProcess(Protocol):
    """What the monitor needs of a rank: a Popen, or a rank forked by the zygote."""

    def poll(self) -> int | None:
        """Exit code, or None while running."""

    def kill(self) -> None:
        """SIGKILL it."""

    def wait(self, timeout: float | None = None) -> int:
        """Block until it ended."""

GRACE_S = 1.0
"""After the first failure, how long the other ranks get to report before being killed."""
STARTUP_S = 120.0
"""Progress watchdog allowance before every rank has started its first step."""
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process as a rank."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig_argv(argv: list[str]) -> list[str]:
    # setpriv sets PR_SET_PDEATHSIG without a preexec_fn (unsafe in threaded parents)
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv] if shutil.which("setpriv") else argv


def _rank_env(rank: int, world: int, run_dir: Path, master: str, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": master, "MASTER_PORT": str(port),
            RUN_DIR_ENV: str(run_dir), "OMP_NUM_THREADS": "1"}


@dataclass
class _Watch:
    """Mutable state of the monitor loop."""

    procs: Sequence[RankProcess]
    run_dir: Path
    timeout_s: float
    exits: dict[int, int] = field(default_factory=dict)
    first_failure: float | None = None
    beats: dict[int, str] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    stall: bool = False
    killed: frozenset[int] = frozenset()
    """Ranks still running when the launcher killed them."""

    def poll(self) -> None:
        now = time.monotonic()
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None or rank in self.exits:
                continue
            self.exits[rank] = code
            if code != 0 and self.first_failure is None:
                self.first_failure = now
        for rank in range(len(self.procs)):
            beat = _read(self.run_dir / f"hb-{rank}")
            if beat and beat != self.beats.get(rank):
                self.beats[rank] = beat
                self.last_progress = now

    def stalled(self) -> bool:
        allowance = self.timeout_s if len(self.beats) == len(self.procs) else max(
            self.timeout_s, STARTUP_S)
        return time.monotonic() - self.last_progress > allowance


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def kill_all(procs: Sequence[RankProcess], pgid: int | None = None) -> None:
    """SIGKILL every rank still running (and its process group) and reap them."""
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def monitor(procs: Sequence[RankProcess], run_dir: Path, timeout_s: float,
            labels: Sequence[Sequence[str]] = (), pgid: int | None = None) -> None:
    """Wait for every rank; on a failure or a stall kill the rest and raise naming the culprit.

    labels[pp_rank-independent rank][action index] names actions in messages (optional).
    """
    watch = _Watch(procs, run_dir, timeout_s)
    try:
        while True:
            watch.poll()
            if len(watch.exits) == len(procs) and not any(watch.exits.values()):
                return
            if watch.first_failure is not None and (
                    len(watch.exits) == len(procs)
                    or time.monotonic() - watch.first_failure > GRACE_S):
                break
            if watch.stalled():
                watch.stall = True
                break
            time.sleep(0.05)
    finally:
        watch.killed = frozenset(r for r, p in enumerate(procs) if p.poll() is None)
        kill_all(procs, pgid)
        watch.poll()
    raise LynxError(_diagnose(watch, labels))


def _where(watch: _Watch, rank: int, labels: Sequence[Sequence[str]]) -> str:
    beat = watch.beats.get(rank, "").split()
    if len(beat) != 2:
        return "before its first step"
    step, index = int(beat[0]), int(beat[1])
    name = labels[rank][index] if rank < len(labels) and index < len(labels[rank]) else "?"
    return f"in step {step} at action {index} {name}"


def _status(run_dir: Path, rank: int) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / f"status-{rank}.json").read_text())
    return None


def _diagnose(watch: _Watch, labels: Sequence[Sequence[str]]) -> str:
    """One line naming the rank that caused the failure and what the others saw."""
    ranks = range(len(watch.procs))
    statuses = {r: _status(watch.run_dir, r) for r in ranks}
    if watch.stall:
        stuck = ", ".join(f"rank {r} {_where(watch, r, labels)}" for r in ranks)
        return (f"no rank made progress for {watch.timeout_s:g} s (--timeout); killed the job: "
                f"{stuck}")
    own = [r for r, c in watch.exits.items() if c != 0 and r not in watch.killed
           and (statuses[r] is None or statuses[r].get("kind") == "error")]
    if own:  # a hard crash (no status: os._exit, a signal) first, then a rank's own error
        r = min(own, key=lambda x: (statuses[x] is not None, x))
        status = statuses[r]
        why = status["error"] if status else _code(watch.exits[r])
        return f"rank {r} failed {_where(watch, r, labels)}: {why}; the job was stopped"
    blamed = sorted({s["peer"] for s in statuses.values() if s and s.get("peer") is not None})
    suspects = blamed or sorted(watch.killed)
    victims = [r for r in ranks if statuses.get(r)]
    saw = "; ".join(f"rank {r}: {statuses[r]['error']}" for r in victims[:2])  # type: ignore
    names = ", ".join(f"rank {r} ({_where(watch, r, labels)})" for r in suspects) or "unknown"
    return (f"{names} stopped responding (hung?); the others timed out waiting for it after "
            f"{watch.timeout_s * 0.75:g} s and the job was stopped ({saw})")


def _code(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def spawn_local(job_path: Path, world: int, run_dir: Path
                ) -> tuple[list[ForkedRank], subprocess.Popen[bytes]]:
    """Start a zygote (leader of a new process group) that forks `world` ranks."""
    argv = [sys.executable, "-m", "lynxpipe.runtime.pipeline.launch", "--fork", str(world), str(job_path)]
    env = _rank_env(0, world, run_dir, "127.0.0.1", _free_port())
    zygote = subprocess.Popen(_pdeathsig_argv(argv), process_group=0, env=env)
    return [ForkedRank(r, run_dir, zygote) for r in range(world)], zygote


def _labels(job: TrainJob) -> list[list[str]]:
    """Action names of every global rank's order (for failure messages)."""
    par, order = job.plan.parallel, job.plan.order
    return [[str(a) for a in order.ranks[r // (par.tp * par.dp)]] for r in range(par.devices)]


@contextlib.contextmanager
def _terminations_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP become SystemExit, so `finally` blocks kill the ranks and clean up."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def launch(job: TrainJob, emulate: str = "") -> None:
    """Run `job` on tp*pp*dp local rank processes (in an emulated cluster with `emulate`)."""
    with _terminations_raise():
        _launch(job, emulate)


def _launch(job: TrainJob, emulate: str) -> None:
    run_dir = new_run_dir()
    try:
        job_path = save_job(run_dir / "job.json", job)
        if emulate:
            _launch_emulated(job, emulate, job_path, run_dir)
            return
        ranks, zygote = spawn_local(job_path, job.plan.parallel.devices, run_dir)
        try:
            monitor(ranks, run_dir, job.timeout_s, _labels(job), pgid=zygote.pid)
        finally:
            kill_all([zygote], zygote.pid)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _launch_emulated(job: TrainJob, emulate: str, job_path: Path, run_dir: Path) -> None:
    """One process per rank (each in its own network namespace: no fork server)."""
    from lynxpipe.testbed import (
        EmulatedCluster,
        emulated,
        free_cluster_id,
        master_addr,
        parse_emulate,
        require_privileges,
        run_in_rank,
    )

    require_privileges()
    rate, latency = parse_emulate(emulate)
    par = job.plan.parallel
    cluster = EmulatedCluster(num_ranks=par.devices, rate_mbit=rate, latency_ms=latency,
                              tp_size=par.tp, pp_size=par.pp, cluster_id=free_cluster_id())
    argv = [sys.executable, "-m", "lynxpipe.runtime.pipeline.launch", str(job_path)]
    with emulated(cluster) as handle:
        # namespaces are private: a fixed port cannot collide with anything
        procs = [run_in_rank(handle, r, argv,
                             _rank_env(r, par.devices, run_dir, master_addr(handle), 29500))
                 for r in range(par.devices)]
        monitor(procs, run_dir, job.timeout_s, _labels(job))


def worker_main(args: Sequence[str]) -> int:
    """`python -m lynxpipe.runtime.pipeline.launch JOB`: run one rank; exit 0, or 1 with one line."""
    rank = os.environ.get("RANK", "?")
    try:
        from lynxpipe.runtime.train.job import load_job
        from lynxpipe.runtime.train.worker import run_worker

        run_worker(load_job(args[0]))
    except BaseException as exc:  # noqa: BLE001 - every failure must become an exit code
        kind = classify(exc)
        if kind == "error" and not isinstance(exc, LynxError) and os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        if not os.environ.get(RUN_DIR_ENV):  # torchrun: no launcher reports it, so say it here
            print(f"rank {rank}: {short_error(exc)}", file=sys.stderr)
        return 1
    return 0


def new_run_dir() -> Path:
    """A private directory for job.json, heartbeats and status files."""
    return Path(tempfile.mkdtemp(prefix="lynxpipe-run-"))


__all__ = ["FAULT_ENV", "kill_all", "launch", "monitor", "new_run_dir", "spawn_local",
           "under_torchrun", "worker_main"]

if __name__ == "__main__":
    if sys.argv[1] == "--fork":
        _code = zygote_main(int(sys.argv[2]), sys.argv[3], Path(os.environ[RUN_DIR_ENV]))
    else:
        _code = worker_main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written and closed: skip the interpreter's teardown, which takes seconds
    # with torch loaded (and several ranks share two cores)
    os._exit(_code)
