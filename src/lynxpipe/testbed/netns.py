"""Build, use and tear down an emulated cluster: a network namespace per rank (needs root).

Cluster N, rank r: namespace `lynxN-r<r>` holds loopback and veth `lynx-r<r>` (10.213.N.(r+1)/24,
the GLOO_SOCKET_IFNAME); namespace `lynxN-br` holds bridge `lynxbr` and the other ends
`lynx-b<r>`. Veth pairs are created inside `lynxN-br` with the peer placed straight into the
rank's namespace, so the host's namespace never sees an interface, address or route of ours.
Both ends are shaped (`spec.tc_commands`): `lynx-r<r>` egress is the rank's upload, `lynx-b<r>`
egress its download. Per-kind rates (TP/PP) use htb as a classifier with tbf leaves.

Burst: tokens refill while a rank computes, so a big burst lets the start of a message after
compute leave at line rate. Default 0.5 ms of the rate, >= 8 KiB (2 Gbit: 125 KB, 200 Mbit:
12.5 KB); smaller bursts lose rate at >= 1 Gbit (64 KB at 2 Gbit: ~1.5 Gbit/s). tbf's `latency`
only bounds queueing; it adds no delay (netem is unavailable). 1-2 ms cost <= 2% at 50 Mbit.

Cleanup: `emulated()` tears down on return, exceptions, SIGINT, SIGTERM and SIGHUP; processes
from `run_in_rank` get PR_SET_PDEATHSIG=SIGKILL. SIGKILL of the owner cannot be caught, so
`up(..., owner=pid)` starts a detached janitor that waits on the owner's pidfd and tears down
when it dies (`janitor`); as a backstop every `up()` reaps clusters whose owner (pid + start time in
/run/lynxpipe/lynxN.json) is dead or which have no state file, and `down_all()` removes all.
Clusters from `lynxpipe cluster up` have no owner and stay until `down`.

Measured here (2 cores, 2 ranks, 1 thread each; 4 MiB = 1M fp32 `dist.send` + 4-byte ack
right after a barrier, default burst, median of 5, spread < 1%; facts to size messages with):
  50 Mbit: 701 ms (47.9 Mbit/s)   200 Mbit: 175 ms (191 Mbit/s)
  1 Gbit: 35.1 ms (956 Mbit/s)    2 Gbit: 17.4 ms (1.93 Gbit/s)
i.e. ~95% of the nominal rate; 4 ranks at 100 / 20 / 1000 Mbit (other / PP / TP) gave 96 / 19
/ 950 Mbit/s for 1 MB over TCP. Up + down of 2 ranks takes < 0.1 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lynxpipe.errors import LynxError
from lynxpipe.testbed import janitor
from lynxpipe.testbed.spec import (
    ClusterStatus,
    EmulatedCluster,
    bridge_namespace,
    bridge_port,
    rank_address,
    rank_interface,
    rank_namespace,
    tc_commands,
)

STATE_DIR = Path("/run/lynxpipe")
NETNS_DIR = Path("/run/netns")
BRIDGE = "lynxbr"
_NS_PATTERN = re.compile(r"^lynx(\d{1,3})-(?:br|r\d+)$")
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


@dataclass(frozen=True)
class ClusterHandle:
    """A cluster that is up; `owner` tears it down (None: persistent, `cluster up`)."""

    cluster: EmulatedCluster
    owner: int | None
    created: bool
    """False when `up` found the same cluster already up and left it alone."""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, compare=False,
                                                     repr=False)


def master_addr(handle: ClusterHandle) -> str:
    """Rank 0's address, for torch.distributed env:// rendezvous (MASTER_ADDR)."""
    return rank_address(handle.cluster.cluster_id, 0)


