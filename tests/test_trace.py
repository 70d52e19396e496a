"""Tracing blocks into layer graphs (SPEC §11): lynxpipe's reference layers give the analytic
graph's saved bytes exactly (both families, both attention variants, fitted to an untraced
length too); blocks that cannot be replayed are refused with the cause; the CLI traces a block
from a file and exports a plan made from it, and torch selective checkpointing of that export
trains the reference layers bit for bit with the bytes the export predicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from typer.testing import CliRunner  # noqa: E402
from userblocks import AliveMeter  # noqa: E402

from lynxpipe.cli import app  # noqa: E402
from lynxpipe.cost.layers import layer_graph  # noqa: E402
from lynxpipe.errors import LynxError  # noqa: E402
from lynxpipe.integrations import torch_sac  # noqa: E402
from lynxpipe.integrations.torch_export import load_torch_export  # noqa: E402
from lynxpipe.profile.module import block_graph  # noqa: E402
from lynxpipe.profile.reference import reference_source  # noqa: E402
from lynxpipe.profile.trace import BlockCall, trace_call  # noqa: E402
from lynxpipe.runtime.engine import RecomputeEngine, wrap_blocks  # noqa: E402
from lynxpipe.specs import MODEL_PRESETS, ParallelSpec  # noqa: E402

HERE = Path(__file__).parent
runner = CliRunner()


@pytest.mark.parametrize("family", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_reference_layer_traces_to_the_analytic_saved_bytes(family, attention):
    model = dataclasses.replace(MODEL_PRESETS[family], attention=attention, dtype_bytes=4,
                                attention_dropout=0.1 if attention == "explicit" else 0.0)
    par = ParallelSpec(micro_batch_size=2, seq_len=40)
    source = reference_source(model, par)
    traced = trace_call(source(2, 40))
    assert traced.saved_bytes() == layer_graph(model, par).saved_bytes()
    fitted = block_graph(source, 2, 80)  # 80 is never traced: extrapolated from 16, 32, 48
    assert fitted.saved_bytes() == layer_graph(model, dataclasses.replace(
        par, seq_len=80)).saved_bytes()
    assert not fitted.tensor("x").droppable
    assert bool(fitted.attention_core()) == (attention == "explicit")


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y.relu() if y.sum() > 0 else y.tanh()  # control flow on a value


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.sigmoid(self.lin(x))  # sigmoid saves its output ...
        z = y * 2
        y.mul_(3)  # ... which this overwrites
        return z


def _run(block, dropped=frozenset({"lin/addmm"}), **kwargs):
    engine = RecomputeEngine({0: dropped})
    wrapped = wrap_blocks([block], engine)
    with engine.forward(0):
        wrapped[0](torch.randn(2, 4, 8, requires_grad=True), **kwargs)


def test_blocks_that_cannot_be_replayed_are_refused_with_the_cause():
    with pytest.raises(LynxError, match="data-dependent control flow"):
        trace_call(BlockCall(_Branchy(), (torch.randn(2, 4, 8),), {}))
    with pytest.raises(LynxError, match="data-dependent control flow"):
        _run(_Branchy())
    with pytest.raises(LynxError, match="in-place op mul_ writes `sigmoid`, which autograd saved"):
        trace_call(BlockCall(_InPlace(), (torch.randn(2, 4, 8),), {}))
    with pytest.raises(LynxError, match="in-place op mul_ writes `sigmoid`"):
        _run(_InPlace())
    with pytest.raises(LynxError, match="use_cache=False"):
        _run(nn.Linear(8, 8), use_cache=True)
    with pytest.raises(LynxError, match="does not save .* re-run `lynxpipe profile --module`"):
        _run(nn.Linear(8, 8), dropped=frozenset({"fc1_out"}))


def _cli(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_cli_traces_a_block_from_a_file_plans_it_and_exports(tmp_path):
    spec = ["--model", "gpt-tiny", "--tp", "1", "--pp", "1", "--seq-len", "32",
            "--micro-batch-size", "2", "--num-microbatches", "2"]
    profile = tmp_path / "profile.json"
    out = _cli("profile", "--module", f"{HERE / 'userblocks.py'}:moe_source", *spec,
               "--out", str(profile), "--json")
    shown = json.loads(out.stdout)
    assert shown["saved_bytes"] == sum(t["bytes"] for t in shown["tensors"])
    assert {"x", "_softmax", "scatter"} <= {t["name"] for t in shown["tensors"]}
    plan = tmp_path / "plan.json"
    _cli("plan", *spec, "--profile", str(profile), "--budget", "7.5MiB", "--policy", "checkmate",
         "--out", str(plan))
    flat = json.loads(_cli("export", "--plan", str(plan), "--profile", str(profile), "--to",
                           "json", "--out", str(tmp_path / "flat.json")) and
                      (tmp_path / "flat.json").read_text())
    assert {t["name"] for t in flat["tensors"]} == set(flat["layers"][0]["keep"]) | set(
        flat["layers"][0]["drop"])
    bad = runner.invoke(app, ["export", "--plan", str(plan), "--to", "torch"])
    assert bad.exit_code == 2 and "--profile" in bad.stderr


def test_torch_selective_checkpointing_of_the_reference_layers(tmp_path):
    """--module reference -> plan -> export --to torch -> torch_sac.wrap: 3 AdamW steps bitwise
    equal to no checkpointing (hidden dropout on), each layer holding the bytes predicted."""
    torch.set_num_threads(1)
    model = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], attention="explicit",
                                attention_dropout=0.1, dtype_bytes=4)
    spec = ["--model", "gpt-tiny", "--attention", "explicit", "--attention-dropout", "0.1",
            "--tp", "1", "--pp", "1", "--seq-len", "32", "--micro-batch-size", "2",
            "--num-microbatches", "1"]
    profile, plan, sac = (tmp_path / n for n in ("profile.json", "plan.json", "sac.json"))
    _cli("profile", "--module", "reference", *spec, "--out", str(profile))
    _cli("plan", *spec, "--profile", str(profile), "--budget", "5MiB", "--policy", "lynx-heu",
         "--out", str(plan))
    _cli("export", "--plan", str(plan), "--profile", str(profile), "--to", "torch", "--out",
         str(sac))
    export = load_torch_export(sac)
    assert {s.mode for s in export.layers} & {"selective", "full"}
    source = reference_source(model, ParallelSpec(micro_batch_size=2, seq_len=32))

    def train(wrap: bool):
        layers = [source(2, 32).block for _ in range(model.num_layers)]
        for i, layer in enumerate(layers):  # distinct weights per layer, same in both runs
            layer.index = i
        stack = torch_sac.wrap(export, layers) if wrap else nn.ModuleList(layers)
        meter = AliveMeter(list(stack))
        opt = torch.optim.AdamW(stack.parameters(), lr=1e-2)
        held = None
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            h = torch.randn(32, 2, model.hidden_size, generator=torch.Generator().manual_seed(step))
            with meter:
                for block in stack:
                    h = block(h)
            held = held or [meter.held(i) for i in range(len(stack))]
            h.square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in stack.parameters()], held

    ref, _ = train(False)
    got, held = train(True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert held == [s.saved_bytes for s in export.layers]


class _ReduceTP(torch.autograd.Function):
    """Megatron's reduce-from-tensor-parallel-region: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        torch.distributed.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = x + self.drop(_ReduceTP.apply(self.fc2(torch.nn.functional.gelu(self.fc1(
            self.ln1(x))))))
        return h + self.down(torch.tanh(self.up(self.ln2(h))))


