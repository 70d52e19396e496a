"""A plan applied to blocks lynxpipe has never seen (SPEC §11): trace -> profile -> plan ->
wrap_blocks(plan=...) -> 3 AdamW steps of a 2-stage pipeline driven in one process, with the
plan's RECV windows. Every policy: parameters bitwise equal to the unwrapped model (dropout on),
each planned task in its window, measured saved bytes per layer equal to the plan's, and every
recompute's FLOPs equal to those of the ops the graph says regenerate its tensors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from userblocks import MoEBlock, drive, replayed_ops  # noqa: E402

from lynxpipe import workflow  # noqa: E402
from lynxpipe.plan.options import option_for  # noqa: E402
from lynxpipe.profile.module import module_costs  # noqa: E402
from lynxpipe.profile.trace import BlockCall  # noqa: E402
from lynxpipe.runtime.engine import wrap_blocks  # noqa: E402
from lynxpipe.schedule.policy import stage_layers  # noqa: E402
from lynxpipe.specs import ModelSpec, ParallelSpec, get_cluster  # noqa: E402

H, LAYERS, SEQ, MB = 16, 4, 16, 2
MODEL = ModelSpec("moe-test", "gpt", LAYERS, H, 2, 2, 2 * H, 64, dtype_bytes=4)
PAR = ParallelSpec(pp=2, micro_batch_size=MB, num_microbatches=4, seq_len=SEQ)
POLICIES = ("none", "full", "full-block", "selective", "checkmate", "adapipe", "lynx-heu",
            "lynx-opt")


def _blocks(seed: int = 0) -> list[MoEBlock]:
    torch.manual_seed(seed)
    return [MoEBlock(H).train() for _ in range(LAYERS)]


def _source(batch: int, seq: int) -> BlockCall:
    return BlockCall(_blocks()[0], (torch.randn(batch, seq, H),), {})


@pytest.fixture(scope="module")
def costs():
    return module_costs(MODEL, get_cluster("a100-pcie"), PAR, _source, "tests:MoEBlock")


def _request(costs, budget: int):
    return workflow.PlanRequest(model=MODEL, cluster=get_cluster("a100-pcie"), parallel=PAR,
                                budget_bytes=budget, costs=costs, time_limit_s=5.0)


def _train(plan, wrap: bool, steps: int = 3):
    blocks = _blocks()
    params = [p for b in blocks for p in b.parameters()]
    stages = [torch.nn.Sequential(*(blocks[g] for g in rng))
              for rng in stage_layers(plan.partition)]
    engines, measured, tasks = None, {}, []
    if wrap:
        engines = []
        for rank in range(PAR.pp):
            layers = [g for s in range(rank, len(stages), PAR.pp)
                      for g in stage_layers(plan.partition)[s]]
            wrapped = wrap_blocks([blocks[g] for g in layers], plan=plan, pp_rank=rank)
            for g, w in zip(layers, wrapped):
                stage = next(s for s, rng in enumerate(stage_layers(plan.partition)) if g in rng)
                stages[stage][g - stage_layers(plan.partition)[stage][0]] = w
            engines.append(wrapped.engine)

    def after(mb: int, stage: int) -> None:
        layers = stage_layers(plan.partition)[stage]
        if engines is not None and mb == 0 and layers[0] not in measured:
            held = engines[plan.order.rank_of(stage)].meter.breakdown()
            measured.update({g: sum(held[(0, g)].values()) for g in layers})

    opt = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        batches = [torch.randn(MB, SEQ, H, generator=gen) for _ in range(PAR.num_microbatches)]
        drive(plan, stages, batches, engines, after)
        if engines is not None:
            for engine in engines:
                tasks += engine.end_step().tasks
        opt.step()
    return [p.detach().clone() for p in params], measured, tasks


def test_traced_moe_block_keeps_the_analytic_embedding_and_has_its_own_layer(costs):
    graph = costs.layer.graph
    names = {t.name for t in graph.tensors}
    assert costs.source == "traced" and costs.block == "tests:MoEBlock"
    # the router's probabilities, the top-k indices, the dense gates, each expert's tensors
    assert {"x", "_softmax", "topk:1", "scatter", "experts.3.1/gelu"} <= names
    assert graph.op("router/addmm").fwd_flops == 2 * MB * SEQ * H * 4
    assert graph.tensor("scatter").used_by == ("mul", "mul#1", "mul#2", "mul#3")
    assert not graph.tensor("x").droppable and graph.tensor("_softmax").droppable
    # regenerating a GeLU input re-runs only its expert's first linear
    fc = "experts.2.0/addmm"
    assert graph.recompute_ops(frozenset({fc}), 0) == (fc,)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_bitwise_and_counted(costs, policy):
    torch.set_num_threads(1)
    none = workflow.plan_policy("none", _request(costs, 1 << 40))
    budget = (max(none.predicted.peak_memory_bytes) * 3) // 4
    plan = workflow.plan_policy(policy, _request(costs, budget))
    ref, _, _ = _train(plan, wrap=False)
    got, measured, tasks = _train(plan, wrap=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), policy
    graph = costs.layer.graph
    assert measured == {g: option_for(costs.layer, p).kept_bytes
                        for g, p in enumerate(plan.layers)}, policy
    planned = sum(1 for r in plan.order.ranks for a in r if a.kind == "R")
    assert len(tasks) == 3 * planned, policy
    for t in tasks:
        assert t.window == t.planned, (policy, t)
        ops = replayed_ops(graph, plan.layers[t.layer], t.segment)
        assert t.flops == sum(graph.op(o).fwd_flops for o in ops) > 0, (policy, t)
    if policy not in ("none", "selective"):
        assert tasks and min(measured.values()) < graph.saved_bytes(), policy
    if policy == "lynx-heu":
        assert any(t.where == "recv" for t in tasks)
