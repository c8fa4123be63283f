"""Device facts for throughput accounting: the peak FLOP/s that MFU is measured against.

GPUs: a table of dense (no structured sparsity) bf16 tensor-core peaks with fp32 accumulation, from the
vendors' data sheets, keyed by the names `torch.cuda.get_device_name` returns. Form factors are told apart:
the same chip runs at different clocks and power as SXM, PCIe or NVL board, so "NVIDIA H100 PCIe" is not an
"NVIDIA H100 80GB HBM3" (SXM). A name the table does not know gets no peak (`peak_flops_for` -> None), and
MFU is then not reported rather than measured against a guess: set $MOELAB_PEAK_FLOPS (FLOP/s per device)
for such a GPU. CPUs: the measured fp32 GEMM rate of this machine, the practical ceiling there.
"""

from __future__ import annotations

import functools
import os
import re
import time
import warnings

import torch

from moelab.trainers.config import ConfigError

PEAK_ENV = "MOELAB_PEAK_FLOPS"

# Dense bf16 tensor FLOP/s per GPU (fp32 accumulate), from NVIDIA's data sheets: the sparse figure the sheets
# lead with, halved. model -> {form factor: peak}; a model sold in one form has the single key "".
# Form factors: "SXM" (also the default when a name names none: "NVIDIA H100 80GB HBM3" and "NVIDIA H200" are
# the SXM parts), "PCIE", "NVL".
GPU_PEAK_BF16: dict[str, dict[str, float]] = {
    "B200": {"": 2250e12},  # HGX B200: 4.5 PFLOPS sparse per GPU
    "GB200": {"": 2500e12},  # GB200 NVL72: 5 PFLOPS sparse per GPU
    "H200": {"SXM": 989e12, "NVL": 835e12},  # H200 SXM 1,979 / H200 NVL 1,671 TFLOPS sparse
    "GH200": {"": 989e12},  # Grace Hopper: the H100 SXM tensor rate
    "H100": {"SXM": 989e12, "PCIE": 756e12, "NVL": 835e12},  # 1,979 / 1,513 / 1,671 TFLOPS sparse
    "H800": {"SXM": 989e12, "PCIE": 756e12},  # export variants of H100: same tensor rate, less NVLink
    "H20": {"": 148e12},
    "A100": {"SXM": 312e12, "PCIE": 312e12},  # both forms: 624 TFLOPS sparse
    "A800": {"SXM": 312e12, "PCIE": 312e12},
    "A30": {"": 165e12},
    "A40": {"": 149.7e12},
    "A10": {"": 125e12},
    "L40S": {"": 362e12},  # 733 TFLOPS sparse
    "L40": {"": 181e12},  # 362 TFLOPS sparse
    "L4": {"": 121e12},  # 242 TFLOPS sparse
    "RTX 4090": {"": 165.2e12},  # Ada whitepaper: BF16 with FP32 accumulate, 165.2 dense / 330.4 sparse
}

# Tokens of a device name that describe the board, not the chip: memory size and type, form factor.
_DESCRIPTOR = re.compile(r"^(\d+GB|HBM\d*E?|SXM\d*|PCIE|NVL)$")


def _tokens(name: str) -> list[str]:
    """'NVIDIA A100-SXM4-80GB' -> ['A100', 'SXM4', '80GB']; vendor and product-line words dropped."""
    words = re.split(r"[\s\-_]+", name.strip().upper())
    return [w for w in words if w and w not in ("NVIDIA", "GEFORCE", "TESLA")]


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU `torch.cuda.get_device_name` calls `device_name`; None when the
    table does not know it. The chip must match a table entry word for word ("L40" is neither "L4" nor
    "L40S"), and every other word must describe the board (memory, form factor): "RTX 4090 D", a cut-down
    chip, is not an "RTX 4090"."""
    tokens = _tokens(device_name)
    for model, forms in sorted(GPU_PEAK_BF16.items(), key=lambda kv: -len(kv[0].split())):
        head = model.split()
        if tokens[:len(head)] != head:
            continue
        rest = tokens[len(head):]
        if not all(_DESCRIPTOR.match(w) for w in rest):
            return None
        if "" in forms:
            return forms[""]
        form = "PCIE" if "PCIE" in rest else "NVL" if "NVL" in rest else "SXM"
        return forms.get(form)
    return None


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak(threads: int, n: int = 512, budget_s: float = 0.25) -> float:
    """The fp32 GEMM rate of this CPU at `threads` threads: the practical ceiling on CPU. The best of repeated
    products, so that a moment of load from other processes does not lower it (and inflate MFU). It stops
    once, after at least 20 products, four have run within 1% of the fastest (the fastest seen again: about
    60 ms on an idle machine), else after `budget_s`. Against the best over a fixed 0.25 s, interleaved on the
    2-core machine (bench/cpu_peak_bench.py): 1.2% lower in the median, 1.6% at the 10th percentile, 6% in the
    worst of 30 (MFU that much higher), in a quarter of the time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(1000):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
        if i >= 19 and sum(x <= min(times) * 1.01 for x in times) >= 4:
            break
        if i >= 5 and time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / min(times)


_warned: set[str] = set()  # device names already warned about: one warning per process and name


def _env_peak() -> float | None:
    raw = os.environ.get(PEAK_ENV)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"${PEAK_ENV}: got {raw!r}; allowed: a positive number of FLOP/s per device (e.g. 989e12)")
    return value


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one `device` for MFU: $MOELAB_PEAK_FLOPS if set; a GPU from `GPU_PEAK_BF16`; a CPU's
    measured fp32 GEMM rate. None for a GPU the table does not know (warned once per process): MFU is then
    not reported."""
    env = _env_peak()
    if env is not None:
        return env
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for(name)
        if peak is None and name not in _warned:
            _warned.add(name)
            warnings.warn(f"MFU not reported: no peak FLOP/s known for GPU {name!r} (moelab.trainers.hardware."
                          f"GPU_PEAK_BF16). Set ${PEAK_ENV} to its dense bf16 FLOP/s to report MFU.", stacklevel=2)
        return peak
    return _measured_cpu_peak(torch.get_num_threads())
