"""Emulated cluster on one machine: a network namespace per rank, links shaped with tc (§8).

`spec` describes a cluster (pure); `netns` builds, runs in and tears down one (needs root);
`janitor` cleans up after an owner killed by SIGKILL; `cli` is `lynxpipe cluster up|down|status`.

    rate_mbit, latency_ms = parse_emulate("200mbit,2ms")       # `train --emulate RATE[,LATENCY]`
    cluster = EmulatedCluster(num_ranks=2, rate_mbit=rate_mbit, latency_ms=latency_ms,
                              cluster_id=free_cluster_id())
    with emulated(cluster) as handle:                           # torn down on every exit
        procs = [run_in_rank(handle, r, [sys.executable, "-m", "my.worker"],
                             {"MASTER_PORT": "29500"}) for r in range(2)]
        codes = [p.wait() for p in procs]   # ranks see MASTER_ADDR, RANK, WORLD_SIZE and
                                            # GLOO_SOCKET_IFNAME: init_process_group("gloo")
"""

from lynxpipe.testbed.netns import (
    ClusterHandle,
    down,
    down_all,
    emulated,
    free_cluster_id,
    live_namespaces,
    master_addr,
    release,
    require_privileges,
    run_in_rank,
    status,
    up,
)
from lynxpipe.testbed.spec import (
    DEFAULT_LATENCY_MS,
    ClusterStatus,
    EmulatedCluster,
    default_burst_bytes,
    parse_emulate,
    parse_latency,
    parse_rate,
    rank_address,
    rank_interface,
    rank_namespace,
)

__all__ = [
    "DEFAULT_LATENCY_MS", "ClusterHandle", "ClusterStatus", "EmulatedCluster",
    "default_burst_bytes",
    "down", "down_all", "emulated", "free_cluster_id", "live_namespaces", "master_addr",
    "parse_emulate", "parse_latency", "parse_rate", "rank_address", "rank_interface",
    "rank_namespace", "release", "require_privileges", "run_in_rank", "status", "up",
]
