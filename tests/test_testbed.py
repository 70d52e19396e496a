"""Emulated cluster (SPEC §8): parsing and tc plans anywhere; real namespaces when root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lynxpipe.cli.cluster import cluster_app
from lynxpipe.errors import LynxError
from lynxpipe.testbed import janitor, netns
from lynxpipe.testbed.spec import (
    EmulatedCluster,
    default_burst_bytes,
    parse_emulate,
    parse_latency,
    parse_rate,
    tc_commands,
)

# Concurrent runs of this file (several engineers, one machine) must not meet: each run gets
# its own block of cluster ids (never 0, a user's default) and its own argv mark.
MARK = f"lynx-test-sleeper-{os.getpid()}"  # in argv of every process the tests start in a netns
SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)", MARK]
_BASE = 100 + 6 * (os.getpid() % 25)
IDS = range(_BASE, _BASE + 6)


def _privileged() -> bool:
    try:
        netns.require_privileges()
    except LynxError:
        return False
    return True


needs_root = pytest.mark.skipif(not _privileged(), reason="needs root with CAP_NET_ADMIN and "
                                "CAP_SYS_ADMIN and iproute2 to create network namespaces")


# --- pure: no root needed ---------------------------------------------------------------------

def test_parse_rates_and_latency():
    assert parse_rate("200mbit") == 200.0
    assert parse_rate("1.5Gbit") == 1500.0
    assert parse_rate("800kbit") == pytest.approx(0.8)
    assert parse_latency("500us") == pytest.approx(0.5)
    assert parse_emulate("200mbit,2ms") == (200.0, 2.0)
    assert parse_emulate("2gbit") == (2000.0, 20.0)


@pytest.mark.parametrize("text, named", [("200mbps", "'200mbps'"), ("fast", "'fast'"),
                                         ("0mbit", "'0mbit'"), ("200mbit,2", "'2'"),
                                         ("1gbit,2ms,3ms", "'1gbit,2ms,3ms'")])
def test_parse_emulate_names_the_bad_value(text, named):
    with pytest.raises(LynxError, match=named):
        parse_emulate(text)


def test_spec_validation():
    with pytest.raises(LynxError, match="no rank has a TP peer"):
        EmulatedCluster(num_ranks=2, rate_mbit=100, tp_rate_mbit=1000)
    with pytest.raises(LynxError, match="must divide"):
        EmulatedCluster(num_ranks=6, rate_mbit=100, tp_size=4)
    with pytest.raises(LynxError, match="cluster_id"):
        EmulatedCluster(num_ranks=2, rate_mbit=100, cluster_id=256)
    with pytest.raises(LynxError, match="burst_bytes"):
        EmulatedCluster(num_ranks=2, rate_mbit=100, burst_bytes=100)


def test_layout_is_tp_then_dp_then_pp():
    c = EmulatedCluster(num_ranks=8, rate_mbit=100, tp_size=2, pp_size=2)  # dp = 2
    assert [c.link_kind(0, p) for p in range(1, 8)] == ["tp", "other", "other", "pp", "other",
                                                       "other", "other"]
    assert c.link_kind(3, 7) == "pp" and c.link_kind(6, 7) == "tp"


def test_default_burst_is_half_a_millisecond_at_least_8kib():
    assert default_burst_bytes(2000) == 125_000
    assert default_burst_bytes(50) == 8192


def test_tc_commands():
    plain = tc_commands(EmulatedCluster(num_ranks=2, rate_mbit=200, latency_ms=2), "d", 0, "dst")
    assert plain == [["qdisc", "replace", "dev", "d", "root", "tbf", "rate", "200000kbit",
                      "burst", "12500", "latency", "2000us"]]
    c = EmulatedCluster(num_ranks=4, rate_mbit=100, tp_rate_mbit=1000, pp_rate_mbit=20,
                        tp_size=2, pp_size=2, cluster_id=3)
    cmds = tc_commands(c, "d", 0, "src")
    leaves = [cmd[cmd.index("rate") + 1] for cmd in cmds if "tbf" in cmd]
    assert leaves == ["1000000kbit", "20000kbit", "100000kbit"]
    filters = [(cmd[cmd.index("src") + 1], cmd[-1]) for cmd in cmds if "filter" in cmd]
    assert filters == [("10.213.3.2/32", "1:1"), ("10.213.3.3/32", "1:2")]


def test_without_privileges_a_clear_error(monkeypatch):
    monkeypatch.setattr(netns, "_effective_caps", lambda: 0)
    with pytest.raises(LynxError, match="needs root"):
        netns.up(EmulatedCluster(num_ranks=2, rate_mbit=100, cluster_id=IDS[0]))
    result = CliRunner().invoke(cluster_app, ["down", "--all"])
    assert result.exit_code == 2
    assert "needs root" in result.output and "Traceback" not in result.output


def test_cli_bad_rate_is_one_line_exit_2():
    result = CliRunner().invoke(cluster_app, ["up", "--rate", "200mbps"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "'200mbps'" in result.output


# --- real namespaces ----------------------------------------------------------------------------

def _host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _leftover_processes() -> list[str]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_janitor = janitor.MARK.encode() in argv and argv[-3].decode() in map(str, IDS)
        if MARK.encode() in argv or is_janitor:
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def _ours() -> list[str]:
    return [n for n in netns.live_namespaces() if int(n[4:].split("-")[0]) in IDS]


@pytest.fixture
def clean():
    """Every test here must leave no namespace, link, state file or process of ours behind."""
    yield
    leftovers = (_ours(), [i for i in IDS if netns._read_state(i)], _leftover_processes())
    for cluster_id in IDS:
        netns.down(cluster_id)
    assert leftovers == ([], [], [])
    assert "lynx" not in _host_links()


@needs_root
def test_up_status_down_idempotent(clean):
    c = EmulatedCluster(num_ranks=2, rate_mbit=100, cluster_id=IDS[0])
    assert netns.up(c).created and not netns.up(c).created
    st = {s.cluster_id: s for s in netns.status()}[IDS[0]]
    assert st.namespaces == tuple(f"lynx{IDS[0]}-{n}" for n in ("br", "r0", "r1"))
    assert st.owner is None
    assert st.cluster == c and not st.stale
    assert "lynx" not in _host_links()  # the host namespace is never touched
    wider = EmulatedCluster(num_ranks=3, rate_mbit=100, cluster_id=IDS[0])
    assert netns.up(wider).created and len(_ours()) == 4  # changed spec: rebuilt
    assert netns.down(IDS[0]) and not netns.down(IDS[0])
    assert _ours() == []


@needs_root
def test_cli_up_status_down(clean):
    runner = CliRunner()
    args = ["up", "--ranks", "2", "--rate", "200mbit", "--id", str(IDS[1])]
    up = runner.invoke(cluster_app, args)
    assert up.exit_code == 0 and f"10.213.{IDS[1]}.1" in up.output, up.output
    assert "already up" in runner.invoke(cluster_app, args).output
    assert f"lynx{IDS[1]}-r1" in runner.invoke(cluster_app, ["status"]).output
    assert runner.invoke(cluster_app, ["down", "--id", str(IDS[1])]).exit_code == 0


TCP_PROBE = textwrap.dedent("""
    import socket, sys, time
    if sys.argv[1] == "serve":
        s = socket.create_server(("0.0.0.0", 5999))
        while True:
            c, _ = s.accept(); n = 0
            while (b := c.recv(1 << 20)):
                n += len(b)
            c.close()
    else:
        for host in sys.argv[2:]:
            for _ in range(50):
                try:
                    c = socket.create_connection((host, 5999)); break
                except OSError:
                    time.sleep(0.05)
            t0 = time.perf_counter(); c.sendall(b"x" * 1_000_000); c.shutdown(socket.SHUT_WR)
            c.recv(1); print(time.perf_counter() - t0, flush=True)
