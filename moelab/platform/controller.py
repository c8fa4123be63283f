"""The sweep controller: one sweep file in, a grid of training runs on Ray, every result in the store.

    from moelab.platform.controller import run_sweep
    report = run_sweep("noise", storage="results/")            # a catalogue name or a sweep file
    report = run_sweep("noise", storage="results/", resume=True)  # after a crashed controller

How it runs (Ray 2.60, Train V2; see refs.md "Measured on the CPU machines"):
  * The sweep file is validated and expanded (`spec.expand`) before Ray starts. The trials' `pending` rows
    are written in a thread while Ray and Tune start (`_PendingRows`).
  * Ray Tune runs one trial per sweep trial, named by the sweep's trial id (deterministic). Two paths:
    - 1-worker trials (the default; `resources.workers: 1`): the trial trains inside its Tune trial
      (`worker.trial_in_tune`, a function trainable holding the worker's CPUs/GPUs).
      Tune reuses the trial actors (`reuse_actors`), so from the second trial on a slot starts with torch
      and the trainer imported: a trial costs its training plus a fraction of a second. On a local Ray that
      `moelab sweep` starts, the first trials do not wait for those imports either: Ray's prestarted worker
      processes import them once connected, while the sweep is being set up (`init_local_ray(warm=True)`),
      and the trial actors start in them (`_plain_trial_actors`).
    - Several workers, or `resources.ray_train: true`: a light driver function (`_trial_driver`, pinned to
      the head node with a sliver of its `node:__internal_head__` resource, so it takes no CPU) builds a
      `TorchTrainer` (`moelab.platform.worker.fit`) with `TuneReportCallback` and calls `fit()`; the Train
      run is named after the trial. Each trial starts a worker group (and Ray Train's helper actors).
    Both paths run the same loop (`moelab.platform.worker`), report the same rows and keep checkpoints in
    the same place (`ROOT/_ray/SWEEP/train/TRIAL/checkpoint-NNNNNNNN`).
  * At most `max_concurrent` trials run at once: by default as many as the cluster's CPUs and GPUs hold
    (`resources.workers` x `cpus_per_worker` / `gpus_per_worker` per trial).
  * Order: a dependency-aware Tune searcher hands out trials in the spec's order (dense baselines first)
    and holds back a trial with `depends_on` until its source trial has finished; it then starts with
    `upcycle.source` = the source's final checkpoint. If the source failed or diverged, the dependent is
    not run and ends `failed`, naming the source.
  * Failures. Ray Train path, two levels: a dead worker makes Ray Train restart the worker group from the
    last checkpoint (`worker_retries`, Ray Train's FailureConfig); a trial whose Train run fails for good is
    retried by Tune (`trial_retries`, Tune's FailureConfig), and since the Train run keeps its name the
    retry resumes from the same checkpoints. Inside a Tune trial the worker is the trial, so Tune's
    FailureConfig gets both budgets (`worker_retries + trial_retries`) and a rerun resumes from the
    trial's newest checkpoint. On both paths a NaN / inf loss ends the run at once as `diverged` (the
    worker reports it and returns; nothing retries it) and the sweep goes on.
  * Resume: `resume=True` reads the store's `trials` table and runs only what is not yet `finished` or
    `diverged`; a trial that was running when the controller died starts again under the same name and
    resumes from its latest checkpoint (Ray Train by the run's name, a Tune-trial run from its checkpoint
    directory); its new rows get a higher `attempt`.
  * Results: `moelab.platform.sink.StoreSink` writes `trials`, `metrics` and `experts` as trials report.
  * Progress: `progress` gets a `SweepProgress` (done / running / pending, tokens/s, ETA) at every trial
    start and end and about once a second; per-trial lines go to `log` with `verbose=True`.

Storage is one root. Local: the tables and Ray's state (`ROOT/_ray/SWEEP/`: Tune's experiment, each
trial's checkpoints (and Train run), the workers' run directories) side by side. Object store
(`s3://bucket/prefix?...`): the tables and Ray's state (Tune experiment, Train checkpoints) under the same
prefix through the same pyarrow filesystem, so any node can read them; only the workers' scratch run
directories (metrics.jsonl, checkpoints being written) stay on the local disk of their node, under
`$TMPDIR/moelab-runs/SWEEP/TRIAL`.

Test hooks (fault injection; environment of the controller, forwarded to the chosen trials only):
  * `MOELAB_FAULT_NAN_AT_STEP=N` + `MOELAB_FAULT_NAN_TRIAL=SUBSTRING`: step N's loss becomes NaN in every
    trial whose id contains SUBSTRING (without the selector: in every trial).
  * `MOELAB_FAULT_AT_STEP=N` + `MOELAB_FAULT_TRIAL=SUBSTRING`: one worker of the chosen trials exits hard
    after logged step N, once per trial (see `moelab.platform.worker`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from moelab.platform.progress import SweepProgress, make_progress
from moelab.platform.spec import SpecError, SweepSpec, Trial, expand, load_spec
from moelab.platform.store import LeaseHeld, Store, list_files, redact_uri, resolve_root
from moelab.platform.worker import RunPlace, trial_in_tune
from moelab.trainers.config import RunConfig, from_dict, to_dict

__all__ = ["run_sweep", "SweepError", "SweepReport", "SweepProgress", "max_concurrent_trials", "trial_env",
           "RAY_DIR", "FAULT_TRIAL_ENV", "FAULT_NAN_TRIAL_ENV", "DONE"]

RAY_DIR = "_ray"  # ROOT/_ray/SWEEP: Ray's state (readers of the tables never look here)
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has 1.0 of it
DRIVER_SHARE = 0.001  # of HEAD_RESOURCE per trial driver: pinned to the head, no CPU taken
DONE = ("finished", "diverged")  # statuses a resumed sweep does not run again
FAULT_TRIAL_ENV = "MOELAB_FAULT_TRIAL"  # selects the trials MOELAB_FAULT_AT_STEP applies to
FAULT_NAN_TRIAL_ENV = "MOELAB_FAULT_NAN_TRIAL"  # selects the trials MOELAB_FAULT_NAN_AT_STEP applies to
_FAULT_VARS = {FAULT_TRIAL_ENV: ("MOELAB_FAULT_AT_STEP", "MOELAB_FAULT_RANK"),
               FAULT_NAN_TRIAL_ENV: ("MOELAB_FAULT_NAN_AT_STEP",)}


class SweepError(RuntimeError):
    """The sweep cannot start (existing results without --resume, a cluster too small, ...)."""


@dataclass
class SweepReport:
    sweep: str
    root: str
    status: dict[str, str]  # trial_id -> final status
    ran: list[str]  # trial ids run (or attempted) by this call
    skipped: list[str]  # already finished / diverged (resume)
    max_concurrent: int
    wall_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # the trials rows, in run order
    path: str = "tune"  # how its trials ran: "tune" (inside their Tune trials) or "train" (Ray Train runs)

    @property
    def ok(self) -> bool:
        """No trial failed (diverged is an outcome of the experiment, not a failure of the platform)."""
        return all(s in DONE for s in self.status.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out


# ----------------------------------------------------------------------------------------------------------------
# Pieces the trial drivers need


@dataclass
class _Context:
    """What every Ray Train trial driver shares (sent once through the object store by tune.with_parameters)."""

    place: RunPlace  # where the trial's files go
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    worker_retries: int
    ray_env: dict[str, str]  # RAY_TRAIN_* settings for the Train controller actor


def _trial_driver(config: dict[str, Any], ctx: _Context) -> None:
    """One Tune trial: a Ray Train run of the trial's config (resumes by name if it ran before)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from moelab.platform.worker import fit

    os.environ.update(ctx.ray_env)  # TorchTrainer passes RAY_TRAIN_* on to its controller actor
    rc = from_dict(RunConfig, config["run"]).validate()
    tid, place = config["trial_id"], ctx.place
    fit(rc, storage_path=place.train_path, storage_filesystem=place.filesystem, name=tid,
        num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0, cpus_per_worker=ctx.cpus_per_worker,
        gpus_per_worker=ctx.gpus_per_worker, max_failures=ctx.worker_retries, out_dir=place.run_dir(tid),
        callbacks=[TuneReportCallback()], env=config["env"], upcycle_checkpoint=config.get("upcycle_checkpoint"))