def require_privileges() -> None:
    """Raise LynxError unless this process may create and shape network namespaces."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LynxError(f"the emulated cluster needs iproute2 (`{tool}` not found on PATH)")
    caps = _effective_caps()  # root in a container may lack them; then `ip netns add` fails
    if not caps >> _CAP_NET_ADMIN & 1 or not caps >> _CAP_SYS_ADMIN & 1:
        raise LynxError(f"the emulated cluster needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN "
                        f"(network namespaces, tc), but runs as uid {os.geteuid()} without "
                        f"them; run it as root, e.g. with sudo")
    _run(["ip", "netns", "list"])


def _effective_caps() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _run(argv: Sequence[str], ok_missing: bool = False) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode and not (ok_missing and "No such file" in done.stderr):
        raise LynxError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    # One lock for all clusters: up/down/reap are short, and the janitor must not race the owner.
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _state_path(cluster_id: int) -> Path:
    return STATE_DIR / f"lynx{cluster_id}.json"  # -> {cluster, owner, owner_start, janitor}


def _read_state(cluster_id: int) -> dict | None:
    try:
        return json.loads(_state_path(cluster_id).read_text())
    except (OSError, ValueError):
        return None


def _write_state(cluster: EmulatedCluster, owner: int | None, watcher: int | None) -> None:
    state = {"cluster": dataclasses.asdict(cluster), "owner": owner,
             "owner_start": _start_time(owner) if owner else None, "janitor": watcher}
    tmp = _state_path(cluster.cluster_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(_state_path(cluster.cluster_id))


def _start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks: tells a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(state: dict) -> bool:
    owner = state.get("owner")
    return owner is None or _start_time(owner) == state.get("owner_start")


def _namespaces() -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    for name in sorted(names):
        if match := _NS_PATTERN.match(name):
            found.setdefault(int(match.group(1)), []).append(name)
    return found


def _state_ids() -> set[int]:
    files = STATE_DIR.glob("lynx*.json") if STATE_DIR.is_dir() else []
    return {int(m.group(1)) for p in files if (m := re.match(r"lynx(\d+)\.json$", p.name))}


def _pids_inside(names: Sequence[str]) -> list[int]:
    """Processes whose network namespace is one of `names` (what `ip netns pids` reports)."""
    targets = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            targets.add((st.st_dev, st.st_ino))
    pids = []
    for entry in os.listdir("/proc") if targets else []:
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in targets:
                    pids.append(int(entry))
    return pids


def _kill_inside(names: Sequence[str], grace_s: float = 0.5) -> None:
    # A namespace with a process left in it outlives `ip netns del`, invisibly: kill first.
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        pids = _pids_inside(names)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = _pids_inside(names)
        if not pids:
            return
    raise LynxError(f"processes {pids} in {', '.join(names)} survived SIGKILL")


def _teardown(cluster_id: int) -> bool:
    """Kill what runs inside, delete the namespaces (and so the veths), drop the state file."""
    names = _namespaces().get(cluster_id, [])
    state = _read_state(cluster_id)
    janitor.stop((state or {}).get("janitor"), cluster_id)
    _kill_inside(names)
    for name in names:
        _run(["ip", "netns", "del", name], ok_missing=True)
    _state_path(cluster_id).unlink(missing_ok=True)
    return bool(names) or state is not None


def _reap_stale() -> None:
    for cluster_id in sorted(set(_namespaces()) | _state_ids()):
        state = _read_state(cluster_id)
        if state is None or not _owner_alive(state):
            _teardown(cluster_id)


def _build(c: EmulatedCluster) -> None:
    br = bridge_namespace(c.cluster_id)
    ranks = [rank_namespace(c.cluster_id, r) for r in range(c.num_ranks)]
    for name in (br, *ranks):
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
    _run(["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "-n", br, "link", "set", BRIDGE, "up"])
    for rank, ns in enumerate(ranks):
        port, dev = bridge_port(rank), rank_interface(rank)
        _run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", dev,
              "netns", ns])
        _run(["ip", "-n", br, "link", "set", port, "master", BRIDGE, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{rank_address(c.cluster_id, rank)}/24",
              "dev", dev])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])
        for args in tc_commands(c, dev, rank, "dst"):
            _run(["tc", "-n", ns, *args])
        for args in tc_commands(c, port, rank, "src"):
            _run(["tc", "-n", br, *args])


def _reuse(c: EmulatedCluster, owner: int | None) -> ClusterHandle | None:
    """The live cluster with this id when it may be reused as is; LynxError if it is taken."""
    state = _read_state(c.cluster_id)
    if state is None:
        return None
    held_by, same = state.get("owner"), EmulatedCluster(**state["cluster"]) == c
    if held_by is not None and held_by != owner:
        raise LynxError(f"cluster id {c.cluster_id} is in use by pid {held_by}; pick another id "
                        f"or stop that process")
    complete = set(_namespaces().get(c.cluster_id, [])) == {
        bridge_namespace(c.cluster_id), *(rank_namespace(c.cluster_id, r)
                                          for r in range(c.num_ranks))}
    if held_by is None and owner is not None and not (same and complete):
        raise LynxError(f"cluster id {c.cluster_id} is up with another spec (from `lynxpipe "
                        f"cluster up`); bring it down with `lynxpipe cluster down --id "
                        f"{c.cluster_id}` or pick another id")
    return ClusterHandle(c, held_by, created=False) if same and complete else None


def up(cluster: EmulatedCluster, *, owner: int | None = None) -> ClusterHandle:
    """Build `cluster` (idempotent: an identical live one is reused). With `owner` (a pid) the
    cluster is torn down when that process dies, even by SIGKILL; without, it stays until
    `down`. Reaps stale clusters of dead owners first."""
    require_privileges()
    with _locked():
        _reap_stale()
        if (handle := _reuse(cluster, owner)) is not None:
            return handle
        _teardown(cluster.cluster_id)
        _write_state(cluster, owner, None)  # before any namespace: a crash leaves a reapable id
        try:
            _build(cluster)
            watcher = janitor.start(cluster.cluster_id, owner) if owner else None
            _write_state(cluster, owner, watcher)
        except BaseException:
            _teardown(cluster.cluster_id)
            raise
    return ClusterHandle(cluster, owner, created=True)


def down(cluster_id: int) -> bool:
    """Tear down cluster `cluster_id`, killing its processes; False if nothing was there."""
    require_privileges()
    with _locked():
        return _teardown(cluster_id)


def down_if_owned(cluster_id: int, owner: int) -> None:
    """Tear down `cluster_id` if `owner` still owns it (the janitor, once the owner died)."""
    with _locked():
        state = _read_state(cluster_id)
        if state is not None and state.get("owner") == owner:
            _teardown(cluster_id)


def down_all() -> list[int]:
    """Tear down every `lynx*` cluster on this machine, live owners included."""
    require_privileges()
    with _locked():
        ids = sorted(set(_namespaces()) | _state_ids())
        return [cid for cid in ids if _teardown(cid)]


def status() -> list[ClusterStatus]:
    """Every `lynx*` cluster found (namespaces or state files)."""
    found, result = _namespaces(), []
    for cluster_id in sorted(set(found) | _state_ids()):
        state, names = _read_state(cluster_id), tuple(found.get(cluster_id, []))
        cluster = EmulatedCluster(**state["cluster"]) if state else None
        result.append(ClusterStatus(cluster_id, names, cluster, (state or {}).get("owner"),
                                    state is None or not _owner_alive(state),
                                    len(_pids_inside(names))))
    return result


def live_namespaces() -> list[str]:
    """Names of all `lynx*` namespaces that exist now."""
    return [name for names in _namespaces().values() for name in names]


def free_cluster_id() -> int:
    """The lowest cluster id with neither namespaces nor a state file."""
    used = set(_namespaces()) | _state_ids()
    return next(i for i in range(256) if i not in used)


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_in_rank(handle: ClusterHandle, rank: int, argv: Sequence[str],
                env: Mapping[str, str] | None = None, **popen: object) -> subprocess.Popen[bytes]:
    """Start `argv` inside rank `rank`'s namespace. The environment is ours plus MASTER_ADDR,
    RANK, WORLD_SIZE (defaults `env` may override) and GLOO_SOCKET_IFNAME (forced). Extra
    keywords go to Popen. The process is SIGKILLed if the starting thread dies."""
    c = handle.cluster
    if not 0 <= rank < c.num_ranks:
        raise LynxError(f"rank={rank} is outside 0..{c.num_ranks - 1}")
    full_env = {**os.environ, "MASTER_ADDR": master_addr(handle), "RANK": str(rank),
                "WORLD_SIZE": str(c.num_ranks), **(env or {}),
                "GLOO_SOCKET_IFNAME": rank_interface(rank)}
    cmd = ["ip", "netns", "exec", rank_namespace(c.cluster_id, rank), *argv]
    # PR_SET_PDEATHSIG survives both execs; setpriv sets it without a preexec_fn, which can
    # deadlock in a parent with threads (torch).
    if shutil.which("setpriv"):
        proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *cmd], env=full_env,
                                **popen)  # type: ignore[call-overload]
    else:
        proc = subprocess.Popen(cmd, env=full_env, preexec_fn=_die_with_parent,
                                **popen)  # type: ignore[call-overload]
    handle.processes.append(proc)
    return proc


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _set_handlers(handler: object) -> dict[int, object]:
    """Install `handler` for SIGINT/SIGTERM/SIGHUP unless ignored (nohup); return the old ones.
    Off the main thread Python cannot: then only the janitor guards against signals."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in _SIGNALS  # type: ignore[arg-type]
            if signal.getsignal(sig) is not signal.SIG_IGN}


def _raise_exit(signum: int, _frame: object) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


@contextlib.contextmanager
def emulated(cluster: EmulatedCluster) -> Iterator[ClusterHandle]:
    """Bring `cluster` up for the `with` body; tear it down on every exit (SIGINT, SIGTERM and
    SIGHUP become exceptions here; a second signal during teardown is ignored). An identical
    persistent cluster is reused, not torn down: only processes this body started are killed."""
    old = _set_handlers(_raise_exit)
    try:
        handle = up(cluster, owner=os.getpid())
        try:
            yield handle
        finally:
            _set_handlers(signal.SIG_IGN)
            release(handle)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def release(handle: ClusterHandle) -> None:
    """Stop the processes `handle` started; tear the cluster down if `handle` owns it."""
    for proc in handle.processes:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if handle.owner is not None and handle.owner == os.getpid():
        down(handle.cluster.cluster_id)