""")


@needs_root
def test_tp_and_pp_links_get_their_own_rates(clean, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(TCP_PROBE)
    c = EmulatedCluster(num_ranks=4, rate_mbit=100, tp_rate_mbit=1000, pp_rate_mbit=20,
                        tp_size=2, pp_size=2, cluster_id=IDS[2])
    with netns.emulated(c) as handle:
        for rank in (1, 2, 3):
            netns.run_in_rank(handle, rank, [sys.executable, str(script), "serve", MARK])
        peers = [netns.rank_address(c.cluster_id, r) for r in (1, 2, 3)]
        client = netns.run_in_rank(handle, 0, [sys.executable, str(script), "send", *peers],
                                   stdout=subprocess.PIPE)
        tp_s, pp_s, other_s = map(float, client.communicate(timeout=20)[0].split())
    # 1 MB: 8 ms at 1 Gbit, 400 ms at 20 Mbit, 80 ms at 100 Mbit (loose bounds: 2 shared cores)
    assert tp_s < 0.05 and 0.3 < pp_s < 1.5 and 0.06 < other_s < 0.3, (tp_s, pp_s, other_s)


GLOO_PROBE = textwrap.dedent("""
    import json, sys, time
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x = torch.full((4,), float(rank + 1)); dist.all_reduce(x)
    buf, ack, times = torch.ones(1 << 20), torch.zeros(1), []  # 4 MB of fp32
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1); dist.recv(ack, 1)
        else:
            dist.recv(buf, 0); dist.send(ack, 0)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"sum": x.tolist(), "send_s": min(times[1:])}))
    dist.destroy_process_group()