def _trial_name(trial: Any) -> str:
    return trial.config["trial_id"]


def trial_env(trial_id: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The MOELAB_* variables the workers of `trial_id` get: all of the controller's, except fault hooks
    whose selector (MOELAB_FAULT_TRIAL / MOELAB_FAULT_NAN_TRIAL) names other trials."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k.startswith("MOELAB_")}
    for selector, hooks in _FAULT_VARS.items():
        wanted = env.pop(selector, None)
        if wanted is not None and wanted not in trial_id:
            for k in hooks:
                env.pop(k, None)
    return env


def max_concurrent_trials(spec: SweepSpec, cluster: dict[str, float], n_trials: int) -> int:
    """How many trials the cluster runs at once: whole trials (workers x CPUs / GPUs each) that fit."""
    r = spec.resources
    cpu, gpu = r.workers * r.cpus_per_worker, r.workers * r.gpus_per_worker
    fits = []
    if cpu > 0:
        fits.append(math.floor(cluster.get("CPU", 0.0) / cpu + 1e-9))
    if gpu > 0:
        fits.append(math.floor(cluster.get("GPU", 0.0) / gpu + 1e-9))
    n = min(fits) if fits else n_trials
    if n < 1:
        raise SweepError(f"resources: one trial needs {cpu:g} CPUs and {gpu:g} GPUs ({r.workers} workers x "
                         f"{r.cpus_per_worker:g} CPUs, {r.gpus_per_worker:g} GPUs); the Ray cluster has "
                         f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs. Lower "
                         f"resources.*, or pass --max-concurrent N on an autoscaling cluster")
    return max(1, min(n, n_trials))


# ----------------------------------------------------------------------------------------------------------------
# Dependency-aware trial order


def _unavailable(name: str) -> None:
    """What a pickled driver-only object (searcher, sinks) unpickles to: nothing."""
    return None


def _make_searcher(queue: list[dict[str, Any]], status: dict[str, str], checkpoints: dict[str, str],
                   on_blocked: Callable[[str, str, str], None]):
    from ray.tune.search import Searcher

    class DependencyOrder(Searcher):
        """Hands out trial configs in run order; a trial with `depends_on` waits until its source has
        finished (None = "nothing ready now, ask again"); one whose source failed is dropped (on_blocked)."""

        def __init__(self) -> None:
            super().__init__()
            self.queue = list(queue)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            for i, cfg in enumerate(self.queue):
                dep = cfg["depends_on"]
                if dep is not None and status.get(dep) in ("failed", "diverged"):
                    continue
                if dep is None or status.get(dep) == "finished":
                    del self.queue[i]
                    if dep is not None:
                        cfg = {**cfg, "upcycle_checkpoint": checkpoints[dep]}
                    return cfg
            blocked = [c for c in self.queue if status.get(c["depends_on"]) in ("failed", "diverged")]
            for c in blocked:
                self.queue.remove(c)
                on_blocked(c["trial_id"], c["depends_on"], status[c["depends_on"]])
            return Searcher.FINISHED if not self.queue else None

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass  # the sink's on_done has recorded the outcome in `status`

        def save(self, checkpoint_path: str) -> None:  # Tune saves searcher state; a resume uses the store
            Path(checkpoint_path).write_text(json.dumps([c["trial_id"] for c in self.queue]))

        def restore(self, checkpoint_path: str) -> None:
            pass

        def __reduce__(self):
            # Tune pickles its search algorithm into the experiment state; this one lives only in its
            # driver (a resumed sweep rebuilds it from the store), so what is pickled is a placeholder.
            return (_unavailable, ("DependencyOrder",))

    return DependencyOrder()


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _storage(root: str, sweep: str) -> tuple[pafs.FileSystem | None, str, str | None]:
    """(filesystem for Ray or None when local, Ray's path ROOT/_ray/SWEEP, scratch dir for workers or None)."""
    fs, path = resolve_root(root)
    ray_path = f"{path}/{RAY_DIR}/{sweep}"
    if isinstance(fs, pafs.LocalFileSystem):
        return None, ray_path, None
    return fs, ray_path, os.path.join(tempfile.gettempdir(), "moelab-runs")


def _exists(fs: pafs.FileSystem | None, path: str) -> bool:
    fs = fs or pafs.LocalFileSystem()
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _init_ray(log: Callable[[str], None], warm: bool = False) -> bool:
    """Connect to the cluster (RAY_ADDRESS, as under `ray job submit`) or start a local Ray; True if
    this call started it. warm: the local Ray's worker processes import torch and the trainer before
    any trial asks for them (`init_local_ray`)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        log(f"connected to the Ray cluster at {os.environ['RAY_ADDRESS']}")
        return False
    init_local_ray(warm=warm)
    return True


# Ray's prestarted workers import this once they have connected, before they take work (Ray's
# `preload_python_modules`), while the driver sets the sweep up: it imports what a 1-worker trial needs
# (`moelab.platform.warm.MODULES`) with the garbage collector off.
WARM_MODULES = ("moelab.platform.warm",)
WARM_IDLE_KEEP_MS = 60_000  # how long a warm local Ray keeps an idle worker beyond its free CPUs


def init_local_ray(*, warm: bool = True, **kwargs: Any) -> None:
    """Start a local Ray (`ray.init(**kwargs)`, no dashboard, worker logs not forwarded by default).

    warm: every worker process this Ray starts imports `WARM_MODULES` after it has connected and before it
    takes work (Ray's `preload_python_modules` system setting; `moelab.platform.warm`), so the one-per-CPU
    workers Ray prestarts, in which a sweep's first Tune trials start (`_plain_trial_actors`), have ray.tune,
    torch and the trainer loaded by the time the driver has set the sweep up (measured: bench/RESULTS.md,
    "Sweep controller").
    `ray.init` does not wait for those imports, only for the workers to connect; an actor that arrives
    earlier waits for them in its worker instead of a fresh process being started. Only for trials that run
    inside Tune trials: a Ray Train run's helper actors would import torch for nothing."""
    import ray

    kwargs = {"log_to_driver": False, "include_dashboard": False, **kwargs}
    if warm:
        config = dict(kwargs.pop("_system_config", None) or {})
        config.setdefault("preload_python_modules", list(WARM_MODULES))
        # Ray kills a never-used idle worker after 1 s once the idle ones outnumber the free CPUs, which is the
        # moment a sweep's placement groups have reserved the CPUs for the trials about to start in them: a
        # warm worker was killed and the trial started in a fresh process (~1 run in 5 on 2 cores).
        config.setdefault("idle_worker_killing_time_threshold_ms", WARM_IDLE_KEEP_MS)
        kwargs["_system_config"] = config
    ray.init(**kwargs)


def _local_head() -> bool:
    """This process started the Ray it is connected to (a local Ray): Ray's processes inherited its
    environment."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    return bool(getattr(node, "head", False))


@contextlib.contextmanager
def _plain_trial_actors(enabled: bool):
    """Inside: Tune creates its trial actors without a runtime_env, so that they can start in the worker
    processes Ray prestarted (`ray::IDLE`, one per CPU; warm ones have torch and the trainer imported).

    Why: Tune (2.60, `tune.execution.class_cache`) gives every trial actor `runtime_env={"env_vars": ...}`
    (PL_DISABLE_FORK=1 and the driver's values of a few variables: AWS credentials, RAY_CHDIR_TO_TRIAL_DIR,
    Ray Train's settings), and Ray never hands an actor with a runtime_env a prestarted worker: each trial slot
    started a fresh process (import ray, connect, import ray.tune: ~2 s of CPU on the 2-core machines before
    the trial's own imports). Only for a local Ray that this process started (`_local_head`): its workers
    inherited this process's environment, so the runtime_env only repeats it (PyTorch Lightning's fork switch
    aside). On a cluster Tune's behaviour is kept. If Tune's internals move (a Ray upgrade), nothing is patched
    and trials start as before (tests/platform/test_warm.py checks that the hook still takes)."""
    try:
        from ray.tune.execution import tune_controller
    except ImportError:  # pragma: no cover - Tune's layout changed
        enabled = False
    base = getattr(tune_controller, "_ActorClassCache", None) if enabled else None
    if base is None or not hasattr(base, "get"):
        yield False
        return
    import ray

    class PlainActorClasses(base):
        def get(self, trainable_cls):
            if trainable_cls not in self._cache:
                self._cache[trainable_cls] = ray.remote(trainable_cls)
            return self._cache[trainable_cls]

    tune_controller._ActorClassCache = PlainActorClasses
    try:
        yield True
    finally:
        tune_controller._ActorClassCache = base


class _PendingRows:
    """Writes the `pending` trials rows in run order in a thread, so that Ray starts and the first trials run
    while the rest are being written (hundreds of rows on an object store take a while)."""

    def __init__(self, store: Store, rows: list[dict[str, Any]], before: Callable[[], Any] = lambda: None):
        self.written = {r["trial_id"]: threading.Event() for r in rows}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, args=(store, rows, before), name="moelab-pending-rows",
                                       daemon=True)
        self.thread.start()

    def _write(self, store: Store, rows: list[dict[str, Any]], before: Callable[[], Any]) -> None:
        try:
            before()  # the sweep's lease is confirmed before its first row is written
            for r in rows:
                store.write_trial(r)
                self.written[r["trial_id"]].set()
        except BaseException as e:  # noqa: BLE001 - raised again in the controller's thread by wait()
            self.error = e
        finally:
            for ev in self.written.values():
                ev.set()

    def wait(self, trial_id: str | None = None) -> None:
        """Until `trial_id`'s row (None: every row) is written; raises what the writer raised."""
        if trial_id is None:
            self.thread.join()
        elif trial_id in self.written:
            self.written[trial_id].wait()
        if isinstance(self.error, LeaseHeld):
            raise SweepError(str(self.error)) from None
        if self.error is not None:
            raise SweepError(f"could not write the trials table: {self.error}") from self.error


def format_report(report: SweepReport) -> str:
    """The table `moelab sweep` prints at the end: one line per trial, then counts."""
    head = ["trial_id", "status", "attempt", "final_loss", "eval_loss", "error"]
    rows = []
    for r in report.rows:
        fl, el = r.get("final_loss"), r.get("final_eval_loss")
        err = (r.get("error") or "").strip().splitlines()
        rows.append([r["trial_id"], r.get("status") or "?", str(r.get("attempt") or 0),
                     f"{fl:.4f}" if isinstance(fl, float) else "-", f"{el:.4f}" if isinstance(el, float) else "-",
                     (err[-1][:70] if err else "")])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *rows]]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts().items()))
    lines.append(f"sweep {report.sweep}: {len(report.status)} trials ({counts}); ran {len(report.ran)}, "
                 f"skipped {len(report.skipped)} already done; {report.wall_s:.1f} s; "
                 f"results in {redact_uri(report.root)}")
    return "\n".join(lines)


