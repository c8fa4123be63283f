"""Controller overhead: the wall time of a sweep of 8 tiny trials against the sum of their training times.

A sweep of 8 `moe-tiny` trials (top_k 1/2 x 4 seeds, synthetic data, `--steps` steps of 16 x 64 tokens, a
row every 10 steps, checkpoints every `--ckpt-every`) runs through `run_sweep` on a fresh local Ray with
`--cpus` CPUs, once per `--cpus-per-worker` value (1 worker per trial; concurrency = CPUs / that). For each:

  * sweep wall: `run_sweep` from call to return (Tune, 8 Ray Train runs, the store), Ray's start excluded;
  * training: each trial's `wall_s` (the Trainer's own clock: steps, eval, checkpoints; no process start);
  * trial span: from the sink's `running` to its `finished` line (Tune trial start to end);
  * overhead per trial = (sweep wall x concurrency - sum of training) / trials: what a slot spends per
    trial on anything but training (process and actor start-up, imports, placement groups, reporting).

    OMP_NUM_THREADS=1 python bench/controller_bench.py [--steps 60] [--cpus 2] [--cpus-per-worker 1 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray (see tests/conftest.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from moelab.platform.spec import parse_spec  # noqa: E402


def spec_doc(steps: int, ckpt_every: int, cpus_per_worker: float) -> dict:
    return {"name": "bench", "common": {"data.source": "synthetic", "train.steps": steps, "train.log_every": 10,
                                        "train.eval_every": 0, "train.ckpt_every": ckpt_every},
            "base": {"preset": "moe-tiny"}, "axes": {"model.moe.top_k": [1, 2]}, "seeds": [0, 1, 2, 3],
            "resources": {"workers": 1, "cpus_per_worker": cpus_per_worker}}


def one(steps: int, ckpt_every: int, cpus: int, cpus_per_worker: float) -> dict:
    import ray

    import moelab.results as mr
    from moelab.platform.controller import run_sweep

    root = tempfile.mkdtemp(prefix="controller-bench-")
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    marks: dict[str, dict[str, float]] = {}

    def log(msg: str) -> None:
        tid, _, what = msg.partition(": ")
        marks.setdefault(tid, {})[what.split()[0].rstrip(",")] = time.perf_counter()

    try:
        report = run_sweep(parse_spec(spec_doc(steps, ckpt_every, cpus_per_worker)), storage=root, log=log)
    finally:
        ray.shutdown()
    trials = mr.open(root).trials("bench")
    assert (trials.status == "finished").all(), trials[["trial_id", "status", "error"]]
    train = trials["wall_s"].tolist()
    spans = [m["finished"] - m["running"] for tid, m in marks.items() if "running" in m and "finished" in m]
    n, conc = len(train), report.max_concurrent
    return {"cpus_per_worker": cpus_per_worker, "concurrency": conc, "trials": n, "ray_start_s": ray_start,
            "sweep_wall_s": report.wall_s, "train_sum_s": sum(train), "train_mean_s": statistics.mean(train),
            "span_mean_s": statistics.mean(spans), "overhead_per_trial_s": (report.wall_s * conc - sum(train)) / n,
            "train_share": sum(train) / (report.wall_s * conc)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    rows = [one(a.steps, a.ckpt_every, a.cpus, c) for c in a.cpus_per_worker]
    print(f"8 x moe-tiny, {a.steps} steps x 1,024 tokens, {a.cpus} CPUs, {platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print("| CPUs/worker | concurrent | sweep wall (s) | sum of training (s) | mean training (s) | mean trial span (s) "
          "| overhead/trial (s) | training share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['cpus_per_worker']:g} | {r['concurrency']} | {r['sweep_wall_s']:.1f} | {r['train_sum_s']:.1f} | "
              f"{r['train_mean_s']:.2f} | {r['span_mean_s']:.1f} | {r['overhead_per_trial_s']:.1f} | "
              f"{r['train_share']:.0%} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
