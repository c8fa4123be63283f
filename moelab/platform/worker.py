"""The training loop of a sweep trial, on either of its two paths (Ray Train V2 API, Ray Tune):

    from moelab.platform.worker import fit
    result = fit(rc, num_workers=2, storage_path="/abs/results", name="trial-0")   # rc: a RunConfig

* Ray Train (`fit`, `train_loop_per_worker`): one worker per rank inside a `TorchTrainer`. Ray has set up the
  process group already (gloo on CPU, nccl on GPU); the worker builds the `(dp_shard, ep)` mesh from it
  (`rc.train.ep`), resumes from `ray.train.get_checkpoint()` when Ray restarts the run after a worker
  failure, and runs the same `Trainer` as `moelab train`. At every report every rank calls
  `ray.train.report` with the same, all-reduced metrics; at a checkpoint step each rank attaches its own
  files of the sharded checkpoint, which Ray merges into one checkpoint directory.
* Inside a Tune trial (`train_in_trial`): a 1-worker run needs no worker group, so the trial's own process
  trains and calls `ray.tune.report`. It persists its checkpoints itself, in the directory layout a 1-worker
  Ray Train run leaves (`<root>/checkpoint-NNNNNNNN/checkpoint.pt`, the newest two kept), puts the path in
  the report (`checkpoint_path`, as Tune's Ray Train callback does) and resumes from the newest one there
  when it starts again (Tune's trial retry, or a resumed controller).

Both paths report the same rows (plus `attempt`: 0 for the first start of the run directory, +1 per restart).

Test hook: `MOELAB_FAULT_AT_STEP=N` makes one worker (rank `MOELAB_FAULT_RANK`, default the last) exit
hard (`os._exit`) shortly after it reported step N (a logged step; on Ray Train the wait lets Ray's
controller, which polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 2 s, register the checkpoints
reported before), once per run directory: a marker file `<out_dir>/fault-injected` keeps the restarted
attempt from failing again. `fit` forwards every `MOELAB_*` variable of the driver's environment to the
workers (or the `env` it is given).

For the sweep controller (`moelab.platform.controller`) the run also:
  * ends a diverged run (`Diverged`: NaN/inf loss) by reporting one row `{"diverged": 1, "error": ...}`
    and returning normally, so that neither Ray Train nor Tune retries a run that would diverge again;
  * batches its rows: one report per `MOELAB_REPORT_EVERY_S` (default 1 s) at most, carrying the rows
    logged since the last one under `"earlier"`; a checkpoint, the last step and a divergence report at once;
  * reports, right after resuming from a checkpoint, one row `{"backfill": [...], "restored_from": path}`
    holding rank 0's logged rows before the restored checkpoint (from `metrics.jsonl`; on Ray Train those
    since the checkpoint before it, inside a Tune trial all of them): a driver that crashed between the
    checkpoint becoming durable and storing the rows before it can fill that gap (idempotent: the store
    dedupes on step);
  * copies `upcycle_checkpoint` (a checkpoint directory on the run's storage filesystem, e.g. S3) to the
    local run directory before training when that filesystem is not the local one, and points
    `upcycle.source` at it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.startup import startup_imports
from moelab.trainers.config import RunConfig, from_dict, to_dict

FAULT_ENV = "MOELAB_FAULT_AT_STEP"
FAULT_RANK_ENV = "MOELAB_FAULT_RANK"
FAULT_MARKER = "fault-injected"
DIVERGED_KEY = "diverged"  # a report row with this key ends a diverged run (see the module docstring)
BACKFILL_KEY = "backfill"  # a report row with this key carries rows logged before the restored checkpoint
EARLIER_KEY = "earlier"  # a report row may carry the logged rows before it that were not reported yet
CHECKPOINT_PATH_KEY = "checkpoint_path"  # a report's persisted checkpoint (the key Tune's Ray Train callback adds)
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-<step, 8 digits>: one directory per persisted checkpoint
CHECKPOINT_FILE = "checkpoint.pt"  # a single-process checkpoint (moelab.trainers.loop.CHECKPOINT)
REPORT_EVERY_ENV = "MOELAB_REPORT_EVERY_S"
# Ray Train hands a worker's reports to its controller through a queue of one, emptied at each of the
# controller's polls (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a report per logged step would stall a fast run at
# one logged step per poll. Inside a Tune trial each report waits for the driver to ask for the next result.
# So rows are batched, one report per REPORT_EVERY_S at most (checkpoints, the last step and a divergence
# always report at once).
REPORT_EVERY_S = 1.0


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


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


class _TrainChannel:
    """Reports of one Ray Train worker: `ray.train.report`, checkpoints handed to Ray (which persists and
    tracks them), resume from `ray.train.get_checkpoint()`."""

    def __init__(self) -> None:
        import ray.train

        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        # Ray's controller collects reports when it polls the workers: a fault gives it two polls to register
        # the checkpoints reported so far, as a real crash some seconds after them would.
        self.fault_wait_s = 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 0.5

    def send(self, metrics: dict, ckpt: Path | None, step: int, out_dir: Path) -> None:
        if ckpt is None:
            self.train.report(metrics)
            return
        # Each rank hands over only its own files; Ray merges them into one checkpoint directory.
        tmp = Path(tempfile.mkdtemp(prefix=f".report-{self.rank}-", dir=out_dir))
        try:
            for f in _rank_files(Path(ckpt), self.rank):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
            self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(str(tmp)),
                              checkpoint_dir_name=checkpoint_name(step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, tr: Any) -> str | None:
        restored = self.train.get_checkpoint()
        if restored is None:
            return None
        with restored.as_directory() as d:
            tr.load_checkpoint(d)
        return restored.path

    def backfill_window(self, rc: RunConfig) -> int:
        # Ray registers a checkpoint only with its report, which the sink stored with the rows before it.
        return rc.train.ckpt_every


class _TuneChannel:
    """Reports of a run that trains inside its Tune trial (one process): `ray.tune.report`; checkpoints
    persisted by the run itself, to `ckpt_root/checkpoint-NNNNNNNN/checkpoint.pt` on `filesystem` (the layout
    of a 1-worker Ray Train run), the newest `keep` kept; resume from the newest there. Tune's trial retry
    and a resumed controller both start the function afresh, so both resume from that directory."""

    rank, world_size = 0, 1
    fault_wait_s = 0.5  # the report in flight reaches the driver, as before a real crash a moment later

    def __init__(self, ckpt_root: str, filesystem: Any, keep: int = 2) -> None:
        import pyarrow.fs as pafs
        from ray import tune

        self.tune, self.root, self.keep = tune, ckpt_root.rstrip("/"), keep
        self.fs = filesystem or pafs.LocalFileSystem()
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _checkpoints(self) -> list[tuple[int, str]]:
        """(step, directory) of the complete checkpoints under the root, oldest first."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        steps = [(int(i.base_name[len(CHECKPOINT_PREFIX):]), i.path) for i in found
                 if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
                 and i.base_name[len(CHECKPOINT_PREFIX):].isdigit()]
        complete = [(s, p) for s, p in steps if self.fs.get_file_info(f"{p}/{CHECKPOINT_FILE}").type
                    == pafs.FileType.File]
        return sorted(complete)

    def _persist(self, ckpt: Path, step: int) -> str:
        """Make the trainer's checkpoint file durable as checkpoint-<step>; returns its directory."""
        import pyarrow.fs as pafs

        dest = f"{self.root}/{checkpoint_name(step)}"
        if self.local:
            # Whole or absent: built under a hidden name, then renamed. A link suffices: the trainer replaces
            # its checkpoint file by rename, never rewrites it in place.
            tmp = Path(self.root) / f".{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                os.link(ckpt, tmp / CHECKPOINT_FILE)
            except OSError:
                shutil.copy2(ckpt, tmp / CHECKPOINT_FILE)
            shutil.rmtree(dest, ignore_errors=True)  # a restarted attempt saving the same step again
            os.replace(tmp, dest)
        else:
            # One object: an object-store PUT is visible whole or not at all.
            self.fs.create_dir(dest)
            pafs.copy_files(str(ckpt), f"{dest}/{CHECKPOINT_FILE}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        for _, old in self._checkpoints()[:-self.keep]:
            self.fs.delete_dir(old)
        return dest

    def send(self, metrics: dict, ckpt: Path | None, step: int, out_dir: Path) -> None:
        if ckpt is not None:
            metrics = {**metrics, CHECKPOINT_PATH_KEY: self._persist(Path(ckpt), step)}
        self.tune.report(metrics)

    def restore(self, tr: Any) -> str | None:
        import pyarrow.fs as pafs

        found = self._checkpoints()
        if not found:
            return None
        path = found[-1][1]
        if self.local:
            tr.load_checkpoint(path)
        else:
            local = tr.out_dir / "restore"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            pafs.copy_files(f"{path}/{CHECKPOINT_FILE}", str(local / CHECKPOINT_FILE), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            tr.load_checkpoint(local)
        return path

    def backfill_window(self, rc: RunConfig) -> int:
        # The checkpoint is durable before its report reaches the driver (which may die in between, or miss
        # the rows of the checkpoint before): re-send every row up to it. The sink dedupes on step.
        return 0


def _run(config: dict[str, Any], channel: Any) -> None:
    """One rank of a run, on either path; `channel` delivers its reports (see the module docstring)."""
    # A process's first run imports torch and the trainer here (a Ray Train worker, a Tune trial on a cold
    # worker); a warm worker has them already (moelab.platform.warm) and holds no earlier run's objects then.
    first = "moelab.trainers.loop" not in sys.modules
    with startup_imports() if first else contextlib.nullcontext():
        import torch

        from moelab.trainers.loop import Diverged, Trainer
        from moelab.trainers.parallel import init_parallel

    env = config.get("env", {})
    for k in [k for k in os.environ if k.startswith("MOELAB_") and k not in env]:
        del os.environ[k]  # inherited from the node (the raylet's environment, or an earlier trial of this actor)
    os.environ.update(env)
    rc = from_dict(RunConfig, config["run"]).validate()
    out_dir = Path(config["out_dir"])
    rank = channel.rank
    if config.get("upcycle_checkpoint"):
        out_dir.mkdir(parents=True, exist_ok=True)
        rc.upcycle.source = _local_source(config["upcycle_checkpoint"], config.get("upcycle_fs"), out_dir, rank)
    par = init_parallel(rc.train.ep, rc.model.moe.n_experts, rc.train.device)
    attempt = _attempt(out_dir, rank)
    fault_at = int(os.environ.get(FAULT_ENV, "0") or 0)
    fault_rank = int(os.environ.get(FAULT_RANK_ENV, str(channel.world_size - 1)))

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
        channel.send(metrics, ckpt, row["step"], out_dir)

    def fault(row: dict) -> None:
        marker = out_dir / FAULT_MARKER
        if fault_at and row["step"] >= fault_at and rank == fault_rank and not marker.exists():
            marker.write_text(f"worker rank {rank} killed after step {row['step']} ({FAULT_ENV}={fault_at})\n")
            time.sleep(channel.fault_wait_s)
            os._exit(17)

    tr = Trainer(rc, out_dir, parallel=par, progress=False, report=report)
    restored = channel.restore(tr)  # also truncates metrics.jsonl to the checkpoint's step
    if restored is not None:
        rows = _backfill_rows(tr.metrics_path, tr.step, channel.backfill_window(rc)) if rank == 0 else []
        # Every rank reports (Ray expects the same reports from all ranks); only rank 0's reaches Tune.
        channel.send({BACKFILL_KEY: rows, "restored_from": restored, "attempt": attempt}, None, tr.step, out_dir)
    elif rank == 0 and tr.metrics_path.exists():
        tr.metrics_path.unlink()  # a fresh start: rows of an earlier attempt that left no checkpoint are void
    try:
        tr.run()
    except Diverged as e:
        # Every rank sees the same reduced loss, so every rank gets here at the same step (and holds the same
        # pending rows).
        if pending:
            channel.send({**pending[-1], EARLIER_KEY: pending[:-1], "attempt": attempt}, None, e.step, out_dir)
        channel.send({DIVERGED_KEY: 1, "step": e.step, "loss": e.loss, "error": str(e), "attempt": attempt},
                     None, e.step, out_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a Ray Train run. config: {"run": RunConfig as a dict, "out_dir": local run directory,
    "env": environment variables to set first, "upcycle_checkpoint": optional source checkpoint path,
    "upcycle_fs": the filesystem it lives on (None: local)}."""
    _run(config, _TrainChannel())


def train_in_trial(config: dict[str, Any], *, ckpt_root: str, filesystem: Any = None) -> None:
    """A whole run inside the calling Ray Tune function trainable (one process, no Ray Train): the config of
    `train_loop_per_worker`; checkpoints go to `ckpt_root` on `filesystem` (None: local), where a restart of
    the trial, or a later trial under the same root, resumes from the newest."""
    _run(config, _TuneChannel(ckpt_root, filesystem))


@dataclass(frozen=True)
class RunPlace:
    """Where a sweep's trials keep their files, on either path."""

    sweep: str
    train_path: str  # ROOT/_ray/SWEEP/train on `filesystem`: per trial its checkpoints (and Ray Train run)
    filesystem: Any = None  # a pyarrow filesystem; None: local paths
    scratch: str | None = None  # local parent of the run directories when train_path is not local

    def run_dir(self, trial_id: str) -> str:
        """The trial's local run directory (metrics.jsonl, attempt markers, checkpoints being written)."""
        if self.scratch:
            return os.path.join(self.scratch, self.sweep, trial_id)
        return os.path.join(self.train_path, trial_id, "run")


def _threads_from_env() -> None:
    """Use the CPUs Ray gave this trial: Ray sets OMP_NUM_THREADS for an actor when the actor is placed,
    which torch reads only when it is first imported; a worker that imported torch before that (a warm
    worker, `controller.init_local_ray`) would otherwise run one thread per core in every trial at once."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


def trial_in_tune(config: dict[str, Any], place: RunPlace) -> None:
    """The Tune function trainable of a 1-worker sweep trial (config: the controller's trial config): the run
    trains in this process, no Ray Train run, no worker group. Its checkpoints go where a 1-worker Train run
    of the same name keeps them, so a resumed sweep, an upcycled trial and the trials table see one layout
    whichever path ran."""
    tid = config["trial_id"]
    _threads_from_env()
    train_in_trial({"run": config["run"], "out_dir": place.run_dir(tid), "env": config["env"],
                    "upcycle_checkpoint": config.get("upcycle_checkpoint"), "upcycle_fs": place.filesystem},
                   ckpt_root=f"{place.train_path}/{tid}", filesystem=place.filesystem)


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