def run_sweep(spec: SweepSpec | str | os.PathLike, *, storage: str | None = None, resume: bool = False,
              max_concurrent: int | None = None, wandb: bool = False, worker_retries: int = 1,
              trial_retries: int = 1, log: Callable[[str], None] | None = None, verbose: bool = True,
              progress: Callable[[SweepProgress], None] | None = None,
              lease_kw: dict[str, Any] | None = None) -> SweepReport:
    """Run (or, with resume=True, finish) a sweep; returns its report. Raises SpecError for a bad sweep
    (before Ray starts), SweepError when it cannot start (another live process writes the sweep: the error
    names it), WandbUnavailable for wandb=True without wandb.

    storage: the root (default the spec's `storage`); max_concurrent: trials at once (default: what the
    cluster holds); worker_retries: restarts of a trial's worker group (Ray Train); trial_retries: reruns
    of a trial whose run failed (Tune; a trial that trains inside its Tune trial has no worker group, so
    it gets both counts as reruns); log: sweep lines, and with verbose=True one line per trial event
    (default: print to stderr); progress: called with the sweep's state at every trial start and end and
    about once a second in between. lease_kw: options of the sweep's one-writer lease (`Store.lease`: ttl_s,
    heartbeat_s, settle_s).
    """
    t0 = time.time()
    if wandb:
        from moelab.platform.sink import require_wandb

        require_wandb()
    say = log or (lambda msg: print(f"[moelab sweep] {msg}", file=sys.stderr, flush=True))
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    trials = expand(spec)  # every trial validated before Ray starts
    by_id: dict[str, Trial] = {t.trial_id: t for t in trials}
    root = storage or spec.storage
    if max_concurrent is not None and max_concurrent < 1:
        raise SpecError(f"--max-concurrent: got {max_concurrent}; allowed: >= 1")

    store = Store(root)
    # One writer per sweep: a second `--resume` of a running sweep would hide the first one's rows. The lease is
    # claimed before the stored state is read, so what this run resumes from cannot change under it; it is
    # confirmed (after `settle_s`, Lease.confirm) before anything is written: the first pending row, Tune's
    # experiment. The settle wait overlaps Ray's start and Tune's set-up.
    lease = store.lease(spec.name, **(lease_kw or {}))
    try:
        lease.claim()
    except LeaseHeld as e:
        raise SweepError(str(e)) from None
    try:
        return _run_leased(spec, trials, by_id, root, store, lease, resume, max_concurrent, wandb, worker_retries,
                           trial_retries, say, verbose, progress, t0)
    finally:
        lease.release()


