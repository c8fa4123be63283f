"""Throughput of one training run on CPU: tokens/s and MFU of `moe-small` (and `small` for comparison).

MFU is measured against this CPU's fp32 GEMM rate (moelab.trainers.hardware.peak_flops), so it reads as
"share of what the matmul units can do", the same yardstick as bench/moe_experts_cpu.py.

    OMP_NUM_THREADS=2 python bench/train_cpu.py [--steps 30 --presets moe-small small]
"""

import argparse
import json
import statistics
import tempfile

import torch

from moelab.trainers.config import load_run_config
from moelab.trainers.hardware import peak_flops
from moelab.trainers.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--presets", nargs="+", default=["moe-small", "small"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peak = peak_flops(torch.device("cpu"))
    print(f"CPU fp32 GEMM rate (MFU denominator): {peak / 1e9:.1f} GFLOP/s, {a.threads} threads")
    print("| preset | active params | tokens/s | MFU | final loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in a.presets:
        with tempfile.TemporaryDirectory() as tmp:
            rc = load_run_config(name, {"train.steps": a.steps, "train.log_every": 5, "train.eval_every": 0,
                                        "train.ckpt_every": 0})
            train(rc, tmp, progress=False)
            rows = [json.loads(l) for l in open(f"{tmp}/metrics.jsonl")][1:]  # first window includes warm-up
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        mfu = statistics.median(r["mfu"] for r in rows)
        print(f"| {name} | {rc.model.param_counts()['active'] / 1e6:.2f}M | {tps:,.0f} | {mfu:.1%} | "
              f"{rows[-1]['loss']:.3f} |")


if __name__ == "__main__":
    main()
