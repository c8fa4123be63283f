"""Controller overhead, both trial paths: the same 8 tiny trials inside their Tune trials and as Ray Train runs.

A sweep of 8 `moe-tiny` trials (top_k 1/2 x 4 seeds, synthetic data, `--steps` steps of 16 x 64 tokens, a
row every 10 steps, checkpoints every `--ckpt-every`) runs through `run_sweep` on a fresh local Ray with
`--cpus` CPUs, once per path (`tune`: a 1-worker trial trains inside its Tune trial, the default; `train`:
`resources.ray_train`, a Ray Train run per trial) and per `--cpus-per-worker` value (1 worker per trial;
concurrency = CPUs / that). For each:

  * sweep wall: `run_sweep` from call to return (Tune, the trials, the store), Ray's start excluded;
  * training: each trial's `wall_s` (the Trainer's own clock: steps, eval, checkpoints, reports; no process
    start, imports or model build);
  * overhead per trial, median: a trial's span (the sink's `running` to its `finished`, in the driver) minus
    its training time: start-up, imports, model build, the end of the run;
  * slot overhead per trial: (sweep wall x concurrency - sum of training) / trials: all a slot spends on
    anything but training, the gaps between trials and the sweep's start and end included;
  * training share: sum of training / (sweep wall x concurrency); also counted from Ray's start, and of the
    whole command (the parent's clock around the fresh Python process that runs the sweep: interpreter,
    imports, Ray's start, the sweep, Ray's shutdown: what `time moelab sweep` would show);
  * first trial running at: from the call of `run_sweep` to the first trial's `running` line (its Tune
    actor has started and called the trainable); fresh worker processes: workers Ray started for the
    sweep (the trial actors of the `tune` path start in the ones Ray prestarted).

Paths: `tune` starts Ray as `moelab sweep` does (`controller.init_local_ray(warm=True)`: Ray's prestarted worker
processes import ray.tune, torch and the trainer once connected, and the trial actors start in them);
`tune-cold` the same trials on a Ray started without warm workers (the trial actors start in Ray's prestarted
worker processes, which import ray.tune, torch and the trainer only when their first trial starts); `train`
Ray Train runs. Each path runs in a fresh Python process. Its driver imports ray.tune before it starts Ray, as
`moelab sweep` does (`--driver-imports before`), or leaves it to `run_sweep` (`inside`: a script that calls
it); the share of the whole command counts it either way.

    OMP_NUM_THREADS=1 python bench/controller_bench.py [--steps 60] [--cpus 2] [--cpus-per-worker 1]
        [--paths tune tune-cold train] [--repeats 1] [--driver-imports before|inside]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray (see tests/conftest.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from moelab.platform.spec import parse_spec  # noqa: E402


def spec_doc(steps: int, ckpt_every: int, cpus_per_worker: float, path: str) -> dict:
    return {"name": "bench", "common": {"data.source": "synthetic", "train.steps": steps, "train.log_every": 10,
                                        "train.eval_every": 0, "train.ckpt_every": ckpt_every},
            "base": {"preset": "moe-tiny"}, "axes": {"model.moe.top_k": [1, 2]}, "seeds": [0, 1, 2, 3],
            "resources": {"workers": 1, "cpus_per_worker": cpus_per_worker, "ray_train": path == "train"}}


def one(steps: int, ckpt_every: int, cpus: int, cpus_per_worker: float, label: str, driver_imports: str) -> dict:
    path, warm = ("tune", False) if label == "tune-cold" else (label, label == "tune")
    t_imports = time.perf_counter()
    try:
        from moelab.startup import startup_imports
    except ImportError:  # an older checkout, for a before/after run
        startup_imports = contextlib.nullcontext
    with startup_imports():
        import ray

        if driver_imports == "before":  # as `moelab sweep` does, before it starts Ray
            import ray.tune  # noqa: F401

        import moelab.results as mr
        from moelab.platform.controller import init_local_ray, run_sweep
    imports_s = time.perf_counter() - t_imports

    root = tempfile.mkdtemp(prefix="controller-bench-")
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    # as `moelab sweep` starts its local Ray: on the tune path the idle workers import the trainer meanwhile
    init_local_ray(num_cpus=cpus, warm=warm)
    ray_start = time.perf_counter() - t
    marks: dict[str, dict[str, float]] = {}

    def log(msg: str) -> None:
        tid, _, what = msg.partition(": ")
        marks.setdefault(tid, {})[what.split()[0].rstrip(",")] = time.perf_counter()

    logs = ray._private.worker._global_node.get_logs_dir_path()
    try:
        t_sweep = time.perf_counter()
        report = run_sweep(parse_spec(spec_doc(steps, ckpt_every, cpus_per_worker, path)), storage=root, log=log)
    finally:
        ray.shutdown()
    # worker processes Ray started for this job (its id in the log name); the prestarted ones carry no job id
    fresh = len(glob.glob(os.path.join(logs, "worker-*-01000000-*.err")))
    assert report.path == path, (report.path, path)
    trials = mr.open(root).trials("bench")
    assert (trials.status == "finished").all(), trials[["trial_id", "status", "error"]]
    train = dict(zip(trials["trial_id"], trials["wall_s"]))
    spans = {tid: m["finished"] - m["running"] for tid, m in marks.items() if "running" in m and "finished" in m}
    assert set(spans) == set(train), (sorted(spans), sorted(train))
    n, conc = len(train), report.max_concurrent
    return {"path": label, "cpus_per_worker": cpus_per_worker, "concurrency": conc, "trials": n,
            "driver_imports": driver_imports, "imports_s": imports_s,
            "ray_start_s": ray_start, "sweep_wall_s": report.wall_s, "train_sum_s": sum(train.values()),
            "train_median_s": statistics.median(train.values()),
            "span_median_s": statistics.median(spans.values()),
            "overhead_median_s": statistics.median(spans[t] - train[t] for t in train),
            "slot_overhead_per_trial_s": (report.wall_s * conc - sum(train.values())) / n,
            "train_share": sum(train.values()) / (report.wall_s * conc),
            "train_share_from_ray_start": sum(train.values()) / ((report.wall_s + ray_start) * conc),
            "warm": warm, "fresh_worker_processes": fresh,
            "first_running_s": min(m["running"] for m in marks.values() if "running" in m) - t_sweep,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, nargs="+", default=[1.0])
    p.add_argument("--paths", nargs="+", default=["tune", "tune-cold", "train"], choices=["tune", "tune-cold", "train"],
                   help="tune: inside Tune trials on warm workers (what moelab sweep does); tune-cold: the same "
                        "on workers that import everything when their first trial starts; train: Ray Train runs")
    p.add_argument("--repeats", type=int, default=1, help="run the paths this many times, interleaved")
    p.add_argument("--driver-imports", choices=["before", "inside"], default="before",
                   help="before: the driver imports ray.tune before it starts Ray, as `moelab sweep` does; "
                        "inside: run_sweep imports it (a script or notebook that calls run_sweep)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path in this process, print its row
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.steps, a.ckpt_every, a.cpus, a.cpus_per_worker[0], a.one, a.driver_imports)))
        return 0
    rows = []
    for _ in range(a.repeats):
        for c in a.cpus_per_worker:
            for path in a.paths:  # a fresh process per sweep: nothing imported or started by an earlier one
                t = time.perf_counter()
                out = subprocess.run([sys.executable, __file__, "--one", path, "--steps", str(a.steps),
                                      "--ckpt-every", str(a.ckpt_every), "--cpus", str(a.cpus),
                                      "--cpus-per-worker", str(c), "--driver-imports", a.driver_imports],
                                     capture_output=True, text=True)
                command_s = time.perf_counter() - t
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"{path}: exit {out.returncode}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["command_s"] = command_s
                row["train_share_of_command"] = row["train_sum_s"] / (command_s * row["concurrency"])
                rows.append(row)
    print(f"8 x moe-tiny, {a.steps} steps x 1,024 tokens, {a.cpus} CPUs, {platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, {time.strftime('%Y-%m-%d')}")
    print("| path | CPUs/worker | concurrent | sweep wall (s) | sum of training (s) | median training (s) "
          "| median trial span (s) | median overhead/trial (s) | slot overhead/trial (s) | training share "
          "| Ray start (s) | share from Ray start | whole command (s) | share of the command "
          "| first trial running at (s) | fresh worker processes | load avg before/after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: | ---: |")
    for r in rows:
        print(f"| {r['path']} | {r['cpus_per_worker']:g} | {r['concurrency']} | {r['sweep_wall_s']:.1f} | "
              f"{r['train_sum_s']:.1f} | {r['train_median_s']:.2f} | {r['span_median_s']:.1f} | "
              f"{r['overhead_median_s']:.1f} | {r['slot_overhead_per_trial_s']:.1f} | {r['train_share']:.0%} | "
              f"{r['ray_start_s']:.1f} | {r['train_share_from_ray_start']:.0%} | {r['command_s']:.1f} | "
              f"{r['train_share_of_command']:.0%} | {r['first_running_s']:.1f} | "
              f"{r['fresh_worker_processes']} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
