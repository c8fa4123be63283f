"""Fault injection, measured: each fault run N times, and after each run what the store holds compared
with what should be there (issue 16). One row per fault in the matrix: runs, rows lost, rows duplicated,
how the runs ended.

    OMP_NUM_THREADS=1 python bench/fault_matrix.py [--runs-store 30] [--runs-ray 3] [--only FAULT ...]
        [--seed 0] [--ray-path tune|train] [--disk tmpfs|sim|auto] [--markdown OUT] [--json OUT]

Faults
------
Store level (no Ray; each run writes one made-up sweep through `moelab.platform.store.Store` as the sweep's
sink does: 3 trials x 40 logged steps, appended in random chunks of 1-6 rows with expert loads (2 layers x 4
experts) and routed-token counts (2 layers x 2 domains x 4 experts), a `flush` at random "checkpoints",
automatic flushes every 8 rows, 40% of the trials restarted from their last checkpoint under attempt + 1, each
trial compacted or not at its end, trial rows pending -> running -> finished; the trials' operations are
interleaved at random. The fault starts at a random operation and lasts for a random number of them):

  * disk_full: the disk fills up. `--disk tmpfs` (default where allowed: root with CAP_SYS_ADMIN and
    `unshare`): the store lives on a 64 MiB tmpfs mounted in a private mount namespace (a child process
    under `unshare --mount`), and a filler file (fallocate) takes all of the free space but 0-64 KiB, so
    writes fail with a real ENOSPC part-way through a file. `--disk sim`: `pq.write_table` is replaced by one
    that writes the bytes left in a budget of 0-64 KiB and then raises ENOSPC (the mechanism of
    tests/platform/test_store_safety.py). While the disk is full the writer goes on appending (automatic
    flushes fail and keep their rows), its explicit flushes and trial-row writes raise OSError (a trial-row
    write that failed is made again once space is back, as a caller that saw the error would); at the end
    of the window the writer calls `flush()` on the still-full disk ("disk full at flush"), then the filler
    is removed. In 30% of the runs the disk is still full when the writer closes the store: `close()` must
    raise, the space comes back, and `close()` again.
  * s3_upload_cut: the store on an object store (moto's S3 server on 127.0.0.1, one bucket per run) through a
    pyarrow filesystem whose uploads break, as in test_store_safety.py: "raise": the upload stops after
    0-3000 bytes, the part written is completed as an object (apache/arrow#40502) and the write raises;
    "silent": the rest is dropped and the upload reports success; "copy": uploads work but the server-side
    copy that publishes a file fails. The writer handles errors as for disk_full.
  * corrupt_file: a fault-free store (local disk) is written, then one random visible file (any table) is
    damaged: truncated at a random length, a random span of 1-64 bytes zeroed, 1-8 random bytes changed,
    replaced by garbage, or emptied. Then the readers (`moelab.results`), `check_store`, `check_store(repair=
    True)`, the readers again, and `check_store` once more (what a user does to confirm the repair).
    Rows of the damaged file are destroyed by the fault itself: they are counted as lost and shown apart.

Ray level (a shared local Ray with 2 CPUs for all runs; the sweep: a `tiny` dense baseline and two `moe-tiny`
trials (top_k 1 and 2) upcycled from it, synthetic data, 4 x 16 tokens a step, a row and a checkpoint every 2
steps, 1 worker x 0.5 CPU a trial, up to 2 trials at once; 1-worker trials train inside their Tune trials
unless `--ray-path train`). Before the faults, a fault-free reference run of each sweep gives the expected
rows and their values:

  * worker_killed (8 steps): one random trial's worker exits hard (`os._exit`) after a random logged step (2, 4
    or 6): `MOELAB_FAULT_AT_STEP` + `MOELAB_FAULT_TRIAL` in the controller's environment (the hooks of
    `moelab.platform.worker` / `controller`); `run_sweep` in this process with its default retries. Tune
    reruns the trial, which resumes from its newest checkpoint.
  * controller_killed (40 steps): `python -m moelab sweep FILE --storage ROOT` in its own process group,
    connected to the shared Ray (RAY_ADDRESS), SIGKILLed when the store shows the baseline part-way (even
    runs after the first) or the baseline finished and a dependent part-way (odd runs and the first), as
    tests/platform/test_controller.py does. Then, at once, `run_sweep(resume=True)` (what a user does next);
    if that is refused because the dead controller's lease is still live, the lease record is deleted, as
    the refusal's message offers, and the resume is run again.
  * two_controllers (40 steps, the controller_killed sweep): two `python -m moelab sweep FILE --storage ROOT
    --resume` processes on one empty root: started together (runs 1, 3, ...) or the second once the first has
    stored rows (runs 2, 4, ...). One should run the sweep and the other stop with an error naming it
    (`Store.lease`); a second that arrives after the first has ended runs nothing (counted apart).

The controllers started as processes get this process's moelab first on PYTHONPATH, and Ray's workers import
the same one: run the bench from a snapshot of the tree (`git archive HEAD | tar -x -C DIR`, then
`cd DIR && PYTHONPATH=DIR python bench/fault_matrix.py ...`) when other work edits the tree meanwhile, or
workers started part-way through import different code from the reference run's.

What is counted
---------------
Expected rows: the store-level workload knows every row it wrote (the value of each (trial, step) row is
the one of the highest attempt that logged it); the Ray-level faults take the reference run's rows. After
the run (and its recovery) the store is read as a user reads it: `moelab.results.open(root)` `.metrics()`,
`.experts()`, `.routing()`, `.trials()`.
  * rows lost: expected keys missing from what the readers return. Keys: metrics (trial_id, step), experts
    (trial_id, step, layer, expert), routing (trial_id, step, layer, domain, expert), trials (trial_id), a
    trial row counting as lost also when its status / final step is not the expected one. The matrix shows
    the sum over the four tables, with a per-table breakdown below it.
  * rows duplicated: rows beyond the first of a key in what the readers return (the readers dedupe on
    attempt, so a duplicate here is a row two attempts or two writers left under one attempt). Rows
    duplicated in the files but hidden by that dedupe are reported apart ("raw duplicates").
  * rows changed: a key present with another value (loss, load, tokens) than expected: a stale attempt's row,
    silently corrupted bytes, or (Ray level) a resumed trial that did not compute what an undisturbed one does.
  * outcome: whether the run ended with a clear error (OSError / SweepError naming the cause) and recovered,
    and what was left behind (temp files, `check_store` findings, damaged files visible to readers).

Cost, measured on the 2-core CPU machine (shared with other work): disk_full about 0.6 s a run, corrupt_file
0.9 s, s3_upload_cut 8.5 s (every publish is an upload, a read-back, a copy and a delete on the moto server);
worker_killed 15-20 s, controller_killed 22-26 s, two_controllers about 17 s a run, plus about 35 s for Ray's
start and the two reference runs. `--runs-store 30 --runs-ray 4`: 9.5 min.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
try:  # the installed moelab (or PYTHONPATH's); else the tree this file is in
    import moelab  # noqa: F401
except ImportError:
    sys.path.insert(0, REPO)

# A local, loopback-only Ray without auth (as tests/conftest.py sets before anything imports ray).
for _k, _v in {"GLOO_SOCKET_IFNAME": "lo", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import logging  # noqa: E402

import moelab.results as mr  # noqa: E402
from moelab.platform import store as store_mod  # noqa: E402
from moelab.platform.store import DamagedFileWarning, Store, check_store, list_files  # noqa: E402

# The store logs a warning per failed automatic flush (hundreds during a fault window): the bench counts the
# errors itself.
logging.getLogger("moelab.store").setLevel(logging.ERROR)
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: a line per request

STORE_FAULTS = ("disk_full", "s3_upload_cut", "corrupt_file")
RAY_FAULTS = ("worker_killed", "controller_killed", "two_controllers")
FAULTS = STORE_FAULTS + RAY_FAULTS
TABLES = ("metrics", "experts", "routing", "trials")
KEYS = {"metrics": ["trial_id", "step"], "experts": ["trial_id", "step", "layer", "expert"],
        "routing": ["trial_id", "step", "layer", "domain", "expert"], "trials": ["trial_id"]}
VALUE = {"metrics": "loss", "experts": "load", "routing": "tokens"}

HOW = {
    "disk_full": "store on a 64 MiB tmpfs filled by fallocate to 0-64 KiB free (ENOSPC) for a random window of "
                 "appends / flushes / trial writes; `flush()` while full; full at `close()` in 30%",
    "disk_full_sim": "`pq.write_table` writes 0-64 KiB then raises ENOSPC for a random window; `flush()` while "
                     "full; full at `close()` in 30%",
    "s3_upload_cut": "moto S3; for a random window every upload breaks after 0-3000 bytes (raise, or silent "
                     "truncation) or the publishing copy fails",
    "corrupt_file": "one random visible Parquet file (any table) truncated / zeroed span / bytes changed / "
                    "garbage / emptied; then readers, `check_store --repair`, readers, `check_store`",
    "worker_killed": "`MOELAB_FAULT_AT_STEP` (2/4/6 of 8) + `MOELAB_FAULT_TRIAL`: a random trial's worker "
                     "`os._exit`s; default retries",
    "controller_killed": "`moelab sweep` (40 steps) process group SIGKILLed with the baseline or a dependent "
                         "part-way; then `run_sweep(resume=True)`",
    "two_controllers": "two `moelab sweep --resume` processes on one root (40 steps), started together or the "
                       "second once the first has rows",
}


@dataclass
class Run:
    fault: str
    run: int
    expected: dict[str, int] = field(default_factory=dict)  # table -> expected rows
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)  # keys that should not be there
    raw_dups: int = 0  # (trial, attempt, step) twice in the metric files: hidden by the readers' dedupe
    outcome: str = ""  # one word: recovered / refused / flagged / silent / harmless / crash / ...
    detail: str = ""
    wall_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def total(self, what: str) -> int:
        return sum(getattr(self, what).values())


def say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Comparing a store with what it should hold


def read_tables(root: str, filesystem: pafs.FileSystem | None = None, sweep: str | None = None
                ) -> tuple[dict[str, Any], list[str]]:
    """The four tables as readers return them (pandas), and the DamagedFileWarning messages seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = mr.open(root, filesystem=filesystem)
        out = {"metrics": r.metrics(sweep), "experts": r.experts(sweep), "routing": r.routing(sweep),
               "trials": r.trials(sweep)}
    damaged = [str(w.message) for w in caught if issubclass(w.category, DamagedFileWarning)]
    return out, damaged


