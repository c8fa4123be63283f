"""Benchmark (issue 7): full Chinchilla fit + 1,000 bootstrap resamples on Epoch's 240 points.

Target: under 60 s on 2 CPU cores. Run from the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python bench/fits_bench.py [--n-boot 1000] [--repeats 1]

Prints the wall time of the grid search and of the whole call, the fitted parameters and the 95% bootstrap
intervals next to Epoch AI's replication values (refs.md, "Scaling laws").
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from moelab.ablations.fits import fit_chinchilla

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_epoch.csv"
EPOCH = {"E": 1.817, "A": 477.8, "B": 2143.0, "alpha": 0.347, "beta": 0.367}
EPOCH_CI = {"E": (1.769, 1.871), "alpha": (0.317, 0.373), "beta": (0.331, 0.415)}


def load_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N, D = C / (6 N), L of shape (240,): the csv without its 5 highest losses."""
    df = pd.read_csv(DATA).sort_values("loss").iloc[:-5]
    N = df["Model Size"].to_numpy()
    return N, df["Training FLOP"].to_numpy() / (6 * N), df["loss"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    N, D, L = load_points()
    print(f"points={len(L)} n_boot={args.n_boot} cpus={os.cpu_count()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for _ in range(args.repeats):
        start = time.perf_counter()
        fit_chinchilla(N, D, L)
        grid_s = time.perf_counter() - start
        start = time.perf_counter()
        fit = fit_chinchilla(N, D, L, n_boot=args.n_boot, seed=0)
        total_s = time.perf_counter() - start
        print(f"grid_only_seconds={grid_s:.2f} fit_plus_bootstrap_seconds={total_s:.2f}")
    for name, ref in EPOCH.items():
        lo, hi = fit.intervals[name] if fit.intervals else (float("nan"), float("nan"))
        epoch_ci = EPOCH_CI.get(name)
        note = f"  Epoch CI ({epoch_ci[0]}, {epoch_ci[1]})" if epoch_ci else ""
        print(f"{name:>5} = {getattr(fit, name):10.4f}  (Epoch {ref})  95% CI ({lo:.4f}, {hi:.4f}){note}")
    print(f"objective={fit.objective:.6e}")


if __name__ == "__main__":
    main()
