"""The bad inputs of issue 12, as files and command lines shared by `test_hardening` (each case
with the words its one-line error must contain) and `test_fuzz_cli` (its seed examples).

An argv names files by `@key`; `make_files` writes them under a directory and `resolve`
substitutes their paths. Plans are damaged copies of one small valid plan (gpt-tiny, tp 2,
pp 2, fp32, a budget under which lynx-heu recomputes in backward collectives); an edit to the
specs is re-fingerprinted, so the damage reaches the semantic checks rather than the hash.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from typer.testing import CliRunner

from lynxpipe.artifact import from_dict, to_dict
from lynxpipe.plan.types import plan_fingerprint
from lynxpipe.specs import ClusterSpec, ModelSpec, ParallelSpec, get_cluster, get_model

PLAN_SPECS = ("--model", "gpt-tiny", "--tp", "2", "--pp", "2", "--micro-batch-size", "2",
              "--num-microbatches", "4", "--seq-len", "64", "--dtype-bytes", "4",
              "--budget", "2MiB", "--time-limit", "5")
CLUSTER = to_dict(get_cluster("a100-pcie"))
GPT2 = {"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 512}


def refingerprint(data: dict[str, Any]) -> dict[str, Any]:
    """The plan's fingerprint recomputed from its (edited) specs, as a careful editor would."""
    model = from_dict(ModelSpec, data["model"])
    cluster = from_dict(ClusterSpec, data["cluster"])
    par = from_dict(ParallelSpec, data["parallel"])
    return {**data, "fingerprint": plan_fingerprint(model, cluster, par, data["budget_bytes"])}


def _edit_action(data: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    ranks = data["order"]["ranks"]
    ranks[0] = [new if a == old else a for a in ranks[0]]
    return data


def _set(key: str, value: Any, fingerprint: bool = False) -> Callable[[dict], dict]:
    def edit(data: dict[str, Any]) -> dict[str, Any]:
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[int(leaf) if isinstance(target, list) else leaf] = value
        return refingerprint(data) if fingerprint else data
    return edit


BIG_MODEL = {**to_dict(get_model("gpt-13b")), "dtype_bytes": 4}
PLAN_DAMAGE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "plan_missing_tensor": _set("layers.0.dropped", ["qkv_outx"]),
    "plan_string_dropped": _set("layers.0.dropped", "qkv_out"),
    "plan_pp4": _set("parallel.pp", 4, fingerprint=True),
    "plan_not_droppable": _set("layers.2.dropped", ["x"]),
    "plan_empty_stage": _set("partition", [4, 0]),
    "plan_bad_kind": lambda d: _edit_action(d, "F(mb0,s0)", "X(mb0,s0)"),
    "plan_mb99": lambda d: _edit_action(d, "F(mb0,s0)", "F(mb99,s0)"),
    "plan_13b": _set("model", BIG_MODEL, fingerprint=True),
    "plan_bad_window": lambda d: _edit_action(
        d, "R(mb0,L0,seg0,s0)@bwd_coll(mb0,s0,L0,2)", "R(mb0,L0,seg0,s0)@bwd_coll(mb0,s0,L0,3)"),
    "plan_over_budget": _set("budget_bytes", 1 << 20, fingerprint=True),
    "plan_other_model_name": _set("model.name", "gpt-tiny-edited", fingerprint=True),
}

PROFILE_DAMAGE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "profile_nan_time": _set("layer.op_ms.qkv.fwd_ms", float("nan")),
    "profile_missing_op": lambda d: {**d, "layer": {**d["layer"], "op_ms": {
        k: v for k, v in d["layer"]["op_ms"].items() if k != "qkv"}}},
    "profile_contention": _set("contention", 1.5),
}

