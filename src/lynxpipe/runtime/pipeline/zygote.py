"""Fork server of the built-in launcher: import torch once, fork every rank from it.

Why: a rank process spends ~2 s of CPU importing torch (measured here, and several seconds of
wall time when ranks share two cores); forking ranks from one process that imported it already
pays that once per job. The zygote runs no torch op before forking, so no thread pool exists yet.

The launcher starts the zygote as the leader of a new process group (killing the group kills
every rank) with PR_SET_PDEATHSIG, and each rank gets PR_SET_PDEATHSIG towards the zygote, so a
killed launcher takes the whole job with it. The zygote reaps its ranks and writes
`exit-<rank>` (the exit code, negative for a signal) into the run directory; `ForkedRank` reads
it back, so the launcher watches forked ranks as it watches `subprocess.Popen` ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


class ForkedRank:
    """A rank forked by the zygote, with the `poll` / `kill` / `wait` of a Popen."""

    def __init__(self, rank: int, run_dir: Path, zygote: subprocess.Popen[bytes]) -> None:
        self.rank, self.run_dir, self.zygote = rank, run_dir, zygote

    def poll(self) -> int | None:
        """Exit code once the rank has ended (killed with its zygote: -SIGKILL), else None."""
        code = _read_int(self.run_dir / f"exit-{self.rank}")
        if code is not None:
            return code
        if self.zygote.poll() is not None:
            code = _read_int(self.run_dir / f"exit-{self.rank}")  # written just before it ended
            return code if code is not None else -int(signal.SIGKILL)
        return None

    def kill(self) -> None:
        """SIGKILL the rank."""
        pid = _read_int(self.run_dir / f"pid-{self.rank}")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the rank has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.rank}", timeout or 0.0)
            time.sleep(0.02)
        return code


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _die_with_parent(parent: int) -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(rank: int, world: int, job_path: str, parent: int) -> None:
    """Become rank `rank`: never returns."""
    code = 1
    try:
        _die_with_parent(parent)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world))
        from lynxpipe.runtime.pipeline.launch import worker_main

        code = worker_main([job_path])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown (seconds with torch) and no atexit of the zygote


def zygote_main(world: int, job_path: str, run_dir: Path) -> int:
    """Import the runtime, fork `world` ranks, reap them writing their exit codes."""
    try:
        import lynxpipe.runtime.train.worker  # noqa: F401  (the expensive import, once)
    except Exception as exc:  # noqa: BLE001 - torch missing or broken: the launcher says so
        from lynxpipe.runtime.pipeline.health import Health

        for rank in range(world):  # every rank died of it: the launcher names rank 0
            health = Health(rank, str(run_dir))
            health.failed(exc)
            health.close()
            _write(run_dir / f"exit-{rank}", "1")
        return 1

    me, children = os.getpid(), {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _child(rank, world, job_path, me)
        children[pid] = rank
        _write(run_dir / f"pid-{rank}", str(pid))
    while children:
        pid, status = os.wait()
        rank = children.pop(pid, None)
        if rank is not None:
            _write(run_dir / f"exit-{rank}", str(os.waitstatus_to_exitcode(status)))
    return 0