def frame_map(df: Any, table: str) -> dict[tuple, Any]:
    """key tuple -> value of a reader's frame (trials: (status, final_step))."""
    keys = KEYS[table]
    if df is None or len(df) == 0:
        return {}
    cols = [df[k].tolist() for k in keys]
    if table == "trials":
        st = df["status"].tolist() if "status" in df else [None] * len(df)
        fs = df["final_step"].tolist() if "final_step" in df else [None] * len(df)
        vals = list(zip(st, [None if v is None or v != v else int(v) for v in fs]))
    else:
        vals = df[VALUE[table]].tolist()
    return dict(zip(zip(*cols), vals))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return a == b
    if a is None or b is None:
        return a is None and b is None
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if fa != fa or fb != fb:
        return fa != fa and fb != fb
    return abs(fa - fb) <= 1e-6 * max(1.0, abs(fa))


def compare(run: Run, got: dict[str, Any], expected: dict[str, dict[tuple, Any]]) -> None:
    for table in TABLES:
        exp = expected.get(table, {})
        df = got.get(table)
        n = 0 if df is None else len(df)
        have = frame_map(df, table)
        run.expected[table] = len(exp)
        run.duplicated[table] = n - len(have)
        run.lost[table] = sum(1 for k in exp if k not in have)
        run.changed[table] = sum(1 for k, v in exp.items() if k in have and not same(have[k], v))
        run.extra[table] = sum(1 for k in have if k not in exp)
        if table == "trials":  # a trial row with the wrong status / final step is not the row that should be there
            run.lost[table] += run.changed[table]
            run.changed[table] = 0


def raw_metric_dups(fs: pafs.FileSystem, root: str) -> int:
    """Rows sharing (trial_id, attempt, step) in the metric files as written (before the readers' dedupe)."""
    paths = list_files(fs, root, "metrics")
    seen: collections.Counter = collections.Counter()
    for p in paths:
        try:
            t = pq.read_table(p, filesystem=fs, columns=["trial_id", "attempt", "step"])
        except (OSError, pa.ArrowException):
            continue
        seen.update(zip(*(t.column(c).to_pylist() for c in ("trial_id", "attempt", "step"))))
    return sum(c - 1 for c in seen.values() if c > 1)


