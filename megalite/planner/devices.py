"""Device table: peak dense 16-bit TFLOP/s, memory and link bandwidths, all overridable.

Figures are the vendors' datasheet numbers for the SXM/OAM parts (dense, no sparsity), with
links as one direction per device: NVLink/xGMI inside a node, the per-GPU NIC (400 Gb/s
InfiniBand/RoCE = 50 GB/s on H100/H200/B200/MI300X nodes, 200 Gb/s on A100 nodes) across
nodes. ``mfu`` is the stated achievable fraction of peak for the model's matrix multiplies
(large dense GPT training reaches 0.4-0.55 on these parts); ``link_efficiency`` the fraction of
link bandwidth a ring collective reaches. Every field can be overridden from the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float
    """Dense bf16/fp16 tensor-core peak per device (fp32 models: half of it, TF32)."""
    memory_gib: float
    intra_node_gbps: float
    """GB/s per device, one direction, inside a node (NVLink / Infinity Fabric)."""
    inter_node_gbps: float
    """GB/s per device across nodes (its NIC)."""
    mfu: float = 0.5
    link_efficiency: float = 0.8
    latency_s: float = 2e-5
    """Fixed cost of one collective or point-to-point exchange."""
    op_overhead_s: float = 0.0
    """Fixed cost per kernel (launch / Python dispatch); matters only for tiny models."""
    cores_share: float = 1.0
    """Fraction of the device one rank gets (CPU ranks sharing cores)."""

    def with_overrides(self, **kwargs) -> Device:
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if v is not None})


DEVICES = {
    "h100": Device("H100 SXM 80GB", 989.0, 80.0, 450.0, 50.0),
    "h200": Device("H200 SXM 141GB", 989.0, 141.0, 450.0, 50.0),
    "a100": Device("A100 SXM 80GB", 312.0, 80.0, 300.0, 25.0),
    "b200": Device("B200 180GB", 2250.0, 180.0, 900.0, 50.0),
    "mi300x": Device("MI300X 192GB", 1307.0, 192.0, 448.0, 50.0),
}


def get_device(name: str) -> Device:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DEVICES:
        raise ValueError(f"--device {name!r}: unknown; known devices are {', '.join(DEVICES)}")
    return DEVICES[key]


def cpu_device(ranks: int = 1, cores: int | None = None) -> Device:
    """This CPU as a device, calibrated once here: fp32 matmul FLOP/s of one core and the
    fixed cost of one small op; `ranks` processes share `cores` (default: all) cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        a @ a
        n, start = 20, time.perf_counter()
        for _ in range(n):
            a @ a
        flops = 2 * 256**3 * n / (time.perf_counter() - start)
        x = torch.ones(1)
        start = time.perf_counter()
        for _ in range(2000):
            x = x + 1
        per_op = (time.perf_counter() - start) / 2000
    finally:
        torch.set_num_threads(threads)
    cores = cores or os.cpu_count() or 1
    return Device(
        name=f"CPU ({cores} cores, {ranks} ranks)",
        peak_tflops=2 * flops / 1e12,  # "16-bit peak" convention: fp32 runs at half of it
        memory_gib=0.0,
        intra_node_gbps=2.0,
        inter_node_gbps=2.0,
        mfu=1.0,
        link_efficiency=1.0,
        op_overhead_s=per_op,
        cores_share=min(1.0, cores / ranks),
    )