class _Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "c10d"
        return func(*args, **(kwargs or {}))


@pytest.fixture
def world(tmp_path):
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_collective_splits_the_block_and_is_never_replayed(world):
    torch.manual_seed(0)
    block = _TPBlock().train()
    graph = trace_call(BlockCall(block, (torch.randn(2, 4, 8),), {}))
    (coll,) = graph.collectives
    assert coll.kind == "all_reduce" and coll.size_bytes == 2 * 4 * 8 * 4
    assert graph.num_segments == 2 and [s.kind for s in graph.fwd_steps] == [
        "compute", "coll", "compute"]
    seg = {t.name: t.segment for t in graph.tensors}
    assert seg["fc1/addmm"] == 0 and seg["tanh"] == 1
    # the residual after the all-reduce cannot be regenerated without re-issuing it
    assert not graph.tensor("add").droppable and graph.tensor("tanh").droppable
    dropped = frozenset(t.name for t in graph.droppable())

    def step(engine):
        torch.manual_seed(3)
        x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        wrapped = wrap_blocks([block], engine)
        with engine.forward(0):
            out = wrapped[0](x)
        counter = _Collectives()
        with engine.backward(0), counter:
            out.square().sum().backward()
        grads = [p.grad.clone() for p in block.parameters()] + [x.grad]
        block.zero_grad(set_to_none=True)
        return grads, counter.count, engine.end_step()

    ref, _, _ = step(RecomputeEngine())
    got, replays, stats = step(RecomputeEngine({0: dropped}))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert replays == 0 and sorted(t.segment for t in stats.tasks) == [0, 1]
