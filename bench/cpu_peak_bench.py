"""The CPU peak that MFU is measured against (`moelab.trainers.hardware._measured_cpu_peak`): its stopping rule
against the fixed 0.25 s budget it replaced, interleaved in one process so that both see the same load.

Each round runs, back to back, the best of 512 x 512 fp32 GEMMs (1 thread) under each rule: `budget` (the best
over 0.25 s), `rule` (the shipped function: stop once, after at least 20 products, four ran within 1% of the
fastest; 0.25 s at most). Prints median, 10th percentile and minimum of the rate (a low rate overstates MFU)
and the median and largest time taken.

    OMP_NUM_THREADS=1 python bench/cpu_peak_bench.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from moelab.trainers.hardware import _measured_cpu_peak  # noqa: E402


def budget_only(n: int = 512, budget_s: float = 0.25) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, start = float("inf"), time.perf_counter()
    while True:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            return 2 * n**3 / best


def rule() -> float:
    _measured_cpu_peak.cache_clear()
    return _measured_cpu_peak(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    out: dict[str, list[tuple[float, float]]] = {"budget": [], "rule": []}
    for _ in range(a.rounds):
        for name, fn in (("budget", budget_only), ("rule", rule)):
            t = time.perf_counter()
            rate = fn()
            out[name].append((rate / 1e9, time.perf_counter() - t))
    print(f"{a.rounds} rounds, 1 thread, {time.strftime('%Y-%m-%d')}")
    print("| rule | GFLOP/s median | 10th percentile | min | time median (s) | time max (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in out.items():
        v = sorted(r[0] for r in rows)
        t = [r[1] for r in rows]
        print(f"| {name} | {statistics.median(v):.1f} | {v[len(v) // 10]:.1f} | {v[0]:.1f} | "
              f"{statistics.median(t):.3f} | {max(t):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
