"""One rank's ops timed again, without communication: what `profile --measure` times on the
compute side, for a later moment than the profile (a CPU's speed drifts over minutes, so a
benchmark that checks the simulator times its ops in the same minutes as its runs and re-times
the profile with `profile.assemble.retime`).

    python -m lynxpipe.profile.ops_only JOB.json RANK OUT.json

JOB.json is a `ProfileJob` (`profile.run.make_job`); RANK picks this rank's TP shard; OUT.json
gets the `OpSamples`. Runs in its own process: the TP group it times with is a fake one (real
shard widths, free collectives) and must be the process's default group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lynxpipe.artifact import to_dict, write_json_atomic
from lynxpipe.errors import LynxError
from lynxpipe.profile.comm import job_main, op_context
from lynxpipe.profile.measure import time_ops
from lynxpipe.profile.samples import OpSamples, ProfileJob
from lynxpipe.runtime.model.layer import BuildConfig


def _quiet(what: str, done: int, total: int) -> None:
    """No progress display: the caller is timing something else around this process."""


def time_rank_ops(job: ProfileJob, rank: int) -> OpSamples:
    """This rank's layer, embedding, head and optimizer, timed on one CPU thread."""
    if job.device != "cpu":
        raise LynxError(f"ops_only times CPU ranks (job device {job.device!r})")
    torch.set_num_threads(1)  # one rank per core, as the runtime runs
    tp = op_context(job, rank)
    try:
        cfg = BuildConfig(job.model, job.par, tp, getattr(torch, job.dtype), "cpu", job.seed)
        return time_ops(cfg, job, _quiet)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _write(job: ProfileJob, rest: list[str]) -> None:
    if not rest[0].isdigit():
        raise LynxError(f"RANK {rest[0]!r} must be a rank number")
    write_json_atomic(Path(rest[1]), to_dict(time_rank_ops(job, int(rest[0]))))


def main(argv: list[str]) -> int:
    """Entry point: `python -m lynxpipe.profile.ops_only JOB RANK OUT`."""
    return job_main(argv, _write, "lynxpipe.profile.ops_only JOB RANK OUT")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
