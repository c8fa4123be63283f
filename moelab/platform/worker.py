"""Ray Train worker entry: the `moelab train` loop, one Ray Train worker per rank (Train V2 API).

    from moelab.platform.worker import fit
    result = fit(rc, num_workers=2, storage_path="/abs/results", name="trial-0")   # rc: a RunConfig

`train_loop_per_worker(config)` runs inside every `TorchTrainer` worker. Ray has set up the process group
already (gloo on CPU, nccl on GPU); the worker builds the `(dp_shard, ep)` mesh from it (`rc.train.ep`),
resumes from `ray.train.get_checkpoint()` when Ray restarts the run after a worker failure, and runs the
same `Trainer` as `moelab train`. At every log step every rank calls `ray.train.report` with the same,
all-reduced metrics (plus `attempt`: 0 for the first run, +1 per restart); at a checkpoint step each rank
attaches its own files of the sharded checkpoint, which Ray merges into one checkpoint directory.

Test hook: `MOELAB_FAULT_AT_STEP=N` makes one worker (rank `MOELAB_FAULT_RANK`, default the last) exit
hard (`os._exit`) a few seconds after it reported step N (a logged step; the wait lets Ray's controller,
which polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 2 s, register the checkpoints reported
before), once per run directory: a marker file `<out_dir>/fault-injected` keeps the restarted attempt from
failing again. `fit` forwards every `MOELAB_*`
variable of the driver's environment to the workers (or the `env` it is given).

For the sweep controller (`moelab.platform.controller`) the worker also:
  * ends a diverged run (`Diverged`: NaN/inf loss) by reporting one row `{"diverged": 1, "error": ...}`
    and returning normally, so that neither Ray Train nor Tune retries a run that would diverge again;
  * batches its rows: one report per `MOELAB_REPORT_EVERY_S` (default 1 s) at most, carrying the rows
    logged since the last one under `"earlier"`; a checkpoint, the last step and a divergence report at once;
  * reports, right after resuming from a checkpoint, one row `{"backfill": [...], "restored_from": path}`
    holding rank 0's logged rows since the checkpoint before the restored one (from `metrics.jsonl`): a
    driver that crashed between Ray persisting a checkpoint and storing the rows before it can fill that
    gap (idempotent: the store dedupes on step);
  * copies `upcycle_checkpoint` (a checkpoint directory on the run's storage filesystem, e.g. S3) to the
    local run directory before training when that filesystem is not the local one, and points
    `upcycle.source` at it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from moelab.trainers.config import RunConfig, from_dict, to_dict

FAULT_ENV = "MOELAB_FAULT_AT_STEP"
FAULT_RANK_ENV = "MOELAB_FAULT_RANK"
FAULT_MARKER = "fault-injected"
DIVERGED_KEY = "diverged"  # a report row with this key ends a diverged run (see the module docstring)
BACKFILL_KEY = "backfill"  # a report row with this key carries rows logged before the restored checkpoint
EARLIER_KEY = "earlier"  # a report row may carry the logged rows before it that were not reported yet
REPORT_EVERY_ENV = "MOELAB_REPORT_EVERY_S"
# Ray Train hands a worker's reports to its controller through a queue of one, emptied at each of the
# controller's polls (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a report per logged step would stall a fast run at
# one logged step per poll. So rows are batched, one report per REPORT_EVERY_S at most (checkpoints, the
# last step and a divergence always report at once).
REPORT_EVERY_S = 1.0


def _rank_files(ckpt: Path, rank: int) -> list[Path]:
    """This rank's share of a checkpoint: its DCP shard files (rank 0: also the metadata), or rank 0 the
    single-process checkpoint file."""
    if ckpt.is_file():
        return [ckpt] if rank == 0 else []
    files = sorted(ckpt.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        files += [f for f in (ckpt / ".metadata", ckpt / "meta.json") if f.exists()]
    return files


def _attempt(out_dir: Path, rank: int) -> int:
    """0 on the first start of the run, then 1, 2, ... (rank 0 counts start markers; all ranks agree)."""
    import torch
    import torch.distributed as dist

    n = 0
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(out_dir.glob("attempt-*")))
        (out_dir / f"attempt-{n}").touch()
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        n = int(t)
    return n


def _local_source(path: str, filesystem: Any, out_dir: Path, rank: int) -> str:
    """A local copy of checkpoint directory `path` on `filesystem` (None or local: `path` itself)."""
    import pyarrow.fs as pafs

    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return path
    dest = out_dir / f"upcycle-source-{rank}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        pafs.copy_files(path, str(dest), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        (dest / ".complete").touch()
    return str(dest)


def _backfill_rows(metrics_path: Path, step: int, window: int) -> list[dict]:
    """Logged rows with step in (step - window, step] (window 0: all up to `step`)."""
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    lo = step - window if window > 0 else -1
    return [r for r in rows if lo < r["step"] <= step]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a run. config: {"run": RunConfig as a dict, "out_dir": local run directory,
    "env": environment variables to set first, "upcycle_checkpoint": optional source checkpoint path,
    "upcycle_fs": the filesystem it lives on (None: local)}."""
    import ray.train
    import torch

    from moelab.trainers.loop import Diverged, Trainer
    from moelab.trainers.parallel import init_parallel

    env = config.get("env", {})
    for k in [k for k in os.environ if k.startswith("MOELAB_") and k not in env]:
        del os.environ[k]  # inherited from the node (the raylet's environment), not meant for this run
    os.environ.update(env)
    rc = from_dict(RunConfig, config["run"]).validate()
    out_dir = Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if config.get("upcycle_checkpoint"):
        out_dir.mkdir(parents=True, exist_ok=True)
        rc.upcycle.source = _local_source(config["upcycle_checkpoint"], config.get("upcycle_fs"), out_dir, rank)
    par = init_parallel(rc.train.ep, rc.model.moe.n_experts, rc.train.device)
    attempt = _attempt(out_dir, rank)
    fault_at = int(os.environ.get(FAULT_ENV, "0") or 0)
    fault_rank = int(os.environ.get(FAULT_RANK_ENV, str(ctx.get_world_size() - 1)))

    every_s = float(os.environ.get(REPORT_EVERY_ENV, REPORT_EVERY_S))
    pending: list[dict] = []
    last_sent = [time.monotonic()]

    def due(row: dict, ckpt: Path | None) -> bool:
        """Report now? Rank 0's clock decides for all ranks: Ray needs the same reports from every rank."""
        now = ckpt is not None or row["step"] >= rc.total_steps() or time.monotonic() - last_sent[0] >= every_s
        if par is not None:
            now = bool(par.all_reduce(torch.tensor([float(now and rank == 0)], device=tr.device)).item())
        return now

    def report(row: dict, ckpt: Path | None) -> None:
        if due(row, ckpt):
            send(row, ckpt)
        else:
            pending.append(row)  # lost if the worker dies now: its restart recomputes them from a checkpoint
        fault(row)

    def send(row: dict, ckpt: Path | None) -> None:
        metrics = {**row, "attempt": attempt}
        if pending:
            metrics[EARLIER_KEY] = list(pending)
            pending.clear()
        last_sent[0] = time.monotonic()
        if ckpt is None:
            ray.train.report(metrics)
        else:
            # Each rank hands over only its own files; Ray merges them into one checkpoint directory.
            tmp = Path(tempfile.mkdtemp(prefix=f".report-{rank}-", dir=out_dir))
            try:
                for f in _rank_files(Path(ckpt), rank):
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                                 checkpoint_dir_name=f"checkpoint-{row['step']:08d}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def fault(row: dict) -> None:
        marker = out_dir / FAULT_MARKER
        if fault_at and row["step"] >= fault_at and rank == fault_rank and not marker.exists():
            marker.write_text(f"worker rank {rank} killed after step {row['step']} ({FAULT_ENV}={fault_at})\n")
            # Ray's controller collects reports when it polls the workers: give it two polls to register
            # the checkpoints reported so far, as a real crash some seconds after them would.
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 0.5)
            os._exit(17)

    tr = Trainer(rc, out_dir, parallel=par, progress=False, report=report)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            tr.load_checkpoint(d)  # also truncates metrics.jsonl to the checkpoint's step
        rows = _backfill_rows(tr.metrics_path, tr.step, rc.train.ckpt_every) if rank == 0 else []
        # Every rank reports (Ray expects the same reports from all ranks); only rank 0's reaches Tune.
        ray.train.report({BACKFILL_KEY: rows, "restored_from": restored.path, "attempt": attempt})
    elif rank == 0 and tr.metrics_path.exists():
        tr.metrics_path.unlink()  # a fresh start: rows of an earlier attempt that left no checkpoint are void
    try:
        tr.run()
    except Diverged as e:
        # Every rank sees the same reduced loss, so every rank gets here at the same step (and holds the same
        # pending rows).
        if pending:
            ray.train.report({**pending[-1], EARLIER_KEY: pending[:-1], "attempt": attempt})
        ray.train.report({DIVERGED_KEY: 1, "step": e.step, "loss": e.loss, "error": str(e), "attempt": attempt})


