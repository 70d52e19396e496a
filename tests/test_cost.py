"""Cost model: Korthikanti saved bytes, Narayanan FLOPs, collectives and programs."""

from dataclasses import replace

import pytest

from lynxpipe.cost.flops import narayanan_flops, step_flops
from lynxpipe.cost.graph import Collective
from lynxpipe.cost.layers import layer_graph
from lynxpipe.cost.table import (
    analytic_costs,
    collective_ms,
    load_profile,
    save_profile,
)
from lynxpipe.plan.simple import SELECTIVE_TENSORS
from lynxpipe.specs import ParallelSpec, get_cluster, get_model

CASES = [("gpt-1.3b", 1, 2048, 1), ("gpt-13b", 4, 2048, 2), ("gpt-22b", 8, 2048, 1),
         ("gpt-2.7b", 2, 1024, 4)]


def _korthikanti(model, t, s, b, sp):
    h, a = model.hidden_size, model.num_heads
    sbh = s * b * h
    if sp:
        return sbh / t * 34, 5 * a * s * s * b / t
    return sbh * (10 + 24 / t), 5 * a * s * s * b / t


@pytest.mark.parametrize("name,t,s,b", CASES)
@pytest.mark.parametrize("sp", [False, True])
def test_saved_bytes_match_korthikanti(name, t, s, b, sp):
    if sp and t == 1:
        pytest.skip("SP needs tp > 1")
    model = replace(get_model(name), attention="explicit")
    graph = layer_graph(model, ParallelSpec(tp=t, seq_len=s, micro_batch_size=b,
                                            sequence_parallel=sp))
    linear, attention = _korthikanti(model, t, s, b, sp)
    # norm statistics (fp32 mean and 1/std per token) are held too; Korthikanti omits them
    stats = sum(x.size_bytes for x in graph.tensors if x.name.endswith("_stats"))
    assert stats == 2 * 8 * s * b // (t if sp else 1)
    assert graph.saved_bytes() - stats == pytest.approx(linear + attention, rel=1e-12)
    # selective recomputation removes exactly the 5as^2b/t term
    kept = frozenset(t.name for t in graph.droppable()) - SELECTIVE_TENSORS
    assert graph.saved_bytes(kept) - stats == pytest.approx(linear, rel=1e-12)
    # full recomputation keeps only the layer input: 2sbh (2sbh/t with SP)
    x = graph.tensor("x").size_bytes
    assert x == 2 * s * b * model.hidden_size // (t if sp else 1)


@pytest.mark.parametrize("name,t,s,b", CASES)
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_fused_saved_bytes_formula(name, t, s, b, sp, attention_dropout):
    """Fused attention (SPEC §10): sbh(10 + 24/t + 4a/(ht)) without SP, (sbh/t)(34 + 4a/h) with
    SP, + 16 bytes of RNG seed/offset with attention dropout: no s x s tensor at all."""
    if sp and t == 1:
        pytest.skip("SP needs tp > 1")
    model = replace(get_model(name), attention="fused", attention_dropout=attention_dropout)
    graph = layer_graph(model, ParallelSpec(tp=t, seq_len=s, micro_batch_size=b,
                                            sequence_parallel=sp))
    h, a = model.hidden_size, model.num_heads
    sbh = s * b * h
    want = sbh / t * (34 + 4 * a / h) if sp else sbh * (10 + 24 / t + 4 * a / (h * t))
    want += 16 if attention_dropout else 0
    stats = sum(x.size_bytes for x in graph.tensors if x.name.endswith("_stats"))
    assert graph.saved_bytes() - stats == pytest.approx(want, rel=1e-12)
    assert {"probs", "probs_dropped"}.isdisjoint(x.name for x in graph.tensors)
    # Megatron selective has nothing left to drop; the fused kernel's own outputs regenerate
    # together from q, k, v at the attention forward's cost
    assert not SELECTIVE_TENSORS & {x.name for x in graph.droppable()}
    costs = analytic_costs(model, get_cluster("a100-pcie"), ParallelSpec(tp=t, seq_len=s))
    attn = costs.layer.op_ms["attn"]
    assert costs.layer.recompute_ms(frozenset({"attn_lse"}), 0) == attn.fwd_ms
    assert costs.layer.graph.op("attn").dgrad_flops == 2.5 * costs.layer.graph.op("attn").fwd_flops


def test_fused_gqa_saves_the_regrouped_query():
    model = get_model("llama-tiny")  # 4 heads, 2 kv heads
    graph = layer_graph(model, ParallelSpec(seq_len=64))
    q = graph.tensor("attn_q")
    assert q.droppable and q.size_bytes == 2 * 64 * model.hidden_size
    assert graph.tensor("attn_lse").size_bytes == 4 * 64 * model.num_heads


def test_sp_makes_tensors_behind_gathers_undroppable():
    graph = layer_graph(replace(get_model("gpt-13b"), attention="explicit"),
                        ParallelSpec(tp=4, sequence_parallel=True))
    assert not graph.tensor("qkv_out").droppable and not graph.tensor("fc1_out").droppable
    assert graph.tensor("probs").droppable


@pytest.mark.parametrize("name,t,s,b", CASES)
def test_step_flops_match_narayanan(name, t, s, b):
    model, cluster = get_model(name), get_cluster("a100-nvlink")
    par = ParallelSpec(tp=t, pp=2, dp=2, seq_len=s, micro_batch_size=b, num_microbatches=4)
    ours = step_flops(analytic_costs(model, cluster, par), model, par)
    assert ours == pytest.approx(narayanan_flops(model, par), rel=0.01)


def test_ring_collective_model():
    coll = Collective("c", "all_reduce", 8 * 10**9)
    # 2(t-1)/t of the bytes at 1 GB/s, plus 2(t-1) latencies
    assert collective_ms(coll, 4, 1e9, 10.0) == pytest.approx(1e3 * (6 * 10e-6 + 1.5 * 8))
    assert collective_ms(Collective("g", "all_gather", 4 * 10**9), 4, 1e9, 0) == 3000.0
    assert collective_ms(coll, 1, 1e9, 10.0) == 0.0


def test_tp1_has_free_collectives_and_backward_is_twice_forward():
    costs = analytic_costs(get_model("gpt-1.3b"), get_cluster("a100-nvlink"), ParallelSpec())
    assert all(ms == 0.0 for ms in costs.layer.coll_ms.values())
    assert costs.layer.bwd_ms() == pytest.approx(2 * costs.layer.fwd_ms(), rel=0.1)


def test_recompute_cost_follows_dependencies():
    model = replace(get_model("gpt-13b"), attention="explicit")
    costs = analytic_costs(model, get_cluster("a100-pcie"), ParallelSpec(tp=4))
    layer = costs.layer
    sel = layer.recompute_ms(SELECTIVE_TENSORS, 0)
    assert sel == pytest.approx(layer.op_ms["scores"].fwd_ms + layer.op_ms["attn_dropout"].fwd_ms)
    assert layer.recompute_ms(frozenset({"gelu_out"}), 1) == layer.op_ms["gelu"].fwd_ms


def test_profile_round_trip(tmp_path):
    costs = analytic_costs(get_model("llama-7b"), get_cluster("h100-nvlink"),
                           ParallelSpec(tp=2, sequence_parallel=True))
    assert load_profile(save_profile(tmp_path / "profile.json", costs)) == costs