def _run_leased(spec: SweepSpec, trials: list[Trial], by_id: dict[str, Trial], root: str, store: Store, lease: Any,
                resume: bool, max_concurrent: int | None, wandb: bool, worker_retries: int, trial_retries: int,
                say: Callable[[str], None], verbose: bool, progress: Callable[[SweepProgress], None] | None,
                t0: float) -> SweepReport:
    ray_fs, ray_path, scratch = _storage(root, spec.name)
    stored = {tid: row for tid in by_id if (row := store.read_trial(spec.name, tid)) is not None}
    n_rows = len(list_files(store.fs, store.root, "trials", [spec.name]))
    if not resume and (n_rows or _exists(ray_fs, ray_path)):
        shown = redact_uri(root).rstrip("/")  # a URI's credentials never reach a terminal or a log
        raise SweepError(f"sweep {spec.name!r} already has results in {shown} ({n_rows} trial rows); "
                         f"finish it with --resume, or pick another --storage (or delete "
                         f"{shown}/{{trials,metrics,experts,routing}}/sweep={spec.name} and "
                         f"{shown}/{RAY_DIR}/{spec.name})")
    status = {tid: row.get("status") or "pending" for tid, row in stored.items()}
    checkpoints = {tid: row["checkpoint"] for tid, row in stored.items() if row.get("checkpoint")}
    skipped = [t.trial_id for t in trials if status.get(t.trial_id) in DONE]
    todo = [t for t in trials if t.trial_id not in skipped]
    start_attempt = {}
    for t in todo:
        old = stored.get(t.trial_id)
        start_attempt[t.trial_id] = 0 if old is None else (
            int(old.get("attempt") or 0) + (0 if old.get("status") == "pending" else 1))
        status[t.trial_id] = "pending"
    if skipped:
        names = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        say(f"resume: {len(skipped)} trials already done ({names}), {len(todo)} to run")
    report = SweepReport(sweep=spec.name, root=str(root), status={}, ran=[t.trial_id for t in todo],
                         skipped=skipped, max_concurrent=0, wall_s=0.0,
                         path="tune" if spec.resources.in_tune else "train")
    pending = _PendingRows(store, [{**t.row(), "attempt": start_attempt[t.trial_id]} for t in todo],
                           before=lease.confirm)
    started_ray = False
    try:
        if todo:
            # Warm workers: only trials inside Tune trials train in the workers Ray prestarts (a Ray Train
            # run's helper actors would import torch for nothing).
            started_ray = _init_ray(say, warm=spec.resources.in_tune)
            report.max_concurrent = _tune(
                spec, todo, store, status, checkpoints, start_attempt, ray_fs, ray_path, scratch, max_concurrent,
                wandb, worker_retries, trial_retries, say, say if verbose else (lambda msg: None), pending,
                progress, total=len(trials), lease=lease)
        pending.wait()
    finally:
        pending.thread.join()
        store.flush()
        if started_ray:
            import ray

            ray.shutdown()
    report.rows = [store.read_trial(spec.name, t.trial_id) or t.row() for t in trials]
    report.status = {r["trial_id"]: r.get("status") or "pending" for r in report.rows}
    report.wall_s = time.time() - t0
    if lease.lost:
        rec = lease.read() or {}
        raise SweepError(f"sweep {spec.name!r}: another process ({rec.get('owner', 'unknown')}) took over its lease "
                         f"while this run stalled past {lease.ttl_s:.0f} s without a heartbeat; rows written since "
                         f"may be hidden by the other writer's: let that run finish, then `moelab sweep "
                         f"{spec.name} --storage {redact_uri(root)} --resume` to redo what is missing")
    return report


