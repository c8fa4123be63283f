"""Coverage of `moelab fit`'s intervals on the truth harness (moelab.ablations.truth): bias and 95% coverage.

    python bench/coverage_bench.py --replicates 200 --n-boot 100 --workers 2 [--out bench/out/coverage.jsonl]

Each replicate draws a world (default `World()`: dense 5 sizes x 3 budgets, four MoE families at 4 sizes x 2
budgets, 3 seeds, seed and step noise), runs the analysis on its trials exactly as `moelab fit` would, and
compares every figure with the world's answer:

* per trial: parameter and compute leverage (truth: the noise-free loss's leverage);
* per size: geometric mean over seeds (same truth);
* per family: efficiency leverage at the stated budgets (truth: the family law's exact EL there);
* effect differences of both design axes on the final loss (truth: mean noise-free difference over blocks).

Bias is the mean of log(estimate / truth) (a relative bias for small values). One JSON line per replicate
goes to --out as it finishes, so an interrupted run keeps what it measured; the table is printed at the end
(markdown, for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import pandas as pd

from moelab.ablations.analysis import analyse_trials
from moelab.ablations.truth import EXPERTS_AXIS, NOISE_AXIS, World, world_trials


def replicate(args: tuple[int, int]) -> dict:
    seed, n_boot = args
    rows, _, truth = world_trials(World(), seed=seed)
    a = analyse_trials(pd.DataFrame(rows), sweep="truth", n_boot=n_boot, seed=seed)
    out: dict = {"seed": seed}
    t = a.trials.merge(truth.trials[["trial_id", "parameter_leverage", "compute_leverage"]], on="trial_id",
                       suffixes=("", "_true"))
    m = t[t["family"] == "moe"]
    for kind in ("parameter", "compute"):
        true = m[f"{kind}_leverage_true"].to_numpy(float)
        out[f"trial_{kind}_cover"] = float(np.mean((m[f"{kind}_leverage_lo"] <= true) & (true <= m[f"{kind}_leverage_hi"])))
        out[f"trial_{kind}_logbias"] = float(np.mean(np.log(m[f"{kind}_leverage"] / true)))
    sl = a.size_leverage
    cell_truth = m.groupby(["group", "N", "D"])[["parameter_leverage_true", "compute_leverage_true"]].first()
    sl = sl.join(cell_truth, on=["group", "N", "D"])
    for kind in ("parameter", "compute"):
        true = sl[f"{kind}_leverage_true"].to_numpy(float)
        out[f"size_{kind}_cover"] = float(np.mean((sl[f"{kind}_leverage_lo"] <= true) & (true <= sl[f"{kind}_leverage_hi"])))
        out[f"size_{kind}_logbias"] = float(np.mean(np.log(sl[f"{kind}_leverage"] / true)))
    fl = a.family_leverage
    true = np.array([truth.family_leverage(g, c)[0] for g, c in zip(fl["group"], fl["at_compute"])])
    hit = (fl["leverage_lo"].to_numpy() <= true) & (true <= fl["leverage_hi"].to_numpy())
    head = fl["headline"].to_numpy(bool)
    out["family_cover"] = float(hit.mean())
    out["family_headline_cover"] = float(hit[head].mean())
    out["family_logbias"] = float(np.mean(np.log(fl["leverage"].to_numpy() / true)))
    out["family_max_relerr"] = float(np.max(np.abs(fl["leverage"].to_numpy() / true - 1)))
    covers = []
    for (axis, value, base), diff in truth.effects.items():
        e = a.effects[axis]["final eval_loss"].loc[value]
        covers.append(bool(e["diff_lo"] <= diff <= e["diff_hi"]))
        out[f"effect_{axis}_err"] = float(e["diff"] - diff)
    out["effect_cover"] = float(np.mean(covers))
    return out


def table(results: list[dict]) -> str:
    df = pd.DataFrame(results)
    lines = ["| figure | 95% interval coverage | mean log bias (est / truth) |", "| --- | --- | --- |"]
    for label, cover, bias in (
            ("per-trial parameter leverage", "trial_parameter_cover", "trial_parameter_logbias"),
            ("per-trial compute leverage", "trial_compute_cover", "trial_compute_logbias"),
            ("per-size parameter leverage (geo-mean over seeds)", "size_parameter_cover", "size_parameter_logbias"),
            ("per-size compute leverage (geo-mean over seeds)", "size_compute_cover", "size_compute_logbias"),
            ("family efficiency leverage, all budgets", "family_cover", "family_logbias"),
            ("family efficiency leverage, headline budget", "family_headline_cover", None),
            ("effect differences (both design axes, final loss)", "effect_cover", None)):
        b = f"{df[bias].mean():+.2%}" if bias else "-"
        lines.append(f"| {label} | {df[cover].mean():.1%} | {b} |")
    lines.append(f"\n{len(df)} replicates; largest family-leverage error in any replicate: "
                 f"{df['family_max_relerr'].max():.1%} (median over replicates of the largest: "
                 f"{df['family_max_relerr'].median():.1%}).")
    for axis in (EXPERTS_AXIS, NOISE_AXIS):
        col = f"effect_{axis}_err"
        lines.append(f"effect of {axis}: mean error {df[col].mean():+.4f}, sd {df[col].std():.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--out", default="bench/out/coverage.jsonl")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    t0, results = time.time(), []
    jobs = [(args.first_seed + i, args.n_boot) for i in range(args.replicates)]
    with open(args.out, "a") as fh, mp.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(replicate, jobs):
            results.append(r)
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            if len(results) % 10 == 0:
                print(f"{len(results)}/{args.replicates} replicates, {time.time() - t0:.0f} s", file=sys.stderr)
    print(table(results))
    print(f"\nwall {time.time() - t0:.0f} s, n_boot {args.n_boot}, {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
