"""What an emulated cluster is: spec, names, addresses, `--emulate` parsing, tc commands.

Pure (no side effects, no root): `lynxpipe.testbed.netns` applies what this module describes.
Ranks are laid out Megatron-style, tp fastest, then dp, then pp
(rank = pp_i * dp * tp + dp_i * tp + tp_i); peers that are neither TP nor PP peers (DP) use
`rate_mbit`. Each rank has one veth, so per-kind rates (`tp_rate_mbit`, `pp_rate_mbit`) are told
apart by the peer's address: htb classifies (u32 filters on dst at the rank end, src at the
bridge end) into three classes, each with its own tbf; the kinds behave as separate links (as
NVLink and the network would): they neither share nor borrow rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lynxpipe.errors import LynxError

SUBNET = "10.213"
DEFAULT_LATENCY_MS = 20.0
MAX_RANKS = 250
MAX_RATE_MBIT = 1e7
"""Fastest link tc is asked for (10 Tbit/s); beyond it a rate is a typo."""
MAX_LATENCY_MS = 60e3
MAX_BURST_BYTES = 2**30
LinkKind = Literal["tp", "pp", "other"]
HTB_HEADROOM = 10.0
_BANDS: dict[LinkKind, int] = {"tp": 1, "pp": 2, "other": 3}


def default_burst_bytes(rate_mbit: float) -> int:
    """0.5 ms worth of `rate_mbit`, at least 8 KiB (why: `lynxpipe.testbed.netns`)."""
    return max(8192, int(rate_mbit * 1e6 / 8 * 0.0005))


@dataclass(frozen=True)
class EmulatedCluster:
    """What to build: ranks, link rates and the cluster id that names namespaces/addresses."""

    num_ranks: int
    """Ranks, one network namespace each (1..250; use 2 for timing on 2 cores)."""
    rate_mbit: float
    """Link rate in Mbit/s (10**6 bit/s) each way between a rank and the bridge."""
    latency_ms: float = DEFAULT_LATENCY_MS
    """tbf `latency`: the most a packet may queue, in ms. Adds no propagation delay."""
    burst_bytes: int | None = None
    """tbf burst in bytes; None = `default_burst_bytes(rate)` for each rate."""
    tp_rate_mbit: float | None = None
    """Rate towards tensor-parallel peers (needs tp_size > 1); None = rate_mbit."""
    pp_rate_mbit: float | None = None
    """Rate towards pipeline peers (needs pp_size > 1); None = rate_mbit."""
    tp_size: int = 1
    """TP degree; ranks r and q are TP peers when r // tp_size == q // tp_size."""
    pp_size: int = 1
    """PP degree; the rest of num_ranks is data parallel (Megatron order tp, dp, pp)."""
    cluster_id: int = 0
    """0..255: namespaces `lynx<id>-*`, addresses 10.213.<id>.0/24."""

    def __post_init__(self) -> None:
        for key in ("num_ranks", "tp_size", "pp_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LynxError(f"{key}={value!r} must be a positive integer")
        if self.num_ranks > MAX_RANKS:
            raise LynxError(f"num_ranks={self.num_ranks} exceeds {MAX_RANKS} (one /24 per cluster)")
        if not isinstance(self.cluster_id, int) or not 0 <= self.cluster_id <= 255:
            raise LynxError(f"cluster_id={self.cluster_id!r} must be an integer in 0..255")
        for key in ("rate_mbit", "tp_rate_mbit", "pp_rate_mbit"):
            value = getattr(self, key)
            if value is not None and not 0.001 <= value <= MAX_RATE_MBIT:  # tc: whole kbit
                raise LynxError(f"{key}={value!r} must be in 0.001..{MAX_RATE_MBIT:g} Mbit/s "
                                f"(1 kbit/s to 10 Tbit/s)")
        if not 0 < self.latency_ms <= MAX_LATENCY_MS:
            raise LynxError(f"latency_ms={self.latency_ms!r} must be in (0, 60000] ms")
        if self.burst_bytes is not None and not 2048 <= self.burst_bytes <= MAX_BURST_BYTES:
            raise LynxError(f"burst_bytes={self.burst_bytes} must be in 2048..2**30 (one full "
                            f"packet to 1 GiB)")
        if self.num_ranks % (self.tp_size * self.pp_size):
            raise LynxError(f"tp_size*pp_size={self.tp_size}*{self.pp_size} must divide "
                            f"num_ranks={self.num_ranks}")
        if self.tp_rate_mbit is not None and self.tp_size == 1:
            raise LynxError("tp_rate_mbit (--tp-rate) is set but tp_size (--tp) is 1: no rank "
                            "has a TP peer")
        if self.pp_rate_mbit is not None and self.pp_size == 1:
            raise LynxError("pp_rate_mbit (--pp-rate) is set but pp_size (--pp) is 1: no rank "
                            "has a PP peer")

    @property
    def per_kind_rates(self) -> bool:
        """True when TP or PP links get their own rate (htb classes, a tbf each)."""
        return self.tp_rate_mbit is not None or self.pp_rate_mbit is not None

    def link_kind(self, rank: int, peer: int) -> LinkKind:
        """Which link `rank` uses towards `peer`."""
        if rank // self.tp_size == peer // self.tp_size:
            return "tp"
        stride = self.num_ranks // self.pp_size  # tp * dp ranks per pipeline stage
        return "pp" if rank % stride == peer % stride else "other"

    def rate_for(self, kind: LinkKind) -> float:
        """Rate in Mbit/s of one link kind."""
        rates = {"tp": self.tp_rate_mbit, "pp": self.pp_rate_mbit}
        return rates.get(kind) or self.rate_mbit

    def burst_for(self, rate_mbit: float) -> int:
        """Burst in bytes used with `rate_mbit`."""
        return self.burst_bytes or default_burst_bytes(rate_mbit)


@dataclass(frozen=True)
class ClusterStatus:
    """One cluster found on this machine."""

    cluster_id: int
    namespaces: tuple[str, ...]
    cluster: EmulatedCluster | None
    """The spec from its state file; None when there is none (a crashed `up`)."""
    owner: int | None
    """The pid whose death tears it down; None for persistent clusters."""
    stale: bool
    """Its owner died, or it has no state file: the next `up`/`down --all` reaps it."""
    num_processes: int


def rank_namespace(cluster_id: int, rank: int) -> str:
    return f"lynx{cluster_id}-r{rank}"


def bridge_namespace(cluster_id: int) -> str:
    return f"lynx{cluster_id}-br"


def rank_interface(rank: int) -> str:
    """The rank's veth inside its namespace (the GLOO_SOCKET_IFNAME)."""
    return f"lynx-r{rank}"


def bridge_port(rank: int) -> str:
    """The bridge's end of the rank's veth, inside the bridge namespace."""
    return f"lynx-b{rank}"


def rank_address(cluster_id: int, rank: int) -> str:
    return f"{SUBNET}.{cluster_id}.{rank + 1}"


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(kbit|mbit|gbit)\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*$", re.IGNORECASE)
_RATE_SCALE = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_TIME_SCALE = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_rate(text: str, what: str = "rate") -> float:
    """`200mbit`, `1.5gbit`, `800kbit` -> Mbit/s."""
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise LynxError(f"{what}={text!r} is not a rate; write a positive number with kbit, "
                        f"mbit or gbit (bits per second), e.g. 200mbit")
    return float(match.group(1)) * _RATE_SCALE[match.group(2).lower()]


def parse_latency(text: str, what: str = "latency") -> float:
    """`2ms`, `500us`, `0.1s` -> ms."""
    match = _TIME.match(text)
    if not match or float(match.group(1)) <= 0:
        raise LynxError(f"{what}={text!r} is not a duration; write a positive number with "
                        f"us, ms or s, e.g. 2ms")
    return float(match.group(1)) * _TIME_SCALE[match.group(2).lower()]


def parse_emulate(text: str) -> tuple[float, float]:
    """`RATE[,LATENCY]` (e.g. `200mbit,2ms`) -> (rate_mbit, latency_ms)."""
    parts = text.split(",")
    if len(parts) > 2:
        raise LynxError(f"--emulate={text!r}: write RATE[,LATENCY], e.g. 200mbit,2ms")
    rate = parse_rate(parts[0], "--emulate rate")
    latency = parse_latency(parts[1], "--emulate latency") if len(parts) == 2 else None
    return rate, latency if latency is not None else DEFAULT_LATENCY_MS


def tc_commands(c: EmulatedCluster, dev: str, rank: int, side: Literal["src", "dst"]
                ) -> list[list[str]]:
    """`tc` argument lists that shape `dev`, one end of rank `rank`'s veth. `side` names the
    peer's address field in this direction: dst on the rank end, src on the bridge end."""
    if not c.per_kind_rates:
        return [["qdisc", "replace", "dev", dev, "root", *_tbf(c, c.rate_mbit)]]
    # htb only classifies (its classes never limit: HTB_HEADROOM x the rate); the tbf leaves
    # shape, as in the one-rate case. No borrowing: one kind never takes another's rate.
    cmds = [["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "3"]]
    for kind, band in _BANDS.items():
        rate = c.rate_for(kind)
        cmds.append(["class", "add", "dev", dev, "parent", "1:", "classid", f"1:{band}", "htb",
                     "rate", _kbit(rate * HTB_HEADROOM), "ceil", _kbit(rate * HTB_HEADROOM)])
        cmds.append(["qdisc", "add", "dev", dev, "parent", f"1:{band}", "handle", f"{band}0:",
                     *_tbf(c, rate)])
    for peer in range(c.num_ranks):
        kind = c.link_kind(rank, peer)
        if peer != rank and kind != "other":
            cmds.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio",
                         "1", "u32", "match", "ip", side,
                         f"{rank_address(c.cluster_id, peer)}/32", "flowid", f"1:{_BANDS[kind]}"])
    return cmds


def _tbf(c: EmulatedCluster, rate_mbit: float) -> list[str]:
    # tbf, unlike htb + fifo, splits GSO super-packets (64 KB on veth) to fit its burst.
    return ["tbf", "rate", _kbit(rate_mbit), "burst", str(c.burst_for(rate_mbit)),
            "latency", f"{c.latency_ms * 1e3:.0f}us"]


def _kbit(rate_mbit: float) -> str:
    return f"{rate_mbit * 1e3:.0f}kbit"