def _tune(spec: SweepSpec, todo: list[Trial], store: Store, status: dict[str, str], checkpoints: dict[str, str],
          start_attempt: dict[str, int], ray_fs: pafs.FileSystem | None, ray_path: str, scratch: str | None,
          max_concurrent: int | None, use_wandb: bool, worker_retries: int, trial_retries: int,
          say: Callable[[str], None], trial_log: Callable[[str], None], pending: _PendingRows,
          progress: Callable[[SweepProgress], None] | None, total: int, lease: Any) -> int:
    from moelab.startup import startup_imports

    # Not frozen: run_sweep may be called from a long-lived session (a notebook) whose objects are its own.
    with startup_imports(freeze=False):
        import ray
        from ray import tune

        from moelab.platform.sink import StoreSink, WandbSink

    n = max_concurrent or max_concurrent_trials(spec, ray.cluster_resources(), len(todo))
    r = spec.resources
    how = "each inside its Tune trial" if r.in_tune else "each a Ray Train run"
    say(f"sweep {spec.name}: {len(todo)} trials, up to {n} at a time ({r.workers} worker(s) x "
        f"{r.cpus_per_worker:g} CPU{f', {r.gpus_per_worker:g} GPU' if r.gpus_per_worker else ''}, {how}); "
        f"results in {store.display_uri}")

    def on_done(tid: str, row: dict[str, Any]) -> None:
        status[tid] = row.get("status") or "failed"
        if row.get("checkpoint"):
            checkpoints[tid] = row["checkpoint"]

    def on_blocked(tid: str, dep: str, dep_status: str) -> None:
        pending.wait(tid)
        status[tid] = "failed"
        store.update_trial(spec.name, tid, status="failed",
                           error=f"not run: its upcycle source {dep} ended {dep_status}")
        trial_log(f"{tid}: not run (its source {dep} ended {dep_status})")

    queue = [{"trial_id": t.trial_id, "depends_on": t.depends_on, "run": to_dict(t.config),
              "env": trial_env(t.trial_id)} for t in todo]
    sink = StoreSink(store, spec.name, {t.trial_id: t.steps for t in todo}, start_attempt=start_attempt,
                     on_done=on_done, log=trial_log, ready=pending.wait)
    callbacks: list[Any] = [sink]
    if progress is not None:  # after the sink: its on_done has updated `status` when the line is drawn
        callbacks.append(make_progress(spec.name, {t.trial_id: t.tokens for t in todo}, status, total, progress))
    if use_wandb:
        callbacks.append(WandbSink(spec.name, {t.trial_id: t.row() for t in todo}))
    place = RunPlace(sweep=spec.name, train_path=f"{ray_path}/train", filesystem=ray_fs, scratch=scratch)
    if r.in_tune:
        # The trial trains in its own actor: it holds the worker's CPUs/GPUs, and (reuse_actors) the next
        # trial runs in the same warm process, torch and the trainer already imported. The function lives in
        # the light worker module: a new actor imports only that (and the trainer) before it trains. A worker
        # restart and a trial rerun are the same thing here: both retry budgets go to Tune.
        resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
        trainable = tune.with_resources(tune.with_parameters(trial_in_tune, place=place), resources)
        max_failures = trial_retries + worker_retries
    else:
        # Ray Train's controller collects worker reports when it polls them (default every 2 s): poll faster,
        # so a small trial is not paced by the polls (the worker batches its rows to one report a second).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ctx = _Context(place=place, workers=r.workers, cpus_per_worker=r.cpus_per_worker,
                       gpus_per_worker=r.gpus_per_worker, worker_retries=worker_retries,
                       ray_env={k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")})
        trainable = tune.with_resources(tune.with_parameters(_trial_driver, ctx=ctx), {HEAD_RESOURCE: DRIVER_SHARE})
        max_failures = trial_retries
    try:
        lease.confirm()  # nothing of the sweep is written before its lease is confirmed (Tuner makes its dirs)
    except LeaseHeld as e:
        raise SweepError(str(e)) from None
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=_make_searcher(queue, status, checkpoints, on_blocked),
                                    num_samples=len(queue), max_concurrent_trials=n, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name="tune", storage_path=ray_path, storage_filesystem=ray_fs,
                                  callbacks=callbacks, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables on the console
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard copies: the store has it
    # Ctrl-C raises KeyboardInterrupt here (the caller shuts Ray down and says how to resume) instead of Tune's
    # own graceful stop, which returns as if the sweep had ended and points at Tuner.restore: a resume reads
    # the store, not Tune's state.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import logging

    # Tune's end-of-run analysis looks for its own result files, which the disabled loggers did not write.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    with _plain_trial_actors(r.in_tune and _local_head()):
        tuner.fit()
    return n
