"""Results-store throughput: write rows/s through `Store.append_metrics` and read time of
`moelab.results.open(root).metrics()` for 1,000 trials x 2,000 logged steps (2M metric rows).

Two write paths:
  * rows: the sink's path, a list of metric dicts per call (what the training loop logs), timed on the
    store calls only (building the dicts is the producer's cost);
  * columns: numpy columns per trial (the synthetic fixture's path).
Both flush every `--batch-rows` rows per trial to one Parquet file (snappy), atomically. The values are
random: incompressible, the worst case for size and decode time.

    python bench/store_bench.py [--trials 1000 --steps 2000 --batch-rows 1000 --root DIR] [--compact]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moelab.results as mr  # noqa: E402
from moelab.platform.store import METRIC_COLUMNS, Store  # noqa: E402


def columns_for(rng: np.random.Generator, steps: np.ndarray) -> dict[str, np.ndarray]:
    n = len(steps)
    cols = {k: rng.random(n) for k in METRIC_COLUMNS if k not in ("step", "tokens")}
    cols["step"], cols["tokens"] = steps, steps * 1024
    cols["eval_loss"] = np.where(steps % 500 == 0, cols["eval_loss"], np.nan)
    return cols


def write(root: str, n_trials: int, n_steps: int, batch_rows: int, mode: str) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    steps = np.arange(1, n_steps + 1, dtype=np.int64) * 10
    store = Store(root, batch_rows=batch_rows, flush_s=float("inf"))
    spent = 0.0
    for i in range(n_trials):
        cols = columns_for(rng, steps)
        tid = f"trial-{i:05d}"
        if mode == "rows":
            keys = list(cols)
            rows = [dict(zip(keys, vals)) for vals in zip(*(cols[k].tolist() for k in keys))]
            rows = [{k: v for k, v in r.items() if not (k == "eval_loss" and v != v)} for r in rows]
            t = time.perf_counter()
            for start in range(0, n_steps, 100):  # the sink hands over ~100 rows at a time
                store.append_metrics("bench", tid, 0, rows[start:start + 100])
        else:
            t = time.perf_counter()
            for start in range(0, n_steps, batch_rows):
                store.append_metrics("bench", tid, 0, {k: v[start:start + batch_rows] for k, v in cols.items()})
        store.flush("bench", tid)
        spent += time.perf_counter() - t
        store.write_trial({"sweep": "bench", "trial_id": tid, "status": "finished", "seed": i % 2})
    return spent, store.files_written


def reads(root: str) -> None:
    r = mr.open(root)
    n_files = sum(len(fs) for _, _, fs in os.walk(os.path.join(root, "metrics")))
    for label, fn in [("metrics()", lambda: r.metrics()),
                      ("metrics(columns=['loss'])", lambda: r.metrics(columns=["loss"])),
                      ("metrics(trials=[one])", lambda: r.metrics(trials=["trial-00007"])),
                      ("trials()", lambda: r.trials()),
                      ("sql(min loss per trial)", lambda: r.sql("SELECT trial_id, min(loss) FROM metrics GROUP BY 1"))]:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            df = fn()
            times.append(time.perf_counter() - t)
        print(f"read {label} ({n_files} metrics files): {min(times):.2f} s (best of 3), {len(df):,} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-rows", type=int, default=1000)
    ap.add_argument("--root", default=None, help="store root (default: a temp dir, removed after)")
    ap.add_argument("--modes", nargs="+", default=["rows", "columns"])
    ap.add_argument("--compact", action="store_true", help="then Store.compact() and read again")
    a = ap.parse_args()
    tmp = a.root or tempfile.mkdtemp(prefix="moelab-store-bench-")
    n_rows = a.trials * a.steps
    print(f"# store bench: {a.trials} trials x {a.steps} steps = {n_rows:,} metric rows, batch {a.batch_rows} rows; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    try:
        for mode in a.modes:
            root = os.path.join(tmp, mode)
            shutil.rmtree(root, ignore_errors=True)
            spent, files = write(root, a.trials, a.steps, a.batch_rows, mode)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
            print(f"write[{mode}]: {spent:.1f} s, {n_rows / spent:,.0f} rows/s, {files} files, {size / 1e6:.0f} MB")
        root = os.path.join(tmp, a.modes[-1])
        reads(root)
        if a.compact:
            t = time.perf_counter()
            removed = Store(root).compact("bench")
            print(f"compact: {time.perf_counter() - t:.1f} s, {removed} files merged away")
            reads(root)
    finally:
        if a.root is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
