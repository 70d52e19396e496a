"""What a rank tells its launcher: heartbeats, the error it died of, and test-only faults.

The launcher (`runtime.pipeline.launch`) gives each rank a run directory (`LYNXPIPE_RUN_DIR`). A rank
writes `hb-<rank>` (step and action index, rewritten in place before every action: one pwrite)
and, when it fails, `status-<rank>.json` naming the error and, when a p2p wait failed, the peer
it was waiting for. A rank that crashes hard (os._exit, a signal) writes nothing: its exit code
speaks. `LYNXPIPE_FAULT=RANK:STEP:exit|hang` makes rank RANK exit with code 3, or sleep
forever, halfway through step STEP (to test failure handling).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lynxpipe.errors import LynxError
from lynxpipe.schedule.actions import Action

RUN_DIR_ENV = "LYNXPIPE_RUN_DIR"
FAULT_ENV = "LYNXPIPE_FAULT"
FAULT_EXIT_CODE = 3
_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer",
               "broken pipe", "reset by")


@dataclass(frozen=True)
class Fault:
    """A failure to inject (tests)."""

    rank: int
    """Global rank that fails."""
    step: int
    """Step (0-based) in which it fails, halfway through its actions."""
    kind: str
    """exit (os._exit(3)) or hang (sleep forever)."""


def parse_fault(text: str) -> Fault | None:
    """`RANK:STEP:exit|hang` -> Fault; empty -> None."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() \
            or parts[2] not in ("exit", "hang"):
        raise LynxError(f"{FAULT_ENV}={text!r}: write RANK:STEP:exit or RANK:STEP:hang")
    return Fault(int(parts[0]), int(parts[1]), parts[2])


_SOURCE_REF = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*")
_GLOO_CHATTER = re.compile(r"\s*This is typically caused by.*$")


def short_error(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, without C++ source references and gloo's advice."""
    text = _SOURCE_REF.sub("", " ".join(str(exc).split()))
    text = _GLOO_CHATTER.sub("", text)
    return f"{type(exc).__name__}: {text}"[:limit]


def classify(exc: BaseException) -> str:
    """`peer` for a failed wait on a known peer, `comm` for other communication failures,
    `error` for anything else (a bug or bad input on this rank)."""
    if getattr(exc, "peer", None) is not None:
        return "peer"
    text = str(exc).lower()
    if isinstance(exc, (RuntimeError, OSError)) and any(w in text for w in _COMM_WORDS):
        return "comm"
    return "error"


class Health:
    """A rank's heartbeat file, status file and fault injection."""

    def __init__(self, rank: int, run_dir: str | None = None, fault: str | None = None) -> None:
        self.rank = rank
        run_dir = run_dir if run_dir is not None else os.environ.get(RUN_DIR_ENV, "")
        self.dir = Path(run_dir) if run_dir else None
        self.fault = parse_fault(fault if fault is not None else os.environ.get(FAULT_ENV, ""))
        self._fd = -1
        if self.dir is not None:
            self._fd = os.open(self.dir / f"hb-{rank}", os.O_WRONLY | os.O_CREAT, 0o644)

    def beat(self, step: int, index: int) -> None:
        """Record progress (step, action index)."""
        if self._fd >= 0:
            os.pwrite(self._fd, f"{step:09d} {index:09d}\n".encode(), 0)

    def hook(self, step: int, num_actions: int) -> Callable[[int, Action], None]:
        """The executor's per-action hook for `step`."""
        fail_at = -1
        if self.fault is not None and (self.fault.rank, self.fault.step) == (self.rank, step):
            fail_at = num_actions // 2

        def on_action(index: int, action: Action) -> None:
            self.beat(step, index)
            if index == fail_at:
                self._inject(action)
        return on_action

    def _inject(self, action: Action) -> None:
        assert self.fault is not None
        if self.fault.kind == "exit":
            os._exit(FAULT_EXIT_CODE)
        while True:  # hang: a rank stuck in compute, not in a wait
            time.sleep(3600)

    def failed(self, exc: BaseException) -> None:
        """Write status-<rank>.json describing why this rank is about to die."""
        if self.dir is None:
            return
        status = {"rank": self.rank, "kind": classify(exc),
                  "peer": getattr(exc, "peer", None),
                  "error": short_error(exc)}
        tmp = self.dir / f".status-{self.rank}.tmp"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.dir / f"status-{self.rank}.json")

    def close(self) -> None:
        """Close the heartbeat file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
