"""Training checkpoints: model, optimizer, data position and RNG states, written atomically.

Layout: `<dir>/step-00000002/rank-00001.pt` per rank (temp file + os.replace), then, once every
rank has written (a barrier), rank 0 points `<dir>/latest.json` at the step (also atomic). A
crash at any moment leaves `latest.json` naming a complete checkpoint. Older step directories
beyond the newest `KEEP` are pruned by rank 0. latest.json also records the seed, data and
learning rate of the run and the weights key (`preflight`), which the launcher checks against
a `--resume` before starting any rank.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lynxpipe.artifact import file_mode, write_json_atomic
from lynxpipe.errors import LynxError
from lynxpipe.runtime.model.stage import Stage
from lynxpipe.runtime.train.optim import AdamW
from lynxpipe.runtime.train.preflight import read_latest, step_dir

KEEP = 2
"""Checkpoints kept (the newest ones)."""


@dataclass(frozen=True)
class TrainState:
    """What a rank restores to continue exactly where it stopped."""

    step: int
    """Steps completed (the next step to run)."""
    data_position: int
    """Sequences consumed so far by all replicas (batches are a function of the step)."""
    losses: tuple[float, ...]
    """Global loss of every step completed so far."""


def _rank_file(root: Path, step: int, rank: int) -> Path:
    return step_dir(root, step) / f"rank-{rank:05d}.pt"


def _rng_state(chunks: Mapping[int, Stage]) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "chunks": {s: (c.rng.shared.get_state(), c.rng.local.get_state(), c.rng.key)
                       for s, c in chunks.items()}}


def _set_rng_state(chunks: Mapping[int, Stage], rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for s, (shared, local, key) in rng["chunks"].items():
        chunks[s].rng.shared.set_state(shared)
        chunks[s].rng.local.set_state(local)
        chunks[s].rng.key = tuple(key)


def save_rank(root: Path, rank: int, weights: str, state: TrainState,
              chunks: Mapping[int, Stage], optimizer: AdamW) -> Path:
    """Write this rank's part of the checkpoint after `state.step` steps (atomic); `weights`
    is the plan's `preflight.weights_key`."""
    path = _rank_file(root, state.step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"weights": weights, "rank": rank, "state": state.__dict__,
               "model": {s: c.state_dict() for s, c in chunks.items()},
               "optimizer": optimizer.state_dict(), "rng": _rng_state(chunks)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish(root: Path, meta: dict[str, object]) -> None:
    """Point latest.json at the checkpoint `meta` describes (`preflight.meta_json`; call on one
    rank once every rank has saved) and prune older ones."""
    step = int(meta["step"])  # type: ignore[call-overload]
    write_json_atomic(root / "latest.json", meta)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-KEEP]:
        if old != step_dir(root, step):
            shutil.rmtree(old, ignore_errors=True)


def load_rank(root: Path, rank: int, weights: str, chunks: Mapping[int, Stage],
              optimizer: AdamW) -> TrainState:
    """Restore this rank's model, optimizer and RNG states from the newest checkpoint."""
    step = read_latest(root).step
    path = _rank_file(root, step, rank)
    if not path.exists():
        raise LynxError(f"--resume: {path} is missing (checkpoint of another layout?)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("weights") != weights:
        raise LynxError(f"--resume: {path} holds weights of another model, layout or "
                        f"partition; resume with the specs it was trained with")
    for s, chunk in chunks.items():
        chunk.load_state_dict(payload["model"][s])
    optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(chunks, payload["rng"])
    state = payload["state"]
    return TrainState(state["step"], state["data_position"], tuple(state["losses"]))
