"""Hardware description of a cluster: devices, memory and links, with presets and sources."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lynxpipe.artifact import from_dict, read_json
from lynxpipe.checks import integer, number, text
from lynxpipe.errors import LynxError
from lynxpipe.units import MAX_BYTES

GB = 10**9
GIB = 2**30
MAX_RATE = 1e21
"""Largest FLOP/s or bytes/s accepted (a zetta-unit: 1000x any device): a typo, not a device."""
MAX_LATENCY_US = 1e9
"""Largest per-message latency accepted: 1000 s."""
MAX_DEVICES_PER_NODE = 4096


@dataclass(frozen=True)
class ClusterSpec:
    """Devices and interconnect; times derived from it use the roofline and ring alpha-beta."""

    name: str
    """Preset or user-given name; part of the plan fingerprint."""
    peak_flops_per_s: float
    """Dense 16-bit tensor-core peak of one device."""
    compute_efficiency: float
    """Fraction of peak a large GEMM achieves (model FLOP utilisation of good Megatron runs)."""
    hbm_bytes_per_s: float
    """Device memory bandwidth (for memory-bound element-wise ops)."""
    memory_efficiency: float
    """Fraction of HBM bandwidth element-wise kernels achieve."""
    device_memory_bytes: int
    """Memory of one device."""
    intra_node_bytes_per_s: float
    """Achievable one-direction bandwidth per device between devices of one node."""
    intra_node_latency_us: float
    """Per-message latency (alpha) inside a node."""
    inter_node_bytes_per_s: float
    """Achievable one-direction bandwidth per device between nodes."""
    inter_node_latency_us: float
    """Per-message latency (alpha) between nodes."""
    devices_per_node: int
    """Devices in one node; TP groups that fit in a node use the intra-node link."""
    contention: float = 0.9
    """Fraction of a communication window usable by overlapped compute (SPEC §4)."""

    def __post_init__(self) -> None:
        where = f"cluster {self.name}"
        text(self.name, "cluster name")
        # NaN compares false with everything: every number goes through `number`, or a NaN
        # FLOP/s reaches the MILP and a NaN latency predicts a 0 ms step
        for key in ("peak_flops_per_s", "hbm_bytes_per_s", "intra_node_bytes_per_s",
                    "inter_node_bytes_per_s"):
            number(getattr(self, key), f"{where}: {key}", 0.0, MAX_RATE, lo_open=True)
        for key in ("compute_efficiency", "memory_efficiency", "contention"):
            number(getattr(self, key), f"{where}: {key}", 0.0, 1.0, lo_open=True)
        for key in ("intra_node_latency_us", "inter_node_latency_us"):
            number(getattr(self, key), f"{where}: {key}", 0.0, MAX_LATENCY_US)
        integer(self.device_memory_bytes, f"{where}: device_memory_bytes", 1, MAX_BYTES)
        integer(self.devices_per_node, f"{where}: devices_per_node", 1, MAX_DEVICES_PER_NODE)


CLUSTER_PRESETS: dict[str, ClusterSpec] = {
    # NVIDIA A100-SXM4-80GB, 8 per DGX A100 node.
    "a100-nvlink": ClusterSpec(
        name="a100-nvlink",
        peak_flops_per_s=312e12,  # A100 datasheet: 312 TFLOP/s dense BF16/FP16 tensor core
        compute_efficiency=0.55,  # Megatron-LM reaches 52% of peak on 1T GPT (Narayanan 2021)
        hbm_bytes_per_s=2039 * GB,  # A100 80GB SXM datasheet: 2,039 GB/s
        memory_efficiency=0.8,  # element-wise kernels reach ~80% of STREAM-like peak
        device_memory_bytes=80 * GIB,  # A100 80GB
        intra_node_bytes_per_s=240 * GB,  # NVLink3 600 GB/s bidir = 300 GB/s/dir; NCCL busbw ~240
        intra_node_latency_us=8.0,  # NCCL all-reduce small-message latency inside DGX, ~5-10 us
        inter_node_bytes_per_s=23 * GB,  # 8x HDR 200 Gb/s per node = 25 GB/s per GPU, ~92% goodput
        inter_node_latency_us=15.0,  # IB HDR + NCCL protocol latency, ~10-20 us
        devices_per_node=8,
    ),
    # NVIDIA A100-PCIe-40GB servers: GPUs talk over PCIe Gen4 through the host bridge.
    "a100-pcie": ClusterSpec(
        name="a100-pcie",
        peak_flops_per_s=312e12,  # A100 PCIe datasheet: 312 TFLOP/s dense BF16/FP16
        compute_efficiency=0.5,  # PCIe cards are power-capped at 250 W: lower sustained clocks
        hbm_bytes_per_s=1555 * GB,  # A100 40GB PCIe datasheet: 1,555 GB/s
        memory_efficiency=0.8,
        device_memory_bytes=40 * GIB,  # A100 40GB PCIe
        intra_node_bytes_per_s=12 * GB,  # PCIe Gen4 x16: 32 GB/s/dir raw; ring across switch/CPU
                                         # measures ~10-14 GB/s NCCL busbw (nccl-tests reports)
        intra_node_latency_us=15.0,  # PCIe NCCL latency, ~10-20 us
        inter_node_bytes_per_s=11 * GB,  # 100 Gb/s NIC per GPU = 12.5 GB/s, ~90% goodput
        inter_node_latency_us=20.0,
        devices_per_node=8,
    ),
    # NVIDIA H100-SXM5-80GB, 8 per DGX H100 node.
    "h100-nvlink": ClusterSpec(
        name="h100-nvlink",
        peak_flops_per_s=989e12,  # H100 SXM datasheet: 989 TFLOP/s dense BF16
        compute_efficiency=0.45,  # published Megatron/NeMo H100 GPT runs: 40-50% MFU
        hbm_bytes_per_s=3350 * GB,  # H100 SXM datasheet: 3.35 TB/s
        memory_efficiency=0.8,
        device_memory_bytes=80 * GIB,
        intra_node_bytes_per_s=360 * GB,  # NVLink4 900 GB/s bidir = 450/dir; NCCL busbw ~360
        intra_node_latency_us=6.0,
        inter_node_bytes_per_s=46 * GB,  # 8x NDR 400 Gb/s per node = 50 GB/s per GPU
        inter_node_latency_us=12.0,
        devices_per_node=8,
    ),
    # Huawei Ascend 910B (64 GB HBM), 8 per Atlas 800T A2 node, HCCS inside the node.
    "ascend-910b": ClusterSpec(
        name="ascend-910b",
        peak_flops_per_s=313e12,  # public reports of 910B FP16: ~313-376 TFLOP/s; lower bound
        compute_efficiency=0.45,  # reported MFU of Megatron-style training on 910B: 40-50%
        hbm_bytes_per_s=1600 * GB,  # reported HBM2e bandwidth 1.6 TB/s
        memory_efficiency=0.75,
        device_memory_bytes=64 * GIB,  # 910B: 64 GB HBM
        intra_node_bytes_per_s=50 * GB,  # HCCS 56 GB/s per link/dir (reported); ~90% goodput
        intra_node_latency_us=15.0,
        inter_node_bytes_per_s=22 * GB,  # 200 Gb/s RoCE per NPU = 25 GB/s, ~90% goodput
        inter_node_latency_us=20.0,
        devices_per_node=8,
    ),
}


def get_cluster(name: str) -> ClusterSpec:
    """Return a preset, or load a ClusterSpec JSON file (same keys as the dataclass)."""
    if name in CLUSTER_PRESETS:
        return CLUSTER_PRESETS[name]
    if Path(name).exists():
        return from_dict(ClusterSpec, read_json(name, "cluster JSON"), f"cluster file {name}")
    raise LynxError(f"unknown cluster {name!r}; use a preset ({', '.join(CLUSTER_PRESETS)}) "
                    f"or a cluster JSON file")
