"""The janitor: a detached process that tears a cluster down when its owner dies.

SIGKILL cannot be caught, so the owner cannot clean up after it; the janitor, started by
`netns.up(..., owner=pid)` in its own session (terminal signals miss it), waits on the owner's
pidfd and then tears the cluster down, unless the state file names another owner by then.
The owner stops it on a normal teardown.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

MARK = "lynxpipe-testbed-janitor"
"""In every janitor's argv, so a recycled pid is never killed by mistake."""
_RUNNING: dict[int, subprocess.Popen[bytes]] = {}  # ours, to reap after stopping them


def start(cluster_id: int, owner: int) -> int:
    """Start the janitor of `cluster_id` watching `owner`; return its pid."""
    code = "import sys; from lynxpipe.testbed.janitor import main; main(sys.argv)"
    proc = subprocess.Popen([sys.executable, "-c", code, MARK, str(cluster_id), str(owner)],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _RUNNING[cluster_id] = proc
    return proc.pid


def stop(pid: int | None, cluster_id: int) -> None:
    """Stop the janitor `pid` of `cluster_id` (not ourselves: the janitor tears down too)."""
    if not pid or pid == os.getpid():
        return
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if MARK.encode() in argv and str(cluster_id).encode() in argv:
            os.kill(pid, signal.SIGTERM)
    if (proc := _RUNNING.pop(cluster_id, None)) is not None:
        proc.wait()


def wait_for_exit(pid: int) -> None:
    """Block until `pid` has exited (a zombie counts as exited)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel): poll
        while _running(pid):
            time.sleep(0.2)
        return
    select.select([fd], [], [])
    os.close(fd)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def main(argv: Sequence[str]) -> None:
    """Entry point of the janitor process: argv ends with cluster id and owner pid."""
    from lynxpipe.testbed import (
        netns,  # here, not at the top: netns imports this module
    )

    cluster_id, owner = int(argv[-2]), int(argv[-1])
    wait_for_exit(owner)
    netns.down_if_owned(cluster_id, owner)
