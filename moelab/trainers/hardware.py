"""Device facts for throughput accounting: the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import functools
import os
import time

import torch

# Dense (no sparsity) peak tensor-core rates, bf16, from the vendors' data sheets.
_CUDA_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak(threads: int, n: int = 512, budget_s: float = 0.25) -> float:
    """The fp32 GEMM rate of this CPU at `threads` threads: the practical ceiling on CPU. The best of many
    repeats over `budget_s`, so a moment of load from other processes does not lower it (and inflate MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, start = float("inf"), time.perf_counter()
    for i in range(1000):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        if i >= 5 and time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU. $MOELAB_PEAK_FLOPS overrides; CPU uses a measured fp32 GEMM rate."""
    if os.environ.get("MOELAB_PEAK_FLOPS"):
        return float(os.environ["MOELAB_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _CUDA_PEAK_BF16.items():
            if key in name:
                return value
        return 312e12
    return _measured_cpu_peak(torch.get_num_threads())
