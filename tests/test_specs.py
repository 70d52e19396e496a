"""Spec validation: presets, HF configs, budgets and clear errors for bad input."""

import json
import re

import pytest

from lynxpipe.artifact import from_dict, to_dict
from lynxpipe.errors import LynxError
from lynxpipe.specs import (
    CLUSTER_PRESETS,
    MODEL_PRESETS,
    ClusterSpec,
    ModelSpec,
    ParallelSpec,
    get_cluster,
    get_model,
    load_hf_config,
    validate_layout,
)
from lynxpipe.units import parse_bytes


def test_presets_round_trip_json():
    for spec in list(MODEL_PRESETS.values()) + list(CLUSTER_PRESETS.values()):
        data = json.loads(json.dumps(to_dict(spec)))
        assert from_dict(type(spec), data) == spec


def test_gpt22b_matches_korthikanti():
    m = get_model("gpt-22b")
    assert (m.num_layers, m.hidden_size, m.num_heads) == (48, 6144, 64)
    assert 21.5e9 < m.total_params() < 22.5e9


def test_llama7b_param_count():
    assert 6.6e9 < get_model("llama-7b").total_params() < 6.8e9


def test_hf_gpt2_and_llama_configs(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                "n_head": 12, "vocab_size": 50257, "n_inner": None}))
    m = load_hf_config(gpt2)
    assert (m.family, m.num_layers, m.ffn_hidden_size) == ("gpt", 12, 3072)
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4,
                                 "hidden_size": 256, "num_attention_heads": 8,
                                 "num_key_value_heads": 2, "intermediate_size": 688,
                                 "vocab_size": 1000}))
    m = get_model(str(llama))
    assert (m.family, m.num_kv_heads, m.attention_dropout) == ("llama", 2, 0.0)
    assert m.attention == "fused"  # no attention implementation named: transformers' sdpa


@pytest.mark.parametrize("text,expected", [("40GiB", 40 * 2**30), ("1.5e9", 1_500_000_000),
                                           ("512MB", 512 * 10**6), (1024, 1024)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["40XB", "-5GiB", "lots", "0"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(LynxError, match="budget"):
        parse_bytes(bad)


def test_unknown_key_is_named():
    with pytest.raises(LynxError, match="unknown key.*tensor_par"):
        from_dict(ParallelSpec, {"tp": 2, "tensor_par": 4})


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, "tp=3 does not divide num_heads=64"),
    ({"pp": 64}, "larger than num_layers=48"),
    ({"tp": 16}, "exceeds devices_per_node"),
])
def test_layout_errors(kwargs, match):
    with pytest.raises(LynxError, match=match):
        validate_layout(get_model("gpt-22b"), get_cluster("a100-nvlink"), ParallelSpec(**kwargs))


def test_device_count_mismatch():
    with pytest.raises(LynxError, match="devices=16 does not match tp\\*pp\\*dp"):
        validate_layout(get_model("gpt-22b"), get_cluster("a100-nvlink"),
                        ParallelSpec(tp=8, pp=4), devices=16)


@pytest.mark.parametrize("kwargs,match", [
    ({"micro_batch_size": -1}, "micro_batch_size=-1 must be a positive integer"),
    ({"schedule": "zigzag"}, "schedule='zigzag'"),
    ({"schedule": "interleaved", "pp": 4, "virtual_stages": 2, "num_microbatches": 6},
     "multiple of pp=4"),
    ({"sequence_parallel": True}, "sequence_parallel needs tp > 1"),
])
def test_parallel_errors(kwargs, match):
    with pytest.raises(LynxError, match=match):
        ParallelSpec(**kwargs)


def test_model_and_cluster_errors():
    with pytest.raises(LynxError, match="hidden_size=100 is not divisible by num_heads=3"):
        ModelSpec("m", "gpt", 2, 100, 3, 3, 400, 10)
    with pytest.raises(LynxError, match="unknown model 'gpt-9000'"):
        get_model("gpt-9000")
    with pytest.raises(LynxError, match="compute_efficiency"):
        from_dict(ClusterSpec, {**to_dict(get_cluster("a100-pcie")), "compute_efficiency": 2.0})


@pytest.mark.parametrize("impl,attention", [("sdpa", "fused"), ("flash_attention_2", "fused"),
                                            ("eager", "explicit"), (None, "fused")])
def test_hf_attention_implementation_and_dropouts(tmp_path, impl, attention):
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512,
           "attn_pdrop": 0.0, "resid_pdrop": 0.2}
    if impl is not None:
        cfg["_attn_implementation"] = impl
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_hf_config(path)
    assert (m.attention, m.attention_dropout, m.hidden_dropout) == (attention, 0.0, 0.2)


@pytest.mark.parametrize("cfg,needle", [
    ({"attn_pdrop": "abc"}, "attn_pdrop='abc' must be a number"),
    ({"resid_pdrop": None}, "resid_pdrop=None must be a number"),
    ({"n_layer": 2.5}, "n_layer=2.5 must be a positive integer"),
    ({"_attn_implementation": "magic"}, "attention implementation 'magic'"),
])
def test_hf_bad_fields_are_clear_errors(tmp_path, cfg, needle):
    base = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **cfg}))
    with pytest.raises(LynxError, match=re.escape(needle)):
        load_hf_config(path)
