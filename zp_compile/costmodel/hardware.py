"""Hardware profiles: peak FLOP/s, memory, and link bandwidths of one accelerator, built in or measured
on this CPU (``measure_cpu``). Bandwidths are bytes/s in one direction."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

GB = 1e9  # spec sheets use decimal gigabytes


@dataclass(frozen=True)
class Hardware:
    """One accelerator. Bandwidths are bytes/s in ONE direction (spec sheets quote both directions)."""

    name: str
    peak_flops: float  # dense tensor-core FLOP/s at the weight dtype (no 2:4 sparsity)
    attention_flops: float  # FLOP/s of attention's score/value matmuls: BF16 even for FP8 weights
    weight_bytes: int  # bytes per quantisable weight (attention, MLP, experts): 2 BF16, 1 FP8
    memory_bytes: float  # HBM capacity
    memory_bw: float  # HBM bandwidth; reported only: at prefill batch sizes weight reads take <1/10 of compute
    nvlink_bw: float  # GPU-to-GPU link per GPU
    pcie_bw: float  # host link (x16), used for hybrid offload and for --link pcie
    hop_latency_s: float = 5e-6  # per ring step of a collective

    def link_bw(self, link: str) -> float:
        if link not in ("nvlink", "pcie"):
            raise ValueError(f"link must be 'nvlink' or 'pcie', got {link!r}")
        return self.nvlink_bw if link == "nvlink" else self.pcie_bw


def _gpu(name, peak, attn, wbytes, mem_gb, mem_tbs, nvlink_gbs, pcie_gbs) -> Hardware:
    return Hardware(name, peak * 1e12, attn * 1e12, wbytes, mem_gb * GB, mem_tbs * 1e12, nvlink_gbs * GB, pcie_gbs * GB)


# NVIDIA data sheets, SXM parts, dense figures (the sheets' headline TFLOPS assume 2:4 sparsity; halved here).
# A100 80GB SXM: BF16 312 TFLOPS, HBM2e 2,039 GB/s, NVLink 3 600 GB/s bidirectional, PCIe Gen4 x16 64 GB/s
#   bidirectional. No FP8 tensor cores, hence no a100-fp8.
# H100 80GB SXM5: BF16 989 / FP8 1,979 TFLOPS, HBM3 3.35 TB/s, NVLink 4 900 GB/s, PCIe Gen5 128 GB/s.
# H200 141GB SXM: H100's compute and links, HBM3e 141 GB at 4.8 TB/s.
# Attention stays BF16 in FP8 deployments (vLLM's default FP8 path quantises the linear layers only).
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        _gpu("a100-bf16", 312, 312, 2, 80, 2.039, 300, 32),
        _gpu("h100-bf16", 989, 989, 2, 80, 3.35, 450, 64),
        _gpu("h100-fp8", 1979, 989, 1, 80, 3.35, 450, 64),
        _gpu("h200-bf16", 989, 989, 2, 141, 4.8, 450, 64),
        _gpu("h200-fp8", 1979, 989, 1, 141, 4.8, 450, 64),
    )
}


def cpu_hardware(matmul_flops: float, copy_bw: float, memory_bytes: float | None = None, ranks: int = 1) -> Hardware:
    """A CPU "device" from measured numbers (see ``measure_cpu``), one of ``ranks`` sharing the machine's RAM.
    BF16 weights (these CPUs have AMX). The link is the memory-copy bandwidth, an upper bound: docs/platform.md
    measured gloo's all_gather between two local ranks at 0.17-0.27 GB/s (override: --link-gbps)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", matmul_flops, matmul_flops, 2, memory_bytes / ranks, copy_bw, copy_bw, copy_bw, hop_latency_s=50e-6)


def _rate(fn, work: float, budget: float, device=None) -> float:
    """``work`` units per second of ``fn``, run repeatedly for about ``budget`` seconds after a warm-up.
    On an accelerator the device is synchronised before the clock starts and before it stops (the host
    clock alone would time the launches, not the work)."""
    import torch

    from ..devices import synchronize

    device = torch.device(device or "cpu")
    fn()  # warm-up: the first call allocates and picks kernels
    synchronize(device)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget or n == 0:
        fn()
        n += 1
        if device.type != "cpu" and n % 8 == 0:
            synchronize(device)  # the host must not run ahead by more than a few matmuls
    synchronize(device)
    return work * n / (time.perf_counter() - start)


def matmul_size(device) -> int:
    """The square matmul ``measure_matmul_flops`` times: 1024 on a CPU; 8192 on an accelerator, where a
    1024^3 matmul takes microseconds and measures the launch, not the peak."""
    import torch

    return 1024 if torch.device(device or "cpu").type == "cpu" else 8192


def measure_matmul_flops(dtype=None, seconds: float = 0.5, device=None) -> float:
    """FLOP/s of a square matmul of ``dtype`` (default bf16) on ``device`` (default: this CPU), timed for
    about ``seconds``."""
    import torch

    n = matmul_size(device)
    a = torch.randn(n, n, dtype=dtype or torch.bfloat16, device=device or "cpu")
    return _rate(lambda: a @ a, 2 * n**3, seconds, device)


def rank_threads(ranks: int) -> tuple[int, float]:
    """Threads one of ``ranks`` CPU ranks gets out of this process's torch threads (torch's default: one
    per physical core; OMP_NUM_THREADS overrides), and the share of a thread's rate it keeps: below one
    thread per rank, ranks time-share a core (2 ranks on 1 thread: 0.5)."""
    import torch

    total = torch.get_num_threads()
    return max(1, total // ranks), min(1.0, total / ranks)


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block and restored after (a process-wide setting)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_cpu(seconds: float = 1.0, ranks: int = 1) -> Hardware:
    """Time a BF16 matmul and a 16 MB tensor copy on this machine, about ``seconds`` in all (< 5 s). The
    matmul runs on one rank's threads (``rank_threads``): ranks on one CPU split its cores, as they split its RAM."""
    import torch

    threads, share = rank_threads(ranks)
    src, dst = torch.empty(2**24, dtype=torch.uint8), torch.empty(2**24, dtype=torch.uint8)
    with _torch_threads(threads):
        flops = measure_matmul_flops(torch.bfloat16, seconds / 2) * share
    copy = _rate(lambda: dst.copy_(src), 2**24, seconds / 2)
    return cpu_hardware(flops, copy, ranks=ranks)


def hardware(name: str) -> Hardware:
    """A built-in profile by name; ``cpu`` is measured now."""
    if name == "cpu":
        return measure_cpu()
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[name]