def fit(rc: RunConfig, *, storage_path: str, name: str, num_workers: int = 2, use_gpu: bool = False,
        cpus_per_worker: float = 1.0, gpus_per_worker: float = 1.0, max_failures: int = 1,
        out_dir: str | None = None, callbacks: list | None = None, storage_filesystem: Any = None,
        env: dict[str, str] | None = None, upcycle_checkpoint: str | None = None):
    """Run `rc` as one Ray Train run of `num_workers` ranks (rc.train.ep of them split the experts).

    storage_path: absolute path or URI where Ray keeps results and checkpoints (a path on
    `storage_filesystem` when that is given, e.g. a pyarrow S3FileSystem); name: the run's name there
    (deterministic names let a restarted driver find the run: Ray Train then resumes from its latest
    checkpoint); out_dir: the workers' local run directory (metrics.jsonl, config.json, checkpoints in the
    making), default <storage_path>/<name>/run for a local path. On 2 CPUs use cpus_per_worker=0.5.
    env: variables for the workers (default: this process's MOELAB_*). upcycle_checkpoint: a checkpoint
    directory on the storage filesystem to initialise from (sets upcycle.source on the workers).
    Returns the `ray.train.Result`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rc.validate()
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    if env is None:
        env = {k: v for k, v in os.environ.items() if k.startswith("MOELAB_")}
    config = {"run": to_dict(rc), "out_dir": out_dir or os.path.join(storage_path, name, "run"), "env": env,
              "upcycle_checkpoint": upcycle_checkpoint, "upcycle_fs": storage_filesystem}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                callbacks=callbacks,
                                failure_config=FailureConfig(max_failures=max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()
