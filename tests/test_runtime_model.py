"""Runtime on one process (tp=1, CPU): the reference layers mirror the planner's graph, and every
recompute policy gives bitwise-identical losses and gradients with the planned counters."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from lynxpipe.errors import LynxError  # noqa: E402
from lynxpipe.runtime.engine.recompute import RecomputeEngine  # noqa: E402
from lynxpipe.runtime.engine.selfcheck import (  # noqa: E402
    check_step_order,
    self_check,
    standard_cases,
)
from lynxpipe.runtime.model.layer import BuildConfig  # noqa: E402
from lynxpipe.runtime.model.stage import Stage  # noqa: E402
from lynxpipe.runtime.model.tp import TPContext  # noqa: E402
from lynxpipe.schedule.actions import Window  # noqa: E402
from lynxpipe.specs.model import ModelSpec  # noqa: E402
from lynxpipe.specs.parallel import ParallelSpec  # noqa: E402

GPT = ModelSpec("tiny-gpt", "gpt", 3, 32, 4, 4, 64, 64, attention="explicit",
                attention_dropout=0.1, hidden_dropout=0.1)
LLAMA = ModelSpec("tiny-llama", "llama", 3, 32, 4, 2, 64, 64, attention="explicit",
                  attention_dropout=0.1, hidden_dropout=0.1)  # GQA: 2 q per kv
FUSED = dict(attention="fused", attention_dropout=0.0)  # hidden dropout stays on
PAR = ParallelSpec(tp=1, seq_len=8, micro_batch_size=2)


def _stage(model: ModelSpec = GPT) -> Stage:
    torch.set_num_threads(1)
    return Stage(BuildConfig(model, PAR, TPContext()), range(model.num_layers), embed=True,
                 head=True)


def _batches(n: int = 2) -> list:
    gen = torch.Generator().manual_seed(0)
    draw = lambda: torch.randint(0, 64, (2, 8), generator=gen)  # noqa: E731
    return [(draw(), draw()) for _ in range(n)]


@pytest.mark.parametrize("model", [GPT, LLAMA, replace(GPT, attention_dropout=0.0,
                                                        hidden_dropout=0.0),
                                   replace(LLAMA, attention_dropout=0.0, hidden_dropout=0.0,
                                           num_kv_heads=4),
                                   replace(GPT, **FUSED), replace(LLAMA, **FUSED)],
                         ids=["gpt", "llama-gqa", "gpt-nodropout", "llama-mha-nodropout",
                              "gpt-fused", "llama-gqa-fused"])
def test_policies_bitwise_counters_and_memory(model):
    # none / all on demand / selective / pinned to fwd, bwd and RECV windows / full with replay:
    # bitwise-equal losses and grads; each region recomputed once where planned; saved bytes per
    # layer = graph.saved_bytes(kept) + norm statistics (the one documented difference)
    stage = _stage(model)
    assert self_check(stage, _batches()) == []
    assert check_step_order(stage, _batches(1)[0]) == []


def test_pinned_case_uses_every_window_kind():
    stage = _stage()
    pinned = next(c for c in standard_cases(stage) if c.name == "pinned")
    kinds = {w.kind for w in pinned.tasks}
    assert kinds == {"fwd_coll", "bwd_coll", "recv"}


def test_runtime_op_names_are_the_graph_ops():
    for model in (GPT, LLAMA):
        for layer in _stage(model).layers:
            assert layer.op_names == tuple(op.name for op in layer.graph.ops)


def _forward(stage: Stage, engine: RecomputeEngine, mb: int = 0):
    ids, targets = _batches(1)[0]
    with engine.forward(mb, 0):
        return stage(ids, targets, engine)


def test_policy_errors_are_clear():
    stage = _stage()
    with pytest.raises(LynxError, match="cannot drop \\['h1'\\]"):
        _forward(stage, RecomputeEngine({0: {"h1"}}))
    with pytest.raises(LynxError, match="both fully recomputed and selectively dropped"):
        RecomputeEngine({0: {"probs"}}, full_layers=[0])
    with pytest.raises(LynxError, match="inside `with engine.forward"):
        stage(*_batches(1)[0], RecomputeEngine())
    early = RecomputeEngine({0: {"probs"}}, {Window("fwd_coll", 0, 0, 0, 1): [(0, 1, 0)]})
    with pytest.raises(LynxError, match="has not finished"):
        _forward(stage, early)


def test_forward_twice_before_backward_is_refused():
    stage, engine = _stage(), RecomputeEngine({1: {"probs"}})
    _forward(stage, engine)
    with pytest.raises(LynxError, match="ran again before its backward"):
        _forward(stage, engine)
    with pytest.raises(LynxError, match="still hold dropped tensors"):
        engine.end_step()


def test_build_config_checks_layout():
    with pytest.raises(LynxError, match="does not match the TP group"):
        BuildConfig(GPT, ParallelSpec(tp=2, seq_len=8), TPContext())
    with pytest.raises(LynxError, match="needs a process group"):
        TPContext(size=2)
