"""`lynxpipe profile --measure`: measured profiles that plan/simulate/compare accept.

The synthetic tests feed made-up timings through the assembly (no launch); the real ones
profile gpt-tiny at tp=1 (in process) and tp=2 (two launched ranks, one launch).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from lynxpipe.artifact import fingerprint, to_dict
from lynxpipe.cli import app
from lynxpipe.cost.fit import fit_alpha_beta
from lynxpipe.cost.table import analytic_costs, load_profile
from lynxpipe.plan.types import load_plan
from lynxpipe.profile.assemble import assemble, median_ops, retime
from lynxpipe.profile.measure import pieces
from lynxpipe.profile.run import geometric_sizes, make_job
from lynxpipe.profile.samples import (
    CommSamples,
    KindTimes,
    Measurement,
    OpSamples,
    Series,
)
from lynxpipe.specs import ParallelSpec, get_cluster, get_model
from lynxpipe.workflow import model_for_profile

runner = CliRunner()
TINY = ["--model", "gpt-tiny", "--pp", "1", "--seq-len", "64", "--micro-batch-size", "1",
        "--cluster", "a100-pcie", "--device", "cpu"]


def _profile(*args: str):
    return runner.invoke(app, ["profile", *args])


def _specs(tp: int):
    model = replace(get_model("gpt-tiny"), dtype_bytes=4)
    par = ParallelSpec(tp=tp, pp=1, seq_len=64, micro_batch_size=1)
    return model, par, analytic_costs(model, get_cluster("a100-pcie"), par)


# -- the assembly, on synthetic timings ----------------------------------------------------

def _series(alpha_ms: float, gb_per_s: float) -> Series:
    sizes = (1024, 16384, 262144, 1 << 20)
    return Series(sizes, tuple(alpha_ms + s / (gb_per_s * 1e6) for s in sizes))


def _synthetic(base) -> Measurement:
    layer_ops = [op.name for op in base.layer.graph.ops]
    layer = KindTimes({n: 1.0 for n in layer_ops}, {n: 0.5 for n in layer_ops},
                      3.0 * len(layer_ops))
    embed = KindTimes({"lookup": 0.2, "embed_dropout": 0.1}, {"lookup+embed_dropout": 0.6}, 0.6)
    head = KindTimes({"final_ln": 0.1, "logits+ce_max": 2.0, "ce_sum": 0.3, "ce_loss": 0.2},
                     {"final_ln+logits+ce_max+ce_sum+ce_loss": 4.0}, 4.0)
    comm = CommSamples({"all_reduce": _series(0.5, 1.0), "all_gather": _series(0.3, 2.0),
                        "reduce_scatter": _series(0.3, 2.0)},
                       _series(0.2, 4.0), 0.7, 6.0, 1 << 22, "gloo", 1.5)
    return Measurement(OpSamples(layer, embed, head, 2e-6), comm, "cpu", 2)


def test_synthetic_timings_fit_and_split():
    model, par, base = _specs(2)
    table = assemble(base, _synthetic(base), model, par)
    assert table.source == "measured" and table.spec_fingerprint == base.spec_fingerprint
    ar = next(c for c in table.layer.graph.collectives if c.name == "ar_proj")
    assert table.layer.coll_ms["ar_proj"] == pytest.approx(0.5 + ar.size_bytes / 1e6, rel=1e-6)
    assert table.p2p_ms == pytest.approx(0.2 + base.p2p_bytes / 4e6, rel=1e-6)
    assert table.contention == 0.7 and table.optimizer_ms_per_param == 2e-6
    assert table.tp_sync_ms == 1.5  # the sync probe's in-loop wait per TP collective
    assert table.bytes_per_param == 16.0  # fp32 weights, grads and two Adam moments
    assert table.recv_ahead and not base.recv_ahead  # gloo posts receives one RECV ahead
    nccl = replace(_synthetic(base), comm=replace(_synthetic(base).comm, backend="nccl"))
    assert not assemble(base, nccl, model, par).recv_ahead
    no_comm = replace(_synthetic(base), comm=None)
    assert assemble(base, no_comm, model, par).recv_ahead  # CPU ranks talk through gloo
    assert not assemble(base, replace(no_comm, device="cuda"), model, par).recv_ahead
    # forward as measured; backward shares rescaled to the whole-layer total; a GEMM's
    # backward split into dgrad/wgrad as the analytic model splits it
    assert table.layer.fwd_ms() == pytest.approx(len(table.layer.op_ms))
    assert table.layer.bwd_ms() == pytest.approx(3.0 * len(table.layer.op_ms))
    fc1, ana = table.layer.op_ms["fc1"], base.layer.op_ms["fc1"]
    assert fc1.dgrad_ms / fc1.wgrad_ms == pytest.approx(ana.dgrad_ms / ana.wgrad_ms)
    assert table.layer.op_ms["gelu"].wgrad_ms == 0.0
    # a piece of several ops is split by the analytic forward times
    logits, ce_max = table.head.op_ms["logits"], table.head.op_ms["ce_max"]
    ratio = base.head.op_ms["logits"].fwd_ms / base.head.op_ms["ce_max"].fwd_ms
    assert logits.fwd_ms + ce_max.fwd_ms == pytest.approx(2.0)
    assert logits.fwd_ms / ce_max.fwd_ms == pytest.approx(ratio)
    assert table.head.bwd_ms() == pytest.approx(4.0)
    # a backward piece by measured forward x the analytic backward/forward ratio of each op
    def weight(op: str) -> float:
        m, a = table.head.op_ms[op], base.head.op_ms[op]
        return m.fwd_ms * (a.dgrad_ms + a.wgrad_ms) / a.fwd_ms
    got = table.head.op_ms
    assert (got["final_ln"].dgrad_ms / (got["ce_sum"].dgrad_ms + got["ce_sum"].wgrad_ms)
            == pytest.approx(weight("final_ln") / weight("ce_sum")))
    assert all(t.fwd_ms > 0 and t.dgrad_ms > 0 for c in (table.layer, table.embed, table.head)
               for t in c.op_ms.values())


def _scaled(ops: OpSamples, k: float) -> OpSamples:
    def kind(t: KindTimes) -> KindTimes:
        return KindTimes({n: k * v for n, v in t.fwd_ms.items()},
                         {n: k * v for n, v in t.bwd_ms.items()}, k * t.bwd_total_ms)
    return OpSamples(kind(ops.layer), kind(ops.embed), kind(ops.head),
                     k * ops.optimizer_ms_per_param)


def test_retime_replaces_compute_and_keeps_communication():
    model, par, base = _specs(2)
    m = _synthetic(base)
    table = assemble(base, m, model, par)
    assert retime(table, base, m.ops) == table  # the same timings give the same table
    slower = retime(table, base, _scaled(m.ops, 1.5))
    for kind in ("layer", "embed", "head"):
        old, new = getattr(table, kind), getattr(slower, kind)
        assert new.fwd_ms() == pytest.approx(1.5 * old.fwd_ms())
        assert new.bwd_ms() == pytest.approx(1.5 * old.bwd_ms())
        assert new.coll_ms == old.coll_ms
    assert slower.optimizer_ms_per_param == pytest.approx(3e-6)
    assert (slower.p2p_ms, slower.contention, slower.tp_sync_ms, slower.bytes_per_param) == (
        table.p2p_ms, table.contention, table.tp_sync_ms, table.bytes_per_param)


def test_median_ops_is_per_op():
    _, _, base = _specs(2)
    ops = _synthetic(base).ops
    runs = [_scaled(ops, 1.0), _scaled(ops, 3.0), _scaled(ops, 1.2)]
    mid = median_ops(runs)
    assert mid.layer.fwd_ms["fc1"] == pytest.approx(1.2 * ops.layer.fwd_ms["fc1"])
    assert mid.head.bwd_total_ms == pytest.approx(1.2 * ops.head.bwd_total_ms)
    assert mid.optimizer_ms_per_param == pytest.approx(1.2 * ops.optimizer_ms_per_param)


def test_pieces_cut_where_the_module_announces():
    _, _, base = _specs(2)
    graph = base.head.graph  # final_ln, logits, ce_max | ar_ce_max | ce_sum | ar_ce_sum | ce_loss
    steps = [i for i, s in enumerate(graph.fwd_steps) if s.kind == "coll"]
    marks = [("tag:final_ln_in", 0.0), ("tag:final_ln_out", 1.0), (f"coll:{steps[0]}", 4.0),
             (f"coll:{steps[1]}", 6.0), ("tag:softmax", 9.0)]
    # the last op runs to the end of the forward, so the pieces add up to the whole
    assert pieces(graph, marks, 0.0, 9.5) == {"final_ln": 1.0, "logits+ce_max": 3.0,
                                              "ce_sum": 2.0, "ce_loss": 3.5}


def test_sizes_are_geometric_distinct_and_aligned():
    sizes = geometric_sizes(100, 1 << 20, 6, 64)
    assert len(sizes) == 6 and sizes[0] == 128 and sizes[-1] == 1 << 20
    assert all(s % 64 == 0 for s in sizes)
    assert len(geometric_sizes(64, 64, 5, 64)) >= 4  # a narrow range still gives 4 sizes


def test_profile_model_finds_the_runtime_dtype():
    _, par, base = _specs(1)
    assert model_for_profile(get_model("gpt-tiny"), par, base, "p").dtype_bytes == 4
    with pytest.raises(Exception, match="other specs"):
        model_for_profile(get_model("gpt-tiny"), replace(par, seq_len=32), base, "p")


# -- real measurements ----------------------------------------------------------------------

def _check_profile(path: Path, tp: int) -> None:
    table = load_profile(path)
    model, par, _ = _specs(tp)
    assert table.source == "measured"
    assert table.spec_fingerprint == fingerprint(model, par)
    for cost in (table.layer, table.embed, table.head):
        assert {op.name for op in cost.graph.ops} == set(cost.op_ms)
        assert all(t.fwd_ms > 0 and t.dgrad_ms + t.wgrad_ms > 0 for t in cost.op_ms.values())
    assert table.optimizer_ms_per_param > 0


def test_measure_tp1_in_process_then_plan_with_it(tmp_path):
    out = tmp_path / "profile.json"
    result = _profile("--measure", "--tp", "1", "--out", str(out), "--repeats", "5", *TINY)
    assert result.exit_code == 0, result.output
    assert "layer" in result.output and "wrote" in result.output
    _check_profile(out, 1)
    plan_path = tmp_path / "plan.json"
    plan_flags = [f for f in TINY if f not in ("--device", "cpu")]
    result = runner.invoke(app, ["plan", "--policy", "none", "--profile", str(out), "--tp", "1",
                                 "--dtype-bytes", "4", "--out", str(plan_path), *plan_flags])
    assert result.exit_code == 0, result.output
    assert load_plan(plan_path).cost_source == "measured"
    # the plain preset flags adopt the profile's activation width (fp32 on CPU) ...
    result = runner.invoke(app, ["plan", "--policy", "none", "--profile", str(out), "--tp", "1",
                                 "--out", str(plan_path), *plan_flags])
    assert result.exit_code == 0, result.output
    assert load_plan(plan_path).model.dtype_bytes == 4
    # ... but an explicit other width is other specs: a clear error, not a wrong plan
    result = runner.invoke(app, ["plan", "--profile", str(out), "--tp", "1", "--dtype-bytes", "2",
                                 *plan_flags])
    assert result.exit_code == 2 and "profile" in result.output


def test_measure_tp2_launches_ranks_and_fits_communication(tmp_path):
    out = tmp_path / "profile.json"
    result = _profile("--measure", "--tp", "2", "--out", str(out), "--repeats", "5", "--json",
                      *TINY)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["concurrent_ranks"] == 2 and summary["backend"] == "gloo"
    _check_profile(out, 2)
    table = load_profile(out)
    assert all(ms > 0 for ms in table.layer.coll_ms.values())
    assert table.p2p_ms > 0 and 0.05 <= table.contention <= 1.0
    assert summary["tp_sync_ms"] is not None and table.tp_sync_ms == summary["tp_sync_ms"] >= 0
    assert summary["layer_fwd_coll_ms"] == pytest.approx(table.layer.fwd_coll_ms())
    # every kind was timed at >= 4 sizes up to a bandwidth-bound one: a finite positive bandwidth
    for kind, series in summary["samples"].items():
        assert len(set(series["sizes_bytes"])) >= 4, kind
        fit = fit_alpha_beta(series["sizes_bytes"], series["times_ms"])
        assert 0 < fit.bytes_per_s < float("inf"), (kind, series)


@pytest.mark.parametrize("args, message", [
    (["--emulate", "200mbit", "--tp", "1"], "tp > 1 or pp > 1"),
    (["--emulate", "fast", "--tp", "2"], "not a rate"),
    (["--repeats", "3", "--tp", "1"], "--repeats 3"),
    (["--dtype-bytes", "2", "--tp", "1", "--device", "cpu"], "fp32"),
    (["--model", "gpt-13b", "--seq-len", "8192", "--tp", "1", "--micro-batch-size", "8",
      "--attention-dropout", "0"],
     "GiB available"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    result = _profile("--measure", *TINY, *args, "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "p.json").exists()


def test_emulate_without_privileges_says_so(tmp_path, monkeypatch):
    from lynxpipe.testbed import netns

    monkeypatch.setattr(netns, "_effective_caps", lambda: 0)
    result = _profile("--measure", *TINY, "--tp", "2", "--emulate", "200mbit",
                      "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert "CAP_NET_ADMIN" in result.output or "iproute2" in result.output  # (no `ip` at all)


def test_without_measure_the_analytic_table(tmp_path):
    out = tmp_path / "profile.json"
    result = _profile("--tp", "2", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    table = load_profile(out)
    assert table.source == "analytic"
    assert table.spec_fingerprint == fingerprint(get_model("gpt-tiny"),
                                                 ParallelSpec(tp=2, pp=1, seq_len=64))


def test_ops_only_times_one_tp_shard_again(tmp_path: Path):
    """What a benchmark runs beside its measured rounds: one rank's ops, no communication."""
    import subprocess
    import sys

    from lynxpipe.artifact import from_dict

    model, par, base = _specs(2)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(to_dict(make_job(base, model, par, "float32", "cpu", 5))))
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, "-m", "lynxpipe.profile.ops_only", str(job), "1",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ops = from_dict(OpSamples, json.loads(out.read_text()))
    assert set(ops.layer.fwd_ms) == {op.name for op in base.layer.graph.ops}
    assert all(v > 0 for v in ops.layer.fwd_ms.values()) and ops.layer.bwd_total_ms > 0
    table = retime(base, base, ops)  # an analytic table re-timed: usable by the planners
    assert table.layer.fwd_ms() == pytest.approx(sum(ops.layer.fwd_ms.values()), rel=1e-6)


def test_ops_only_refuses_bad_arguments_in_one_line(tmp_path: Path, capsys):
    from lynxpipe.profile.ops_only import main

    assert main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "usage: python -m lynxpipe.profile.ops_only JOB RANK OUT")
    assert main([str(tmp_path / "missing.json"), "0", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    model, par, base = _specs(1)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(to_dict(make_job(base, model, par, "float32", "cpu", 5))))
    assert main([str(job), "first", str(tmp_path / "o.json")]) == 2
    assert "RANK 'first'" in capsys.readouterr().err