CONFIGS: dict[str, Any] = {
    "hf_abc": {**GPT2, "attn_pdrop": "abc"},
    "hf_null_dropout": {**GPT2, "resid_pdrop": None},
    "hf_list": [GPT2],
    "hf_null": None,
    "hf_huge": {**GPT2, "n_layer": 10**12},
    "hf_100k": {**GPT2, "n_layer": 100_000},
    "hf_bool": {**GPT2, "n_head": True},
    "hf_huge_dropout": {**GPT2, "attn_pdrop": 10**400},
    "cluster_nan_flops": {**CLUSTER, "peak_flops_per_s": float("nan")},
    "cluster_inf_flops": {**CLUSTER, "peak_flops_per_s": float("inf")},
    "cluster_dpn": {**CLUSTER, "devices_per_node": 2.5},
    "cluster_nan_latency": {**CLUSTER, "intra_node_latency_us": float("nan")},
    "cluster_list": [CLUSTER],
}


def make_files(root: Path) -> dict[str, Path]:
    """Every file the cases name, written under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"dir": root / "a_directory", "binary": root / "binary.json",
             "plan": root / "plan.json", "out": root / "out", "profile": root / "profile.json"}
    files["dir"].mkdir(exist_ok=True)
    files["binary"].write_bytes(b"\xff\xfe\x00{not utf-8}")
    made = CliRunner().invoke(_app(), ["plan", *PLAN_SPECS, "--out", str(files["plan"])])
    assert made.exit_code == 0, made.output
    made = CliRunner().invoke(_app(), ["profile", *PLAN_SPECS[:-4], "--out",
                                       str(files["profile"])])
    assert made.exit_code == 0, made.output
    profile = json.loads(files["profile"].read_text())
    for name, edit in PROFILE_DAMAGE.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps({**profile, "data": edit(copy.deepcopy(
            profile["data"]))}))
    for name, payload in CONFIGS.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(payload))
    base = json.loads(files["plan"].read_text())
    for name, damage in PLAN_DAMAGE.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps({**base, "data": damage(copy.deepcopy(base["data"]))}))
    return files


def _app() -> Any:
    from lynxpipe.cli import app

    return app


def resolve(argv: tuple[str, ...], files: dict[str, Path]) -> list[str]:
    """`@key` tokens replaced by the paths of `files`."""
    return [str(files[a[1:]]) if a.startswith("@") and a[1:] in files else a for a in argv]


# (argv, words the one-line error must contain); every one must end in exit code 2
ERROR_CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # overflowing numbers
    (("simulate", "--budget", "1e400"), ("--budget", "too large")),
    (("simulate", "--budget", "1e400GiB"), ("too large",)),
    (("simulate", "--reserve", "1e400"), ("--reserve", "too large")),
    (("cluster", "up", "--burst", "1e400"), ("--burst", "too large")),
    (("simulate", "--budget", "nan"), ("--budget",)),
    # cluster files
    (("simulate", "--cluster", "@cluster_nan_flops"), ("peak_flops_per_s=nan", "must be a number in (0,")),
    (("simulate", "--cluster", "@cluster_inf_flops"), ("peak_flops_per_s=inf",)),
    (("simulate", "--cluster", "@cluster_dpn"), ("devices_per_node", "2.5")),
    (("simulate", "--cluster", "@cluster_nan_latency"), ("intra_node_latency_us=nan",)),
    (("simulate", "--cluster", "@cluster_list"), ("expected an object",)),
    (("simulate", "--cluster", "@binary"), ("not UTF-8",)),
    (("simulate", "--cluster", "@dir"), ("is a directory",)),
    # HF config.json
    (("simulate", "--model", "@binary"), ("not UTF-8",)),
    (("simulate", "--model", "@hf_abc"), ("attn_pdrop='abc'",)),
    (("simulate", "--model", "@hf_null_dropout"), ("resid_pdrop=None",)),
    (("simulate", "--model", "@hf_list"), ("JSON object", "list")),
    (("simulate", "--model", "@hf_null"), ("JSON object", "null")),
    (("simulate", "--model", "@hf_bool"), ("n_head=True",)),
    (("simulate", "--model", "@hf_huge_dropout"), ("attn_pdrop=1000", "must be a number in [0, 1)")),
    # sizes with no bound on time or memory
    (("simulate", "--model", "@hf_huge", "--tp", "1", "--pp", "1"), ("limit of 256 layers",)),
    (("compare", "--model", "@hf_100k", "--tp", "1", "--pp", "1"), ("limit of 256 layers",)),
    (("compare", "--num-microbatches", "100000"), ("limit of 1024",)),
    (("compare", "--num-microbatches", "10000"), ("limit of 1024",)),
    (("compare", "--num-microbatches", "1000"), ("48 x 1000", "32768")),
    # profiles
    (("simulate", "--profile", "@profile_nan_time"), ("fwd_ms=nan",)),
    (("simulate", "--profile", "@profile_missing_op"), ("op_ms", "missing qkv")),
    (("simulate", "--profile", "@profile_contention"), ("contention=1.5",)),
    # a directory or a wrong file as an artifact
    (("simulate", "--profile", "@dir"), ("is a directory",)),
    (("simulate", "--plan", "@dir"), ("is a directory",)),
    (("simulate", "--plan", "@binary"), ("not UTF-8",)),
    # hand-edited plans: simulate and train refuse the same way
    *[((verb, "--plan", f"@{name}"), words) for verb in ("simulate", "train")
      for name, words in (
          ("plan_missing_tensor", ("qkv_outx", "does not save")),
          ("plan_string_dropped", ("layers[0].dropped", "expected a list")),
          ("plan_pp4", ("partition",)),
          ("plan_not_droppable", ("'x'", "cannot be dropped")),
          ("plan_empty_stage", ("stage 1", "at least one")),
          ("plan_bad_kind", ("X(mb0,s0)", "not an action")),
          ("plan_mb99", ("F(mb99,s0)", "micro-batch outside 0..3")),
          ("plan_13b", ("4 layer policies", "40 layers")),
          ("plan_bad_window", ("never opens",)),
      )],
    (("train", "--plan", "@plan_over_budget"), ("does not fit its budget",)),
    # spec flags that contradict --plan (issue 10, section 3)
    (("simulate", "--plan", "@plan", "--model", "gpt-1.3b"), ("--model", "num_layers=24",
                                                              "num_layers=4")),
    (("compare", "--plan", "@plan", "--tp", "1"), ("--tp gives tp=1", "tp=2")),
    (("train", "--plan", "@plan", "--seq-len", "128"), ("--seq-len gives seq_len=128",
                                                        "seq_len=64")),
    (("simulate", "--plan", "@plan", "--budget", "3MiB"), ("budget 3.00 MiB",
                                                           "budget 2.00 MiB")),
    # train flags
    (("train", "--lr", "nan"), ("--lr=nan",)),
    (("train", "--lr", "-1"), ("--lr=-1",)),
    (("train", "--seed", "1" + "0" * 20), ("--seed=", "integer")),
    (("train", "--checkpoint-every", "-1", "--checkpoint-dir", "@out"),
     ("--checkpoint-every=-1",)),
    (("train", "--timeout", "inf"), ("--timeout=inf",)),
    (("train", "--model", "gpt-22b", "--tp", "4", "--pp", "4", "--budget", "28GiB",
      "--attention-dropout", "0"),
     ("22,062M parameters", "--force")),
    (("train", "--out", "/proc/no/run.json"), ("--out", "cannot write")),
    (("train", "--checkpoint-dir", "/proc/no-ck", "--checkpoint-every", "1"),
     ("--checkpoint-dir", "cannot write")),
    (("train", "--out", "@dir"), ("is a directory",)),
    # usage errors are one line too
    (("simulate", "--tp", "abc"), ("--tp",)),
    (("simulate", "--no-such-flag"), ("--no-such-flag",)),
    (("simulate", "--schedule"), ("--schedule",)),
]
