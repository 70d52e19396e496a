"""Profile fitting on synthetic data and loading a measured profile in the planner."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxpipe.cost.fit import fit_alpha_beta, measured_table
from lynxpipe.cost.table import OpTime, analytic_costs, load_profile, save_profile
from lynxpipe.errors import LynxError
from lynxpipe.plan.planners import make
from lynxpipe.plan.types import PlanRequest
from lynxpipe.specs import ParallelSpec, get_cluster, get_model


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(0.0, 5.0), gbps=st.floats(0.01, 100.0), noise=st.floats(0.0, 0.02))
def test_fit_recovers_alpha_beta(alpha, gbps, noise):
    beta = 1e3 / (gbps * 1e9)
    sizes = [2.0**k for k in range(12, 26)]
    wiggle = [(1 + noise * (-1) ** i) for i in range(len(sizes))]
    times = [alpha + beta * s * w for s, w in zip(sizes, wiggle)]  # transfer-time jitter
    fit = fit_alpha_beta(sizes, times)
    assert fit.ms_per_byte == pytest.approx(beta, rel=0.01 + 2 * noise)
    assert fit.alpha_ms == pytest.approx(alpha, abs=1e-6 + 2 * noise * beta * max(sizes))


def test_fit_survives_latency_spikes_at_small_sizes():
    # gloo after idle: two small messages took ms longer, enough to tilt least squares downwards
    sizes = [128, 768, 4736, 28544, 172928, 1048576]
    times = [0.5 + 1e-6 * s for s in sizes]
    times[1] += 4.0
    times[2] += 0.5
    fit = fit_alpha_beta(sizes, times)
    assert fit.ms_per_byte == pytest.approx(1e-6)
    assert fit.alpha_ms == pytest.approx(0.5)


def test_fit_keeps_a_finite_bandwidth_when_spikes_outvote_the_slope():
    # measured by the profiler on a noisy host (CI): spikes at half the sizes flatten both
    # least squares and the median of pairwise slopes
    sizes = [128, 768, 4736, 28544, 172928, 1048576]
    times = [2.105, 3.927, 0.473, 0.443, 1.649, 1.492]
    fit = fit_alpha_beta(sizes, times)
    assert 0 < fit.bytes_per_s < float("inf")
    assert fit.ms(sizes[-1]) == pytest.approx(1.492, rel=0.1)


def test_fit_needs_two_sizes():
    with pytest.raises(LynxError, match="2 distinct sizes"):
        fit_alpha_beta([1024, 1024], [1.0, 1.1])


def _measured(base, scale=2.0):
    ops = {kind: {name: OpTime(t.fwd_ms * scale, t.dgrad_ms * scale, t.wgrad_ms * scale)
                  for name, t in getattr(base, kind).op_ms.items()}
           for kind in ("layer", "embed", "head")}
    ar = fit_alpha_beta([1e6, 4e6, 16e6], [1.0 + 1e-6 * s for s in (1e6, 4e6, 16e6)])
    return measured_table(base, ops, {"all_reduce": ar}, ar, contention=0.8)


def test_measured_profile_drives_the_planner(tmp_path):
    model, cluster = get_model("gpt-1.3b"), get_cluster("a100-pcie")
    par = ParallelSpec(tp=2, pp=2, num_microbatches=4, seq_len=1024)
    base = analytic_costs(model, cluster, par)
    table = _measured(base)
    assert table.source == "measured" and table.contention == 0.8
    coll = next(c for c in table.layer.graph.collectives if c.kind == "all_reduce")
    assert table.layer.coll_ms[coll.name] == pytest.approx(1.0 + 1e-6 * coll.size_bytes)
    loaded = load_profile(save_profile(tmp_path / "profile.json", table))
    assert loaded == table
    fast = make("none", PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**40, costs=base))
    slow = make("none", PlanRequest(model=model, cluster=cluster, parallel=par, budget_bytes=2**40, costs=loaded))
    assert slow.cost_source == "measured"
    assert slow.predicted.step_time_ms > fast.predicted.step_time_ms


def test_missing_op_is_named():
    base = analytic_costs(get_model("gpt-tiny"), get_cluster("a100-pcie"), ParallelSpec())
    with pytest.raises(LynxError, match="lacks ops .*qkv"):
        measured_table(base, {"layer": {"ln1": OpTime(1, 1, 0)}}, {}, None)
