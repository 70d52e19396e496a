"""What the reference runtime cannot run, as pure checks (no torch): the launcher refuses such a
plan before starting ranks, and the model builder refuses it again on the rank."""

from __future__ import annotations

from lynxpipe.errors import LynxError
from lynxpipe.specs.model import ModelSpec


def check_runnable(model: ModelSpec) -> None:
    """Raise a LynxError, with the fix, for a model the reference runtime does not run."""
    if model.attention == "fused" and model.attention_dropout > 0:
        # torch's CPU SDPA silently falls back to the math path with dropout and saves the
        # s x s tensors fused attention is meant to avoid (SPEC §10); the reference runtime
        # does not replay a fused kernel's internal dropout either
        raise LynxError(f"model {model.name}: fused attention with attention_dropout="
                        f"{model.attention_dropout} is not run by the reference runtime (SDPA "
                        f"would fall back to explicit attention); use --attention-dropout 0 "
                        f"(hidden dropout stays on) or --attention explicit")
