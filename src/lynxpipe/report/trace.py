"""Chrome trace JSON (chrome://tracing, ui.perfetto.dev) of a simulated step.

One process per pipeline rank, one thread per stream; 'X' complete events in microseconds and
'C' counter events for the memory timeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lynxpipe.errors import LynxError
from lynxpipe.sim.result import SimResult

STREAMS: dict[str, int] = {"compute": 0, "comm": 1}
"""Thread ids: trace viewers want integer tids, the names come as metadata."""

CATEGORIES: tuple[str, ...] = ("forward", "backward", "tp_comm", "p2p", "recompute_hidden",
                               "recompute_exposed", "idle", "tail")

GIB = 2**30


def _metadata(num_ranks: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for rank in range(num_ranks):
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"pipeline rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank,
                       "args": {"sort_index": rank}})
        for stream, tid in STREAMS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": stream}})
    return events


def _memory_counters(sim: SimResult) -> list[dict[str, Any]]:
    """Activation and static memory per rank; viewers stack the two into the device total."""
    events: list[dict[str, Any]] = []
    for rank, timeline in enumerate(sim.memory_timeline):
        static = sim.ranks[rank].static_bytes / GIB if rank < len(sim.ranks) else 0.0
        points = {0.0: 0}
        for t_ms, nbytes in timeline:
            points[t_ms] = nbytes  # several changes at one instant: the last one stands
        for t_ms, nbytes in sorted(points.items()):
            events.append({"name": "memory (GiB)", "ph": "C", "pid": rank, "ts": t_ms * 1e3,
                           "args": {"static": round(static, 4),
                                    "activations": round(nbytes / GIB, 4)}})
    return events


def chrome_trace(sim: SimResult) -> dict[str, Any]:
    """The trace as a JSON-ready dict (`{"traceEvents": [...], ...}`)."""
    events = _metadata(len(sim.ranks))
    for ev in sim.events:
        events.append({"name": ev.name, "cat": ev.cat, "ph": "X", "pid": ev.rank,
                       "tid": STREAMS.get(ev.stream, len(STREAMS)),
                       "ts": ev.start_ms * 1e3, "dur": ev.dur_ms * 1e3})
    events += _memory_counters(sim)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "lynxpipe", "step_time_ms": sim.step_time_ms}}


def write_trace(path: str | Path, sim: SimResult) -> Path:
    """Write the Chrome trace of `sim` to `path` (JSON)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(chrome_trace(sim), separators=(",", ":")))
    except OSError as exc:
        raise LynxError(f"cannot write trace {path}: {exc.strerror or exc}") from None
    return path