""")


@needs_root
def test_gloo_all_reduce_over_shaped_links(clean, tmp_path):
    script = tmp_path / "gloo_probe.py"
    script.write_text(GLOO_PROBE)
    c = EmulatedCluster(num_ranks=2, rate_mbit=50, cluster_id=IDS[3])
    env = {"MASTER_PORT": "29500", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    with netns.emulated(c) as handle:
        assert netns.master_addr(handle) == f"10.213.{IDS[3]}.1"
        procs = [netns.run_in_rank(handle, r, [sys.executable, str(script), MARK], env,
                                   stdout=subprocess.PIPE) for r in range(2)]
        out = [p.communicate(timeout=40)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
    result = json.loads(out[0])
    assert result["sum"] == [3.0] * 4
    assert 0.5 < result["send_s"] < 2.0, result  # 4 MB at 50 Mbit: 0.67 s nominal


DRIVER = textwrap.dedent("""
    import sys, time
    from lynxpipe.testbed import netns
    from lynxpipe.testbed.spec import EmulatedCluster
    cluster = EmulatedCluster(num_ranks=2, rate_mbit=100, cluster_id=int(sys.argv[1]))
    with netns.emulated(cluster) as h:
        for rank in range(2):
            netns.run_in_rank(h, rank, %r)
        print("ready", flush=True)
        time.sleep(300)
""" % SLEEPER)


def _start_driver(tmp_path: Path, cluster_id: int) -> subprocess.Popen[str]:
    """A driver process that brought cluster `cluster_id` up and runs a sleeper in each rank."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(cluster_id)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 5  # `ip netns exec` may not have entered the netns yet
        while len(netns._pids_inside(netns._namespaces()[cluster_id])) < 2:
            assert time.monotonic() < deadline, "the ranks never entered their namespaces"
            time.sleep(0.02)
    except BaseException:
        driver.kill()
        driver.wait()
        raise
    return driver


def _wait_gone(cluster_id: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (cluster_id in netns._namespaces()
                                           or _leftover_processes()):
        time.sleep(0.05)


@needs_root
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                       (signal.SIGHUP, 128 + signal.SIGHUP),
                                       (signal.SIGINT, -signal.SIGINT)])
def test_a_signal_to_the_driver_leaves_nothing(clean, tmp_path, sig, code):
    driver = _start_driver(tmp_path, IDS[4])
    driver.send_signal(sig)
    assert driver.wait(timeout=10) == code
    assert IDS[4] not in netns._namespaces() and not _leftover_processes()


@needs_root
def test_sigkill_to_the_driver_the_janitor_cleans_up(clean, tmp_path):
    driver = _start_driver(tmp_path, IDS[5])
    driver.kill()
    driver.wait()
    _wait_gone(IDS[5])
    assert IDS[5] not in netns._namespaces() and not _leftover_processes()


@needs_root
def test_sigkill_to_driver_and_janitor_next_up_reaps(clean, tmp_path):
    driver = _start_driver(tmp_path, IDS[5])
    state = netns._read_state(IDS[5])
    assert state is not None
    os.kill(state["janitor"], signal.SIGKILL)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 3
    while _leftover_processes() and time.monotonic() < deadline:  # the ranks die by PDEATHSIG
        time.sleep(0.02)
    assert not _leftover_processes()
    # The namespaces stay, marked stale (unless a concurrent test run's `up` reaped them).
    assert [s.stale for s in netns.status() if s.cluster_id == IDS[5]] in ([True], [])
    netns.up(EmulatedCluster(num_ranks=2, rate_mbit=100, cluster_id=IDS[1]))
    assert IDS[5] not in netns._namespaces() and netns._read_state(IDS[5]) is None
    netns.down(IDS[1])
