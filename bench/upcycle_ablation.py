"""First small-scale look at the source documents' upcycling claims (noise level, partial reset), on CPU.

Trains one dense model on `synthetic`, upcycles it into an MoE with every (noise_std, reset_ratio) pair,
continues each for the same token budget with several seeds, and prints the final eval loss per setting
(mean and spread over seeds), plus a from-scratch MoE and the continued dense model as references.

    OMP_NUM_THREADS=2 python bench/upcycle_ablation.py [--dense-steps 300 --moe-steps 150 --seeds 0 1]
"""

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import torch

from moelab.trainers.config import load_run_config
from moelab.trainers.loop import train
from moelab.trainers.upcycle import initial_model

COMMON = {"train.seq_len": 64, "train.batch_size": 16, "train.eval_every": 0, "train.eval_batches": 16,
          "train.ckpt_every": 0, "optim.warmup_steps": 10}


def run(preset: str, out: Path, steps: int, extra: dict) -> float:
    rc = load_run_config(preset, {**COMMON, "train.steps": steps, "train.log_every": steps, **extra})
    return train(rc, out, progress=False, model=initial_model(rc))["eval_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="small")
    ap.add_argument("--moe", default="moe-small")
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--moe-steps", type=int, default=150)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 1e-6, 1e-3, 1e-2])
    ap.add_argument("--reset", type=float, nargs="+", default=[0.0, 0.05, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", type=float, default=1e-3, help="continued-training peak LR")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="upcycle-ablation-"))
    dense_dir = root / "dense"
    dense_loss = run(a.dense, dense_dir, a.dense_steps, {})
    cont = {"optim.lr": a.lr, "optim.expert_lr_fraction": 1.0}
    results: dict[str, list[float]] = {}
    for seed in a.seeds:
        results.setdefault("dense, continued", []).append(
            run(a.dense, root / f"dense-cont-{seed}", a.moe_steps,
                {**cont, "train.seed": seed, "upcycle.source": str(dense_dir)}))
        results.setdefault("MoE from scratch", []).append(
            run(a.moe, root / f"scratch-{seed}", a.moe_steps, {**cont, "train.seed": seed}))
        for noise, reset in itertools.product(a.noise, a.reset):
            key = f"noise {noise:g}, reset {reset:g}"
            results.setdefault(key, []).append(run(a.moe, root / f"up-{noise}-{reset}-{seed}", a.moe_steps, {
                **cont, "train.seed": seed, "upcycle.source": str(dense_dir), "upcycle.noise_std": noise,
                "upcycle.reset_ratio": reset, "upcycle.seed": seed}))
            print(json.dumps({"setting": key, "seed": seed, "eval_loss": results[key][-1]}), flush=True)
    print(f"\ndense {a.dense} after {a.dense_steps} steps: eval loss {dense_loss:.4f}; each row below continues "
          f"for {a.moe_steps} steps x {COMMON['train.batch_size'] * COMMON['train.seq_len']} tokens, seeds {a.seeds}")
    print("| setting | eval loss (mean) | spread (max - min) |")
    print("| --- | ---: | ---: |")
    for key, losses in results.items():
        print(f"| {key} | {statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} |")


if __name__ == "__main__":
    main()