def first_line(e: BaseException | str, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    name = type(e).__name__ if isinstance(e, BaseException) else ""
    out = f"{name}: {text}" if name else text
    return out if len(out) <= limit else out[:limit] + "..."


# ----------------------------------------------------------------------------------------------------------------
# The store-level workload: what a sweep's sink writes, with restarts and compaction

SWEEP = "fm"
N_LAYERS, N_EXPERTS, N_DOMAINS = 2, 4, 2


def _loss(ti: int, step: int, attempt: int) -> float:
    return 5.0 - step / 1000 + 0.1 * attempt + 0.001 * ti


def _load(ti: int, step: int, attempt: int) -> list[list[float]]:
    out = []
    for layer in range(N_LAYERS):
        w = np.array([1 + ((step + attempt * 3 + layer + e + ti) % 5) for e in range(N_EXPERTS)], np.float64)
        out.append((w / w.sum()).astype(np.float32).tolist())
    return out


def _counts(ti: int, step: int, attempt: int) -> list[list[list[int]]]:
    return [[[(step * 7 + attempt * 101 + layer * 13 + d * 5 + e + ti * 1000) % 997 for e in range(N_EXPERTS)]
             for d in range(N_DOMAINS)] for layer in range(N_LAYERS)]


def _row(ti: int, step: int, attempt: int) -> dict[str, Any]:
    return {"step": step, "tokens": step * 64, "loss": _loss(ti, step, attempt), "lr": 1e-3,
            "expert_load": _load(ti, step, attempt), "expert_domain": _counts(ti, step, attempt)}


def make_workload(rng: random.Random, n_trials: int = 3, n_steps: int = 40, chunk_max: int = 6
                  ) -> tuple[list[tuple], dict[str, dict[tuple, Any]]]:
    """(operations, expected rows per table). Operations: ("write_trial", row), ("update", tid, fields),
    ("append", tid, attempt, rows), ("flush", tid), ("compact", tid)."""
    queues, expected = [], {t: {} for t in TABLES}
    for ti in range(n_trials):
        tid = f"t{ti}-s0"
        ops: list[tuple] = [("write_trial", {"sweep": SWEEP, "trial_id": tid, "status": "pending", "seed": ti,
                                             "attempt": 0, "family": "moe"}),
                            ("update", tid, {"status": "running", "attempt": 0})]
        attempt, step, ckpt = 0, 0, 0
        restart_at = rng.randint(n_steps // 3, n_steps - 1) if rng.random() < 0.4 else None
        final: dict[int, int] = {}  # step -> the attempt whose row readers must return
        while step < n_steps:
            last = min(step + rng.randint(1, chunk_max), n_steps)
            steps = list(range(step + 1, last + 1))
            ops.append(("append", tid, attempt, [_row(ti, s, attempt) for s in steps]))
            for s in steps:
                final[s] = attempt
            step = last
            if rng.random() < 0.3:
                ops.append(("flush", tid))  # the sink flushes a trial's rows at each checkpoint
                ckpt = step
            if restart_at is not None and step >= restart_at and step < n_steps:
                restart_at = None
                attempt += 1  # the worker died; its rerun resumes from the last checkpoint and logs on from there
                step = ckpt
                ops.append(("update", tid, {"status": "running", "attempt": attempt}))
        ops.append(("flush", tid))
        if rng.random() < 0.5:
            ops.append(("compact", tid))  # the sink compacts an ended trial
        ops.append(("update", tid, {"status": "finished", "attempt": attempt, "final_step": n_steps,
                                    "final_loss": _loss(ti, n_steps, attempt)}))
        queues.append(ops)
        for s, a in final.items():
            expected["metrics"][(tid, s)] = _loss(ti, s, a)
            for layer, fracs in enumerate(_load(ti, s, a)):
                for e, v in enumerate(fracs):
                    expected["experts"][(tid, s, layer, e)] = v
            for layer, mat in enumerate(_counts(ti, s, a)):
                for d, vec in enumerate(mat):
                    for e, v in enumerate(vec):
                        expected["routing"][(tid, s, layer, d, e)] = v
        expected["trials"][(tid,)] = ("finished", n_steps)
    merged = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop(0))
    return merged, expected


class Writer:
    """Runs workload operations against a Store while a fault may be on. Errors are what a careful caller sees:
    appends must not raise; explicit flushes / compactions may raise OSError during the fault (the rows stay
    buffered); a trial-row write that raised is made again once the fault is over."""

    def __init__(self, st: Store):
        self.st = st
        self.fault_on = False
        self.deferred: list[tuple] = []
        self.errors: collections.Counter = collections.Counter()  # "op: first line" -> count
        self.unexpected: list[str] = []

    def _err(self, op: str, e: BaseException) -> None:
        if self.fault_on and isinstance(e, OSError):
            self.errors[f"{op}: {first_line(e, 110)}"] += 1
        else:
            self.unexpected.append(f"{op} ({'during' if self.fault_on else 'outside'} the fault): "
                                   f"{first_line(e)}")

    def do(self, op: tuple) -> None:
        kind = op[0]
        try:
            if kind == "write_trial":
                self.st.write_trial(op[1])
            elif kind == "update":
                self.st.update_trial(SWEEP, op[1], **op[2])
            elif kind == "append":
                self.st.append_metrics(SWEEP, op[1], op[2], op[3])
            elif kind == "flush":
                self.st.flush(SWEEP, op[1])
            elif kind == "compact":
                self.st.compact(SWEEP, op[1])
        except BaseException as e:  # noqa: BLE001 - every error is recorded and judged
            self._err(kind, e)
            if kind in ("write_trial", "update") and self.fault_on:
                self.deferred.append(op)

    def end_fault(self, off: Callable[[], None]) -> None:
        off()
        self.fault_on = False
        todo, self.deferred = self.deferred, []
        for op in todo:
            self.do(op)


def run_workload(rng: random.Random, st: Store, on: Callable[[], None], off: Callable[[], None], run: Run
                 ) -> dict[str, dict[tuple, Any]]:
    """The workload with a fault from a random operation for a random number of them; returns the expected rows.
    At the end of the window the writer flushes on the faulty store ("at flush"); in 30% of the runs the fault
    lasts until `close()`."""
    ops, expected = make_workload(rng)
    start = rng.randrange(2, len(ops) - 2)
    persist = rng.random() < 0.3
    stop = len(ops) if persist else min(len(ops), start + rng.randint(1, max(2, len(ops) // 3)))
    w = Writer(st)
    flush_error = None
    for i, op in enumerate(ops):
        if i == start:
            on()
            w.fault_on = True
        if i == stop and w.fault_on:
            try:
                st.flush()  # the disk is still full / the uploads still break
            except OSError as e:
                flush_error = e
                w.errors[f"flush (at fault end): {first_line(e, 110)}"] += 1
            w.end_fault(off)
        w.do(op)
    close_error = None
    if w.fault_on:  # full at close: close must raise and keep the rows
        pending = st.pending_rows()
        try:
            st.close()
        except OSError as e:
            close_error = e
        run.info["pending_at_close"] = pending
        run.info["close_raised"] = close_error is not None and "kept in memory" in str(close_error)
        if pending and close_error is None:
            w.unexpected.append(f"close() on a faulty store returned with {pending} rows pending")
        w.end_fault(off)
    try:
        st.close()
    except BaseException as e:  # noqa: BLE001
        w.unexpected.append(f"final close: {first_line(e)}")
    run.info.update(ops=len(ops), fault_ops=stop - start, persist=persist, errors=dict(w.errors),
                    unexpected=w.unexpected,
                    flush_raised=flush_error is not None or close_error is not None,
                    pending_after=st.pending_rows())
    return expected


def judge_store_run(run: Run, fs: pafs.FileSystem, base: str, uri: str, filesystem: pafs.FileSystem | None) -> None:
    got, damaged = read_tables(uri, filesystem)
    run.raw_dups = raw_metric_dups(fs, base)
    tmp = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
           if i.base_name.startswith(store_mod.TMP_PREFIX)]
    rep = check_store(uri, filesystem=filesystem, grace_s=0.0)
    run.info.update(damaged_visible=len(damaged), temp_left=len(tmp), check_damaged=len(rep.damaged),
                    check_orphans=len(rep.orphans))
    unexpected = run.info.get("unexpected") or []
    bad = run.total("lost") or run.total("duplicated") or run.total("changed") or run.total("extra")
    if unexpected:
        run.outcome = "crash"
        run.detail = "; ".join(unexpected[:2])
    elif bad or damaged:
        run.outcome = "silent loss" if not run.info.get("errors") else "loss"
    elif not run.info.get("errors"):
        run.outcome = "no error seen"  # the fault window hit no write
    else:
        run.outcome = "recovered"
    if tmp or rep.damaged or rep.orphans:
        run.detail = (run.detail + "; " if run.detail else "") + \
            f"left behind: {len(tmp)} temp files, check_store: {len(rep.damaged)} damaged / {len(rep.orphans)} orphans"


# ----------------------------------------------------------------------------------------------------------------
# disk_full


class TmpfsDisk:
    """A real full disk: the store on a small tmpfs (mounted by the caller, in a private mount namespace); `on`
    fills all but `keep` bytes with a fallocated file, `off` removes it."""

    def __init__(self, mount: str):
        self.mount, self.filler = mount, os.path.join(mount, "filler.bin")
        self.keep = 0

    def on(self) -> None:
        s = os.statvfs(self.mount)
        free = s.f_bavail * s.f_frsize
        size = max(free - self.keep, 0)
        fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def off(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.filler)


class SimDisk:
    """A simulated full disk: while on, Parquet writes put at most the bytes left in a budget of `keep`
    bytes on disk and then raise ENOSPC (a real full disk leaves such a partial file)."""

    def __init__(self) -> None:
        self.real = store_mod.pq.write_table
        self.keep = 0
        self.left = 0
        self.full = False

    def write_table(self, table: pa.Table, where: Any, **kw: Any) -> None:
        if not self.full:
            return self.real(table, where, **kw)
        fs = kw.pop("filesystem", None) or pafs.LocalFileSystem()
        buf = pa.BufferOutputStream()
        self.real(table, buf, **kw)
        data = buf.getvalue().to_pybytes()
        n = min(len(data), self.left)
        with fs.open_output_stream(where) as f:
            f.write(data[:n])
        self.left -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, f"No space left on device (simulated): '{where}'")

    def on(self) -> None:
        self.full, self.left = True, self.keep
        store_mod.pq.write_table = self.write_table

    def off(self) -> None:
        self.full = False
        store_mod.pq.write_table = self.real


def disk_full_runs(runs: int, seed: int, disk: str, mount: str | None) -> list[Run]:
    out = []
    for i in range(runs):
        rng = random.Random(f"disk_full-{seed}-{i}")
        run = Run("disk_full", i + 1)
        t0 = time.perf_counter()
        if disk == "tmpfs":
            base = os.path.join(mount, f"run{i}")
            d: Any = TmpfsDisk(mount)
        else:
            base = tempfile.mkdtemp(prefix="fm-disk-")
            d = SimDisk()
        d.keep = rng.choice([0, 0, 4096, 16384, 65536])
        st = Store(base, batch_rows=8, flush_s=3600, retry_s=0.0)
        try:
            expected = run_workload(rng, st, d.on, d.off, run)
        finally:
            d.off()
        got, _ = read_tables(base)
        compare(run, got, expected)
        judge_store_run(run, pafs.LocalFileSystem(), base, base, None)
        run.info.update(keep_bytes=d.keep, disk=disk)
        run.wall_s = time.perf_counter() - t0
        shutil.rmtree(base, ignore_errors=True)
        report_run(run)
        out.append(run)
    return out


def tmpfs_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp(prefix="fm-probe-")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {probe} && umount {probe}"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        os.rmdir(probe)


def disk_full_in_namespace(runs: int, seed: int) -> list[Run]:
    """Run the disk_full runs in a child process with its own mount namespace and a 64 MiB tmpfs."""
    mount = tempfile.mkdtemp(prefix="fm-tmpfs-")
    out_json = tempfile.mktemp(prefix="fm-disk-", suffix=".json")
    script = (f"mount -t tmpfs -o size=64m tmpfs {mount} && exec {sys.executable} {os.path.abspath(__file__)} "
              f"--_disk-child {mount} --runs-store {runs} --seed {seed} --json {out_json}")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        if r.returncode != 0 or not os.path.exists(out_json):
            raise RuntimeError(f"the disk_full child failed (exit {r.returncode})")
        return [Run(**d) for d in json.loads(Path(out_json).read_text())]
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mount)
        with contextlib.suppress(OSError):
            os.unlink(out_json)


# ----------------------------------------------------------------------------------------------------------------
# s3_upload_cut (moto)


class _Cut:
    """An output stream that breaks after `limit` bytes (see tests/platform/test_store_safety.py): "raise"
    completes the upload of what it has, then raises; "silent" drops the rest and reports success."""

    def __init__(self, inner: Any, limit: int, mode: str):
        self.inner, self.limit, self.mode, self.n, self.closed = inner, limit, mode, 0, False

    def write(self, data: Any) -> int:
        data = bytes(data)
        room = max(self.limit - self.n, 0)
        self.inner.write(data[:room])
        self.n += len(data)
        if len(data) > room and self.mode == "raise":
            self.close()
            raise OSError("connection reset during upload (injected)")
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()

    def tell(self) -> int:
        return self.n

    def writable(self) -> bool:
        return True


class _Flaky(pafs.FileSystemHandler):
    """A pyarrow filesystem over a real one whose uploads break while `cut` is set ((limit, mode)), or whose
    server-side copies fail while `copy_fails` is set."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs, self.cut, self.copy_fails = fs, None, False

    def get_type_name(self): return "flaky"
    def normalize_path(self, path): return path
    def equals(self, other): return self is other
    def get_file_info(self, paths): return self.fs.get_file_info(paths)
    def get_file_info_selector(self, selector): return self.fs.get_file_info(selector)
    def create_dir(self, path, recursive): self.fs.create_dir(path, recursive=recursive)
    def delete_dir(self, path): self.fs.delete_dir(path)
    def delete_dir_contents(self, path, missing_dir_ok=False): self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)
    def delete_root_dir_contents(self): raise OSError("not here")
    def delete_file(self, path): self.fs.delete_file(path)
    def move(self, src, dest): self.fs.move(src, dest)
    def open_input_stream(self, path): return self.fs.open_input_stream(path)
    def open_input_file(self, path): return self.fs.open_input_file(path)
    def open_append_stream(self, path, metadata): return self.fs.open_append_stream(path)

    def copy_file(self, src, dest):
        if self.copy_fails:
            raise OSError("When copying key: AWS Error SERVICE_UNAVAILABLE (injected)")
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        inner = self.fs.open_output_stream(path)
        if self.cut is None:
            return inner
        return pa.PythonFile(_Cut(inner, *self.cut), mode="w")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_runs(runs: int, seed: int) -> list[Run]:
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_REGION": "us-east-1"}.items():
        os.environ[k] = v
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    out = []
    try:
        query = f"endpoint_override=http://127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
        for i in range(runs):
            rng = random.Random(f"s3-{seed}-{i}")
            run = Run("s3_upload_cut", i + 1)
            t0 = time.perf_counter()
            bucket = f"fm-{uuid.uuid4().hex[:8]}"
            uri = f"s3://{bucket}/results?{query}"
            s3, path = pafs.FileSystem.from_uri(uri)
            s3.create_dir(bucket)
            handler = _Flaky(s3)
            flaky = pafs.PyFileSystem(handler)
            kind = rng.choice(["raise", "raise", "silent", "copy"])
            limit = rng.randint(0, 3000)

            def on(kind=kind, limit=limit, handler=handler) -> None:
                if kind == "copy":
                    handler.copy_fails = True
                else:
                    handler.cut = (limit, kind)

            def off(handler=handler) -> None:
                handler.cut, handler.copy_fails = None, False

            st = Store(path, filesystem=flaky, batch_rows=8, flush_s=3600, retry_s=0.0)
            expected = run_workload(rng, st, on, off, run)
            got, _ = read_tables(uri)
            compare(run, got, expected)
            judge_store_run(run, s3, path, uri, None)
            run.info.update(kind=kind, limit=limit)
            run.wall_s = time.perf_counter() - t0
            report_run(run)
            out.append(run)
    finally:
        server.stop()
    return out


# ----------------------------------------------------------------------------------------------------------------
# corrupt_file

CORRUPTIONS = ("truncate", "zero_span", "change_bytes", "garbage", "empty")


def corrupt(path: str, kind: str, rng: random.Random) -> str:
    data = bytearray(Path(path).read_bytes())
    n = len(data)
    if kind == "truncate":
        cut = rng.randrange(0, n)
        data = data[:cut]
        what = f"truncated {n} -> {cut} bytes"
    elif kind == "zero_span":
        at, ln = rng.randrange(0, n), rng.randint(1, 64)
        data[at:at + ln] = bytes(len(data[at:at + ln]))
        what = f"{ln} bytes zeroed at {at} of {n}"
    elif kind == "change_bytes":
        k = rng.randint(1, 8)
        where = sorted(rng.randrange(0, n) for _ in range(k))
        for at in where:
            data[at] = (data[at] + rng.randint(1, 255)) % 256
        what = f"{k} bytes changed at {where} of {n}"
    elif kind == "garbage":
        data = bytearray(rng.randbytes(rng.randint(1, n)))
        what = "replaced by random bytes"
    else:
        data = bytearray()
        what = "emptied"
    Path(path).write_bytes(bytes(data))
    return what


def corrupt_runs(runs: int, seed: int) -> list[Run]:
    out = []
    fs = pafs.LocalFileSystem()
    for i in range(runs):
        rng = random.Random(f"corrupt-{seed}-{i}")
        run = Run("corrupt_file", i + 1)
        t0 = time.perf_counter()
        base = tempfile.mkdtemp(prefix="fm-corrupt-")
        st = Store(base, batch_rows=8, flush_s=3600)
        ops, expected = make_workload(rng)
        w = Writer(st)
        for op in ops:
            w.do(op)
        st.close()
        clean, _ = read_tables(base)
        ref = Run("clean", 0)
        compare(ref, clean, expected)
        files = [(t, p) for t in TABLES for p in list_files(fs, base, t)]
        table, victim = rng.choice(files)
        try:
            before = pq.read_table(victim).to_pandas()
            in_file = {k for k in frame_map(before, table)} if table != "trials" else {(r,) for r in before.trial_id}
        except Exception:  # noqa: BLE001
            in_file = set()
        kind = rng.choice(CORRUPTIONS)
        what = corrupt(victim, kind, rng)
        name = victim.rsplit("/", 1)[1]
        try:
            got, damaged = read_tables(base)
        except Exception as e:  # noqa: BLE001 - a reader that raises is a finding
            run.outcome, run.detail = "crash", f"reader raised {first_line(e)}"
            got, damaged = None, []
        flagged = any(name in m for m in damaged)
        if got is not None:
            compare(run, got, expected)
        # rows of the damaged file that the readers lost: destroyed by the fault
        exp_t = expected[table]
        have = frame_map(got[table], table) if got is not None else {}
        lost_in_file = sum(1 for k in in_file if k in exp_t and k not in have)
        rep = check_store(base)
        found = any(p == victim for p, _ in rep.damaged)
        repaired = check_store(base, repair=True)
        try:
            after, damaged_after = read_tables(base)
            run2 = Run("after", 0)
            compare(run2, after, expected)
            lost_after = run2.total("lost")
        except Exception as e:  # noqa: BLE001
            damaged_after, lost_after = [], -1
            run.detail = f"reader after repair raised {first_line(e)}"
        recheck = check_store(base)
        lost_second = None
        if not recheck.ok:  # what `moelab store check --repair` run again would do
            check_store(base, repair=True)
            try:
                again, _ = read_tables(base)
                run3 = Run("again", 0)
                compare(run3, again, expected)
                lost_second = run3.total("lost")
            except Exception:  # noqa: BLE001
                lost_second = -1
        run.info.update(lost_after_second_repair=lost_second, table=table, kind=kind, what=what, file_rows=len(in_file), lost_in_file=lost_in_file,
                        flagged_by_reader=flagged, found_by_check=found, moved=len(repaired.moved),
                        lost_after_repair=lost_after, warnings_after_repair=len(damaged_after),
                        recheck_ok=recheck.ok, recheck_orphans=len(recheck.orphans),
                        clean_ok=ref.total("lost") == 0 and ref.total("duplicated") == 0)
        if run.outcome != "crash":
            silent_bad = run.total("changed") + run.total("extra") + run.total("duplicated")
            if flagged or found:
                run.outcome = "flagged" if not silent_bad else "flagged + changed"
            elif run.total("lost") or silent_bad:
                run.outcome = "silent"
            else:
                run.outcome = "harmless"
        run.wall_s = time.perf_counter() - t0
        shutil.rmtree(base, ignore_errors=True)
        report_run(run)
        out.append(run)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ray-level faults

TINY = {"data.source": "synthetic", "train.batch_size": 4, "train.seq_len": 16, "train.log_every": 2,
        "train.ckpt_every": 2, "train.eval_every": 0}


def sweep_doc(name: str, steps: int, path: str) -> dict:
    return {"name": name, "common": {**TINY, "train.steps": steps}, "baselines": [{"preset": "tiny"}],
            "base": {"preset": "moe-tiny", "upcycle_from": "tiny"}, "axes": {"model.moe.top_k": [1, 2]},
            "seeds": [0], "resources": {"workers": 1, "cpus_per_worker": 0.5, "ray_train": path == "train"}}


def write_spec(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expected_from(root: str, sweep: str) -> dict[str, dict[tuple, Any]]:
    got, damaged = read_tables(root, sweep=sweep)
    assert not damaged, damaged
    exp = {t: frame_map(got[t], t) for t in TABLES}
    for k, v in exp["trials"].items():
        assert v[0] == "finished", f"the reference run did not finish {k}: {v}"
    return exp


def _moelab_file() -> str:
    import moelab

    return moelab.__file__


class RayBench:
    def __init__(self, path: str, work: str):
        import ray

        self.path, self.work = path, work
        t = time.perf_counter()
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        self.address = ray.get_runtime_context().gcs_address
        import moelab

        where = ray.get(ray.remote(_moelab_file).remote())
        say(f"  ray started in {time.perf_counter() - t:.1f} s ({self.address}); moelab here: {moelab.__file__}, "
            f"in Ray's workers: {where}")
        self.refs: dict[str, dict[str, dict[tuple, Any]]] = {}

    def close(self) -> None:
        import ray

        ray.shutdown()

    def env(self) -> dict[str, str]:
        """The controllers' environment: this process's, the shared Ray, and the moelab this process imported
        (a `python -m moelab` child must run the same code as the workers and this process)."""
        import moelab

        here = os.path.dirname(os.path.dirname(os.path.abspath(moelab.__file__)))
        path = os.pathsep.join([here, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
        return {**os.environ, "RAY_ADDRESS": self.address, "PYTHONPATH": path,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def spec(self, name: str, steps: int) -> Path:
        d = Path(self.work) / "specs"
        d.mkdir(parents=True, exist_ok=True)
        return write_spec(d / f"{name}.yaml", sweep_doc(name, steps, self.path))

    def reference(self, name: str, steps: int) -> dict[str, dict[tuple, Any]]:
        if name not in self.refs:
            from moelab.platform.controller import run_sweep
            from moelab.platform.spec import load_spec

            t = time.perf_counter()
            root = os.path.join(self.work, f"ref-{name}")
            report = run_sweep(load_spec(self.spec(name, steps)), storage=root, max_concurrent=2, log=lambda m: None)
            assert report.ok, report.status
            self.refs[name] = expected_from(root, name)
            n = {t: len(v) for t, v in self.refs[name].items()}
            say(f"  reference run of {name} ({steps} steps): {time.perf_counter() - t:.1f} s, rows {n}")
        return self.refs[name]

    def judge(self, run: Run, root: str, sweep: str, expected: dict) -> None:
        got, damaged = read_tables(root, sweep=sweep)
        compare(run, got, expected)
        run.raw_dups = raw_metric_dups(pafs.LocalFileSystem(), os.path.abspath(root))
        run.info["damaged_visible"] = len(damaged)
        rep = check_store(root)
        run.info["check_ok"] = rep.ok
        run.info["trial_status"] = {k[0]: v[0] for k, v in frame_map(got["trials"], "trials").items()}


def worker_killed_runs(rb: RayBench, runs: int, seed: int) -> list[Run]:
    from moelab.platform.controller import FAULT_TRIAL_ENV, RAY_DIR, run_sweep
    from moelab.platform.spec import expand, load_spec
    from moelab.platform.worker import FAULT_ENV, FAULT_MARKER

    name, steps = "wk", 8
    expected = rb.reference(name, steps)
    spec_path = rb.spec(name, steps)
    ids = [t.trial_id for t in expand(load_spec(spec_path))]
    out = []
    for i in range(runs):
        rng = random.Random(f"wk-{seed}-{i}")
        run = Run("worker_killed", i + 1)
        victim = ids[i] if i < len(ids) else rng.choice(ids)  # each trial once, then at random
        at = rng.choice([2, 4, 6])
        root = os.path.join(rb.work, f"wk-{i}")
        lines: list[str] = []
        t0 = time.perf_counter()
        os.environ[FAULT_ENV], os.environ[FAULT_TRIAL_ENV] = str(at), victim
        try:
            report = run_sweep(load_spec(spec_path), storage=root, max_concurrent=2, log=lines.append)
            err = None
        except Exception as e:  # noqa: BLE001
            report, err = None, e
        finally:
            os.environ.pop(FAULT_ENV, None)
            os.environ.pop(FAULT_TRIAL_ENV, None)
        run.wall_s = time.perf_counter() - t0
        marker = Path(root) / RAY_DIR / name / "train" / victim / "run" / FAULT_MARKER
        rb.judge(run, root, name, expected)
        retried = any(victim in ln and "retrying" in ln for ln in lines)
        resumed = any(victim in ln and "resumed from" in ln for ln in lines)
        run.info.update(victim=victim, fault_at_step=at, fault_happened=marker.exists(), retried=retried,
                        resumed=resumed, report_ok=bool(report and report.ok))
        clean = not (run.total("lost") or run.total("duplicated") or run.total("extra"))
        if err is not None:
            run.outcome, run.detail = "crash", first_line(err)
        elif not marker.exists():
            run.outcome = "fault not triggered"
        elif clean and report.ok:
            run.outcome = "recovered"
        else:
            run.outcome = "loss"
        _note_changed(run)
        report_run(run)
        out.append(run)
    return out


def _note_changed(run: Run) -> None:
    """Append to a Ray run's detail how many rows differ from the fault-free run, if any."""
    if run.total("changed"):
        run.detail = (run.detail + "; " if run.detail else "") + \
            f"{run.total('changed')} rows differ from the fault-free run"


def _popen_sweep(rb: RayBench, spec_path: Path, root: str, log_path: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moelab", "sweep", str(spec_path), "--storage", root, "--max-concurrent", "2",
           "--verbose"] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=rb.env(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=rb.work)


def _files(root: str, sweep: str, tid: str) -> bool:
    d = Path(root) / "metrics" / f"sweep={sweep}"
    return d.is_dir() and any(p.name.startswith(f"{tid}.") for p in d.iterdir())


def controller_killed_runs(rb: RayBench, runs: int, seed: int) -> list[Run]:
    from moelab.platform.controller import SweepError, run_sweep
    from moelab.platform.spec import expand, load_spec

    name, steps = "ck", 40
    expected = rb.reference(name, steps)
    spec_path = rb.spec(name, steps)
    trials = expand(load_spec(spec_path))
    base, deps = trials[0].trial_id, [t.trial_id for t in trials[1:]]
    out = []
    for i in range(runs):
        run = Run("controller_killed", i + 1)
        trigger = "dependent part-way" if i % 2 == 0 else "baseline part-way"
        root = os.path.join(rb.work, f"ck-{i}")
        log_path = Path(rb.work) / f"ck-{i}.log"
        t0 = time.perf_counter()
        proc = _popen_sweep(rb, spec_path, root, log_path)
        store = None
        killed_at: dict[str, Any] = {}
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                if os.path.isdir(root):
                    store = store or Store(root)
                    try:
                        b = store.read_trial(name, base)
                    except OSError:
                        continue
                    if trigger == "baseline part-way":
                        if b and b.get("status") == "running" and _files(root, name, base):
                            break
                        if b and b.get("status") == "finished":
                            trigger = "dependent part-way (the baseline finished first)"
                    if b and b.get("status") == "finished" and any(_files(root, name, d) for d in deps):
                        break
                time.sleep(0.05)
            alive = proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        st = Store(root)
        for t in [base, *deps]:
            with contextlib.suppress(OSError):
                killed_at[t] = (st.read_trial(name, t) or {}).get("status")
        lease = st.lease(name).read()
        lease_age = None if lease is None else time.time() - float(lease.get("heartbeat_at", 0))
        run.info.update(trigger=trigger, killed=alive, status_at_kill=killed_at,
                        lease_left=lease is not None, lease_live_for_s=None if lease is None else
                        round(float(lease.get("ttl_s", 0)) - lease_age, 1))
        first_resume, lines = None, []
        report = err = None
        try:
            report = run_sweep(load_spec(spec_path), storage=root, resume=True, max_concurrent=2, log=lines.append)
        except SweepError as e:
            first_resume = first_line(e, 220)
            if lease is not None and "being written by" in str(e):
                st.fs.delete_file(st.lease(name).path)  # the refusal says: "(or delete ROOT/_leases/SWEEP.json)"
                try:
                    report = run_sweep(load_spec(spec_path), storage=root, resume=True, max_concurrent=2,
                                       log=lines.append)
                except Exception as e2:  # noqa: BLE001
                    err = e2
            else:
                err = e
        except Exception as e:  # noqa: BLE001
            err = e
        run.wall_s = time.perf_counter() - t0
        rb.judge(run, root, name, expected)
        run.info.update(first_resume=first_resume or "ran", ran=report.ran if report else None,
                        skipped=report.skipped if report else None)
        rerun_finished = [t for t, s in killed_at.items() if s == "finished" and report and t in report.ran]
        clean = not (run.total("lost") or run.total("duplicated") or run.total("extra"))
        if not alive:
            run.outcome = "controller ended before the kill"
        elif err is not None:
            run.outcome, run.detail = "crash", first_line(err)
        elif clean and report.ok and not rerun_finished:
            run.outcome = "recovered" if first_resume is None else "recovered after deleting the lease"
        else:
            run.outcome = "loss"
        if rerun_finished:
            run.detail += f"; finished trials rerun: {rerun_finished}"
        _note_changed(run)
        report_run(run)
        out.append(run)
    return out


def two_controllers_runs(rb: RayBench, runs: int, seed: int) -> list[Run]:
    name, steps = "ck", 40  # the controller_killed sweep (long enough that a second controller finds it running)
    expected = rb.reference(name, steps)
    spec_path = rb.spec(name, steps)
    out = []
    for i in range(runs):
        run = Run("two_controllers", i + 1)
        together = i % 2 == 0
        root = os.path.join(rb.work, f"tc-{i}")
        logs = [Path(rb.work) / f"tc-{i}-{k}.log" for k in "ab"]
        t0 = time.perf_counter()
        a = _popen_sweep(rb, spec_path, root, logs[0], resume=True)
        if not together:
            deadline = time.time() + 180
            while time.time() < deadline and a.poll() is None and not (
                    os.path.isdir(Path(root) / "metrics" / f"sweep={name}")
                    and any((Path(root) / "metrics" / f"sweep={name}").iterdir())):
                time.sleep(0.05)
        b = _popen_sweep(rb, spec_path, root, logs[1], resume=True)
        procs = [a, b]
        try:
            for p in procs:
                p.wait(420)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        rcs = [p.returncode for p in procs]
        texts = [lg.read_text() for lg in logs]
        refused = [k for k, tx in enumerate(texts) if "being written by" in tx]
        run.wall_s = time.perf_counter() - t0
        rb.judge(run, root, name, expected)
        msg = next((ln for tx in texts for ln in tx.splitlines() if "being written by" in ln), "")
        ran = []  # trials each controller ran ("ran N, skipped M already done" on its report's last line)
        for tx in texts:
            m = re.search(r"; ran (\d+), skipped (\d+) already done", tx)
            ran.append(int(m.group(1)) if m else None)
        run.info.update(together=together, rcs=rcs, refused=refused, ran=ran, refusal=msg[:240])
        clean = not (run.total("lost") or run.total("duplicated") or run.total("extra"))
        if sorted(rcs) == [0, 2] and len(refused) == 1 and rcs[refused[0]] == 2 and clean:
            run.outcome = "one refused, naming the other"
        elif rcs == [0, 0] and 0 in ran and clean:
            run.outcome = "the second came after the first ended (ran nothing)"
        elif rcs == [0, 0]:
            run.outcome = "both ran" + ("" if clean else " (loss)")
        else:
            run.outcome = "other"
            run.detail = f"exit codes {rcs}; " + " | ".join(tx.strip().splitlines()[-1][:120] for tx in texts if tx.strip())
        report_run(run)
        out.append(run)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def report_run(run: Run) -> None:
    info = {k: v for k, v in run.info.items() if k not in ("errors", "unexpected")}
    errs = run.info.get("errors")
    say(f"  {run.fault} run {run.run}: {run.outcome}; lost {run.total('lost')}, dup {run.total('duplicated')}, "
        f"changed {run.total('changed')}, extra {run.total('extra')}, raw dups {run.raw_dups} of "
        f"{run.total('expected')} rows; {run.wall_s:.1f} s" + (f"; {run.detail}" if run.detail else ""))
    say(f"      {json.dumps(info, default=str)}")
    if errs:
        for e, n in list(errs.items())[:3]:
            say(f"      error x{n}: {e}")


def summarize(fault: str, runs: list[Run]) -> dict[str, Any]:
    outcomes = collections.Counter(r.outcome for r in runs)
    s = {"fault": fault, "runs": len(runs), "expected": sum(r.total("expected") for r in runs),
         "lost": sum(r.total("lost") for r in runs), "duplicated": sum(r.total("duplicated") for r in runs),
         "changed": sum(r.total("changed") for r in runs), "extra": sum(r.total("extra") for r in runs),
         "raw_dups": sum(r.raw_dups for r in runs), "outcomes": dict(outcomes),
         "wall_s": sum(r.wall_s for r in runs)}
    for what in ("lost", "duplicated", "changed", "expected"):
        s[f"{what}_by_table"] = {t: sum(getattr(r, what).get(t, 0) for r in runs) for t in TABLES}
    return s


def outcome_text(fault: str, runs: list[Run]) -> str:
    n = len(runs)
    oc = collections.Counter(r.outcome for r in runs)
    parts = [f"{k} {v}/{n}" for k, v in oc.most_common()]
    if fault in ("disk_full", "s3_upload_cut"):
        raised = sum(1 for r in runs if r.info.get("errors"))
        persisted = [r for r in runs if r.info.get("persist")]
        close_ok = sum(1 for r in persisted if r.info.get("close_raised"))
        temp = sum(r.info.get("temp_left", 0) for r in runs)
        orphans = sum(r.info.get("check_orphans", 0) + r.info.get("check_damaged", 0) for r in runs)
        parts.append(f"an OSError reached the writer in {raised}/{n}; full to the end: `close()` raised "
                     f"\"kept in memory\" in {close_ok}/{len(persisted)}; temp files left {temp}, "
                     f"check_store findings {orphans}")
    elif fault == "corrupt_file":
        flagged = sum(1 for r in runs if r.info.get("flagged_by_reader"))
        found = sum(1 for r in runs if r.info.get("found_by_check"))
        recheck = sum(1 for r in runs if not r.info.get("recheck_ok"))
        in_file = sum(r.info.get("lost_in_file", 0) for r in runs)
        second = [r for r in runs if r.info.get("lost_after_second_repair") is not None]
        more = sum(r.info["lost_after_second_repair"] - r.info.get("lost_after_repair", 0) for r in second)
        parts.append(f"reader warning named the file {flagged}/{n}, `check_store` found it {found}/{n}; "
                     f"rows lost in the damaged file itself {in_file}; after `--repair`, `check_store` not ok "
                     f"{recheck}/{n}" + (f" (a second `--repair` moved {more} more readable rows aside)"
                                         if second else ""))
    elif fault == "controller_killed":
        refused = [r for r in runs if r.info.get("first_resume") not in (None, "ran")]
        live = [r.info["lease_live_for_s"] for r in refused if r.info.get("lease_live_for_s") is not None]
        parts.append(f"the immediate `--resume` refused by the dead controller's lease {len(refused)}/{n}"
                     + (f" (the lease had {min(live):.0f}-{max(live):.0f} s left)" if live else ""))
    elif fault == "worker_killed":
        parts.append(f"fault fired {sum(1 for r in runs if r.info.get('fault_happened'))}/{n}, trial rerun "
                     f"{sum(1 for r in runs if r.info.get('retried'))}/{n}, resumed from a checkpoint "
                     f"{sum(1 for r in runs if r.info.get('resumed'))}/{n}")
    changed = sum(r.total("changed") for r in runs)
    if changed:
        parts.append(f"rows with other values than expected: {changed}")
    return "; ".join(parts)


def markdown(results: dict[str, list[Run]], args: argparse.Namespace, wall: float, cmd: str) -> str:
    today = date.today().isoformat()
    lines = [f"## Faults: rows lost and duplicated (issue 16), {today}, {args.machine}", "",
             f"`{cmd}` ({wall:.0f} s wall; store faults {args.runs_store} runs each, Ray faults "
             f"{args.runs_ray} runs each, seed {args.seed}; Ray trials on the `{args.ray_path}` path).", "",
             "| fault | how injected | runs | rows lost | rows duplicated | outcome |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for fault, runs in results.items():
        if not runs:
            continue
        s = summarize(fault, runs)
        how = HOW["disk_full_sim" if fault == "disk_full" and runs[0].info.get("disk") == "sim" else fault]
        lines.append(f"| {fault} | {how} | {len(runs)} | {s['lost']:,} of {s['expected']:,} | {s['duplicated']:,} | "
                     f"{outcome_text(fault, runs)} |")
    lines += ["", "Rows per table (lost / duplicated / changed of expected, all runs):", "",
              "| fault | metrics | experts | routing | trials | raw duplicates (hidden by dedupe) |",
              "| --- | --- | --- | --- | --- | ---: |"]
    for fault, runs in results.items():
        if not runs:
            continue
        s = summarize(fault, runs)
        cells = [f"{s['lost_by_table'][t]} / {s['duplicated_by_table'][t]} / {s['changed_by_table'][t]} of "
                 f"{s['expected_by_table'][t]:,}" for t in TABLES]
        lines.append(f"| {fault} | " + " | ".join(cells) + f" | {s['raw_dups']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-store", type=int, default=30, help="runs of each store-level fault")
    ap.add_argument("--runs-ray", type=int, default=3, help="runs of each Ray-level fault")
    ap.add_argument("--only", nargs="+", choices=FAULTS, help="only these faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray-path", choices=["tune", "train"], default="tune",
                    help="1-worker trials inside their Tune trials (default) or as Ray Train runs")
    ap.add_argument("--disk", choices=["auto", "tmpfs", "sim"], default="auto",
                    help="disk_full on a real tmpfs in a private mount namespace (needs root) or simulated")
    ap.add_argument("--machine", default="2-core CPU")
    ap.add_argument("--markdown", help="write the RESULTS.md section here")
    ap.add_argument("--json", help="write every run's counts here")
    ap.add_argument("--_disk-child", dest="disk_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.disk_child:  # inside `unshare --mount`, the tmpfs mounted at args.disk_child
        runs = disk_full_runs(args.runs_store, args.seed, "tmpfs", args.disk_child)
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], default=str))
        return 0

    faults = args.only or list(FAULTS)
    cmd = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python bench/fault_matrix.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    t_all = time.perf_counter()
    results: dict[str, list[Run]] = {}
    say(f"fault matrix: {', '.join(faults)}; {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for fault in [f for f in FAULTS if f in faults and f in STORE_FAULTS]:
        say(f"{fault}: {args.runs_store} runs")
        t = time.perf_counter()
        if fault == "disk_full":
            disk = args.disk
            if disk == "auto":
                disk = "tmpfs" if tmpfs_possible() else "sim"
            results[fault] = disk_full_in_namespace(args.runs_store, args.seed) if disk == "tmpfs" else \
                disk_full_runs(args.runs_store, args.seed, "sim", None)
        elif fault == "s3_upload_cut":
            results[fault] = s3_runs(args.runs_store, args.seed)
        else:
            results[fault] = corrupt_runs(args.runs_store, args.seed)
        say(f"{fault}: {time.perf_counter() - t:.1f} s; {outcome_text(fault, results[fault])}")
    ray_faults = [f for f in RAY_FAULTS if f in faults]
    if ray_faults and args.runs_ray > 0:
        work = tempfile.mkdtemp(prefix="fm-ray-")
        say(f"Ray faults: {', '.join(ray_faults)}, {args.runs_ray} runs each, in {work}")
        rb = RayBench(args.ray_path, work)
        try:
            for fault in ray_faults:
                t = time.perf_counter()
                say(f"{fault}: {args.runs_ray} runs")
                fn = {"worker_killed": worker_killed_runs, "controller_killed": controller_killed_runs,
                      "two_controllers": two_controllers_runs}[fault]
                try:
                    results[fault] = fn(rb, args.runs_ray, args.seed)
                except Exception:  # noqa: BLE001 - the other faults still run
                    traceback.print_exc()
                    results[fault] = []
                if results[fault]:
                    say(f"{fault}: {time.perf_counter() - t:.1f} s; {outcome_text(fault, results[fault])}")
        finally:
            rb.close()
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t_all
    text = markdown(results, args, wall, cmd)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({f: [asdict(r) for r in rs] for f, rs in results.items()},
                                              default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
