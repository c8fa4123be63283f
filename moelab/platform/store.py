"""The results store: Parquet tables `trials`, `metrics`, `experts`, `routing` (design.md "Tables") under one
root.

Layout (Hive-partitioned by sweep; the root is a local directory or any pyarrow.fs URI such as s3://b/p)::

    ROOT/trials/sweep=S/TRIAL_ID.parquet                       one row; rewritten whole on every change
    ROOT/metrics/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  one batch of logged steps FIRST..LAST
    ROOT/experts/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  expert load of the same steps
    ROOT/routing/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  routed tokens per domain x expert, same steps
    ROOT/_quarantine/STAMP/...                                  damaged files moved aside by `check_store`
    ROOT/_leases/S.json                                         who writes sweep S (`Store.lease`)

Guarantees:
  * A file is visible whole or not at all: it is written to a hidden `.tmp-*` name in the same directory,
    its row count is read back from the written footer, and only then is it published: renamed on a local
    disk, copied server-side to the final key on an object store (a copy is atomic; a failed upload can
    leave a complete-looking object, apache/arrow#40502, which is why the footer is checked first).
    Readers skip names starting with `.` or `_`.
  * Nothing is lost to a failed write: buffered rows stay buffered until their files are published, and
    are written again by the next flush.
  * Idempotent: a batch's name is its (trial, attempt, step range), so writing the same batch again replaces
    it; a trial's row is one file, so the latest write wins. `update_trial` is a read-modify-write under a
    lock shared by every Store of the process and, on a local disk, a file lock shared by every process.
  * Restarts: a restarted trial must write with a higher `attempt`; readers (`moelab.results`) keep, for each
    (sweep, trial_id, step), the row of the highest attempt.
  * Names that reach a path (table, sweep, trial, batch file) are checked here, whoever calls; listings go
    two levels deep (table/sweep=S/file) and never follow a symlink out of the root.

Metric rows are the training loop's dicts; `expert_load` (a list per MoE layer of per-expert load fractions)
is split off into `experts` (layer = index among the MoE layers), and `expert_domain` (only when the data
has domains: a list per MoE layer of [n_domains][n_experts] routed-slot counts over the log interval) into
`routing`, one row per (step, layer, domain, expert), zero counts included, so a restarted attempt's rows
replace every row of the step. Keys outside `METRIC_COLUMNS` are dropped:
Ray Tune adds bookkeeping keys (`training_iteration`, `time_this_iter_s`, ...) that are not metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no cross-process trial lock (the one-writer rule still holds per sweep)
    fcntl = None

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "Store", "StoreError", "DamagedFileWarning", "TABLES", "STATUSES", "METRIC_COLUMNS", "METRICS_SCHEMA",
    "EXPERTS_SCHEMA", "ROUTING_SCHEMA", "TRIAL_TYPES", "resolve_root", "list_files", "list_file_infos",
    "list_sweeps", "partition_dir", "check_name", "redact_uri", "put_table", "check_store", "CheckReport",
    "QUARANTINE", "Lease", "LeaseHeld",
]

log = logging.getLogger("moelab.store")

TABLES = ("trials", "metrics", "experts", "routing")
PATH_TABLES = (*TABLES, "fits")  # every table directory under a root (`fits` is written by moelab fit)
STATUSES = ("pending", "running", "finished", "failed", "diverged")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # sweep and trial ids: safe in paths, keys and URIs
# A file inside a partition: dot-separated safe parts ending in .parquet; no empty part, so never `..`.
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.parquet$")
QUARANTINE = "_quarantine"  # ROOT/_quarantine/: damaged files moved aside; no reader lists it
TMP_PREFIX = ".tmp-"

# metrics: one row per trial x logged step. File schema (the `sweep` column comes from the partition).
METRIC_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "tokens": pa.int64(), "flops": pa.float64(), "wall_s": pa.float64(),
    "loss": pa.float64(), "eval_loss": pa.float64(), "lr": pa.float64(), "grad_norm": pa.float64(),
    "aux_loss": pa.float64(), "z_loss": pa.float64(), "seq_aux_loss": pa.float64(), "tokens_per_s": pa.float64(),
    "mfu": pa.float64(), "drop_frac": pa.float64(), "imbalance": pa.float64(), "router_entropy": pa.float64(),
    "mtp_loss": pa.float64(),  # multi-token prediction (model.mtp_depth > 0): mean CE over the depths
    "max_mem_gib": pa.float64(),  # peak CUDA memory allocated since the run's process started; NaN on CPU
}
METRICS_SCHEMA = pa.schema([("trial_id", pa.string()), ("attempt", pa.int64()),
                            *[(k, t) for k, t in METRIC_COLUMNS.items()]])
EXPERTS_SCHEMA = pa.schema([("trial_id", pa.string()), ("attempt", pa.int64()), ("step", pa.int64()),
                            ("layer", pa.int32()), ("expert", pa.int32()), ("load", pa.float32())])
# routing: tokens (routed slots: a token counts once per top-k expert that computed it) per domain and expert
ROUTING_SCHEMA = pa.schema([("trial_id", pa.string()), ("attempt", pa.int64()), ("step", pa.int64()),
                            ("layer", pa.int32()), ("domain", pa.int32()), ("expert", pa.int32()),
                            ("tokens", pa.int64())])
SWEEP_FIELD = pa.field("sweep", pa.string())

# trials: the fixed columns. Other keys of a trial row (axis labels, the flattened config `model.d_model`,
# ...) are stored with the type of their Python value; lists and dicts as JSON strings.
TRIAL_TYPES: dict[str, pa.DataType] = {
    "trial_id": pa.string(), "family": pa.string(), "name": pa.string(), "preset": pa.string(),
    "seed": pa.int64(), "depends_on": pa.string(), "upcycle_from": pa.string(), "status": pa.string(),
    "attempt": pa.int64(), "axis_values": pa.string(), "overrides": pa.string(), "config": pa.string(),
    "params_total": pa.int64(), "params_active": pa.int64(), "params_non_embedding": pa.int64(),
    "flops_per_token": pa.float64(), "steps": pa.int64(), "tokens": pa.int64(), "flops": pa.float64(),
    "final_step": pa.int64(), "final_tokens": pa.int64(), "final_flops": pa.float64(),
    "final_loss": pa.float64(), "final_eval_loss": pa.float64(), "wall_s": pa.float64(),
    "error": pa.string(), "updated_at": pa.timestamp("us", tz="UTC"),
}
TRIALS_SCHEMA = pa.schema([(k, t) for k, t in TRIAL_TYPES.items()])


class StoreError(ValueError):
    """A bad argument to the store (unsafe name, unknown status, malformed row)."""


class DamagedFileWarning(UserWarning):
    """A file of the store could not be read and was skipped (`moelab store check ROOT --repair` moves it
    aside)."""


def check_name(kind: str, value: Any) -> str:
    """`value` if it is a safe sweep / trial name (letters, digits, `_`, `-`), else StoreError naming `kind`."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise StoreError(f"{kind}: got {_shorten(value)}; allowed: letters, digits, '_' and '-' (starting with a "
                         f"letter or digit)")
    return value


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _check_table(table: Any) -> str:
    if table not in PATH_TABLES:
        raise StoreError(f"table: got {_shorten(table)}; allowed: {', '.join(PATH_TABLES)}")
    return table


_SECRET_PARAM = re.compile(r"(secret|token|password|passwd|credential|signature|(^|_)key$|^sig$|auth)", re.I)


def redact_uri(uri: str | os.PathLike) -> str:
    """`uri` fit to print: `user:password@` and secret-looking query values (access_key, secret_key,
    session_token, ...) replaced by `***`. Local paths come back unchanged."""
    text = os.fspath(uri)
    if "://" not in text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return "<unprintable URI>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if _SECRET_PARAM.search(k) else v}" for k, v in pairs)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ----------------------------------------------------------------------------------------------------------
# Paths


def resolve_root(root: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local directory or a pyarrow.fs URI (`s3://bucket/prefix?endpoint_override=..`)."""
    root = os.fspath(root)
    if filesystem is not None:
        return filesystem, root.rstrip("/")
    if "://" in root:
        try:
            fs, path = pafs.FileSystem.from_uri(root)
        except (ValueError, OSError) as e:  # pyarrow's message quotes the URI, credentials included
            raise type(e)(f"cannot open the store {redact_uri(root)}: {type(e).__name__}") from None
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def partition_dir(root: str, table: str, sweep: str) -> str:
    """ROOT/table/sweep=S, with `table` and `sweep` checked: the one place partition paths are made."""
    return f"{root}/{_check_table(table)}/sweep={check_name('sweep', sweep)}"


def _visible(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def _within(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _entries(fs: pafs.FileSystem, root: str, directory: str) -> list[pafs.FileInfo]:
    """One directory level, never recursive (a recursive listing follows symlink loops forever). On a local
    disk the directory and each entry must resolve inside the root: a link to /etc is not followed, whether
    it is a file, a partition or a table directory. Object stores have no links."""
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and not _within(directory, root):
        return []
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False, allow_not_found=True))
    except NotADirectoryError:
        return []
    return [i for i in infos if not local or not os.path.islink(i.path) or _within(i.path, root)]


def list_sweeps(fs: pafs.FileSystem, root: str, tables: Sequence[str] = TABLES) -> list[str]:
    """Names of the sweeps with a partition in any of `tables` (directories `sweep=NAME` with a valid NAME)."""
    out = set()
    for table in tables:
        for info in _entries(fs, root, f"{root}/{_check_table(table)}"):
            name = info.base_name.removeprefix("sweep=")
            if info.type == pafs.FileType.Directory and info.base_name.startswith("sweep=") and NAME_RE.match(name):
                out.add(name)
    return sorted(out)


def list_file_infos(fs: pafs.FileSystem, root: str, table: str, sweeps: Sequence[str] | None = None,
                    trials: Iterable[str] | None = None, *, hidden: bool = False) -> list[pafs.FileInfo]:
    """The Parquet files of `table` (`FileInfo`s, sorted by path), optionally only those of some sweeps /
    trial ids (file names start with `TRIAL_ID.`). Names are checked (StoreError); only ROOT/table/sweep=S/FILE
    is looked at, and symlinks out of the root are not followed. `hidden`: also temp files (`.tmp-*`) and
    other names a reader skips (for `check_store`)."""
    _check_table(table)
    if sweeps is None:
        sweeps = list_sweeps(fs, root, [table])
    dirs = [partition_dir(root, table, s) for s in sweeps]
    wanted = None if trials is None else {check_name("trial_id", t) for t in trials}
    out = []
    for d in dirs:
        for info in _entries(fs, root, d):
            if info.type != pafs.FileType.File or not (hidden or _visible(info.base_name)):
                continue
            if wanted is not None and info.base_name.split(".", 1)[0] not in wanted:
                continue
            out.append(info)
    return sorted(out, key=lambda i: i.path)


def list_files(fs: pafs.FileSystem, root: str, table: str, sweeps: Sequence[str] | None = None,
               trials: Iterable[str] | None = None) -> list[str]:
    """The finished Parquet files of `table` (temp files and other names skipped), optionally only those of
    some sweeps / trial ids. Sorted, so reads are deterministic. See `list_file_infos`."""
    return [i.path for i in list_file_infos(fs, root, table, sweeps, trials)]


def put_table(fs: pafs.FileSystem, path: str, table: pa.Table, compression: str = "snappy") -> None:
    """Write `table` to `path` so that readers see the whole file or nothing: write a hidden temp file next
    to it, read its footer back and compare the row count, then publish (rename locally; server-side copy
    on an object store, whose copy is atomic). On any failure the temp file is removed (best effort: a
    leftover is an orphan that `check_store` finds) and the target is untouched."""
    directory, name = path.rsplit("/", 1)
    if not FILE_RE.match(name):
        raise StoreError(f"file name: got {_shorten(name)}; allowed: letters, digits, '_', '-' and single dots, "
                         f"ending in .parquet")
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        pq.write_table(table, tmp, filesystem=fs, compression=compression)
        try:
            got = pq.read_metadata(tmp, filesystem=fs).num_rows
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"{path}: the written file does not read back ({type(e).__name__}: {e}); "
                          f"not published") from None
        if got != table.num_rows:
            raise OSError(f"{path}: wrote {table.num_rows} rows but the file holds {got}; not published")
        if local:
            fs.move(tmp, path)  # rename(2): atomic, replaces an existing file
        else:
            fs.copy_file(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    if not local:
        try:
            fs.delete_file(tmp)
        except OSError:  # published already; the leftover temp file is invisible to readers
            log.warning("store: could not remove the temp file %s", tmp)


# One lock per trial row for every Store of this process: two Store objects on one root (the controller's
# and a sink's, say) must not interleave a read-modify-write of the same row.
_ROW_LOCKS: dict[tuple[str, str, str, str], threading.Lock] = {}
_ROW_LOCKS_GUARD = threading.Lock()


def _row_lock(fs: pafs.FileSystem, root: str, sweep: str, trial_id: str) -> threading.Lock:
    key = (fs.type_name, root, sweep, trial_id)
    with _ROW_LOCKS_GUARD:
        return _ROW_LOCKS.setdefault(key, threading.Lock())


# ----------------------------------------------------------------------------------------------------------
# Row -> Arrow


def _py(value: Any) -> Any:
    """Plain Python scalars (numpy / torch 0-d values have .item())."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        try:
            return value.item()
        except (ValueError, TypeError):
            return value
    return value


def _trial_table(row: Mapping[str, Any]) -> pa.Table:
    arrays, fields = [], []
    for key, value in row.items():
        if key == "sweep":
            continue
        value = _py(value)
        if key in TRIAL_TYPES:
            tp = TRIAL_TYPES[key]
            if value is not None and pa.types.is_string(tp) and not isinstance(value, str):
                value = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
            if value is not None and pa.types.is_integer(tp):
                if isinstance(value, float) and not value.is_integer():
                    raise StoreError(f"trials.{key}: got {value!r}; allowed: an integer")
                value = int(value)
        else:
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value)
            tp = pa.null() if value is None else None
        arr = pa.array([value], type=tp)
        arrays.append(arr)
        fields.append(pa.field(key, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _metrics_table(trial_id: str, attempt: int, rows: list[Mapping[str, Any]]) -> pa.Table:
    n = len(rows)
    cols: dict[str, Any] = {"trial_id": pa.array([trial_id] * n, pa.string()),
                            "attempt": pa.array(np.full(n, attempt, np.int64))}
    for key, tp in METRIC_COLUMNS.items():
        values = [_py(r.get(key)) for r in rows]
        cast = int if pa.types.is_integer(tp) else float
        try:
            values = [None if v is None else cast(v) for v in values]
        except (TypeError, ValueError):
            bad = next(v for v in values if v is not None and not _castable(cast, v))
            raise StoreError(f"metrics.{key}: got {_shorten(bad)}; allowed: a number") from None
        cols[key] = pa.array(values, tp)
    return pa.table(cols, schema=METRICS_SCHEMA)


def _castable(cast: Any, value: Any) -> bool:
    try:
        cast(value)
    except (TypeError, ValueError):
        return False
    return True


# Expert load and routing counts are checked and converted when they arrive, not at flush: a malformed
# value must fail the call that brought it, not stay in a buffer that then can never be written.
def _load_arrays(step: int, load: Any) -> list[np.ndarray]:
    """expert_load of one step -> a float32 vector per MoE layer."""
    try:
        out = [np.asarray(fracs, np.float32) for fracs in load]
    except (TypeError, ValueError):
        raise StoreError(f"experts: step {step}: expert_load must be a list per layer of numbers") from None
    for layer, f in enumerate(out):
        if f.ndim != 1:
            raise StoreError(f"experts: step {step} layer {layer}: load of shape {f.shape}; allowed: [n_experts]")
    return out


def _count_arrays(step: int, counts: Any) -> list[np.ndarray]:
    """expert_domain of one step -> an int64 [n_domains, n_experts] matrix per MoE layer."""
    out = []
    for layer, mat in enumerate(counts):
        try:
            c = np.asarray(mat, np.float64)
        except (TypeError, ValueError):
            raise StoreError(f"routing: step {step} layer {layer}: counts must be numbers") from None
        if c.ndim != 2:
            raise StoreError(f"routing: step {step} layer {layer}: counts of shape {c.shape}; allowed: "
                             f"[n_domains, n_experts]")
        if np.any(c != np.round(c)) or np.any(c < 0):
            raise StoreError(f"routing: step {step} layer {layer}: counts must be whole numbers >= 0")
        out.append(c.astype(np.int64))
    return out


def _columnar_metrics(trial_id: str, attempt: int, columns: Mapping[str, Any]) -> tuple[pa.Table, Any]:
    """A metrics table from equal-length columns (numpy arrays or lists); returns (table, expert_load)."""
    if "step" not in columns:
        raise StoreError("metrics: columns need 'step'")
    n = len(columns["step"])
    cols: dict[str, Any] = {"trial_id": pa.array([trial_id] * n, pa.string()),
                            "attempt": pa.array(np.full(n, attempt, np.int64))}
    for key, tp in METRIC_COLUMNS.items():
        v = columns.get(key)
        if v is None:
            cols[key] = pa.nulls(n, tp)
        else:
            arr = np.asarray(v)
            if len(arr) != n:
                raise StoreError(f"metrics.{key}: {len(arr)} values; allowed: {n} (as many as 'step')")
            cols[key] = pa.array(arr, tp, from_pandas=True)  # NaN stays NaN for floats
    return pa.table(cols, schema=METRICS_SCHEMA), columns.get("expert_load")


def _experts_table(trial_id: str, attempt: int, items: list[tuple[int, Any]]) -> pa.Table:
    steps, layers, experts, loads = [], [], [], []
    for step, load in items:
        for layer, fracs in enumerate(load):
            f = np.asarray(fracs, np.float32).ravel()
            steps.append(np.full(len(f), step, np.int64))
            layers.append(np.full(len(f), layer, np.int32))
            experts.append(np.arange(len(f), dtype=np.int32))
            loads.append(f)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    s = cat(steps, np.int64)
    return pa.table({"trial_id": pa.array([trial_id] * len(s), pa.string()),
                     "attempt": pa.array(np.full(len(s), attempt, np.int64)), "step": pa.array(s),
                     "layer": pa.array(cat(layers, np.int32)), "expert": pa.array(cat(experts, np.int32)),
                     "load": pa.array(cat(loads, np.float32))}, schema=EXPERTS_SCHEMA)


def _routing_table(trial_id: str, attempt: int, items: list[tuple[int, Any]]) -> pa.Table:
    """items: (step, counts) with counts a list per MoE layer of [n_domains, n_experts] -> ROUTING_SCHEMA rows,
    ordered by (step, layer, domain, expert)."""
    cols: dict[str, list[np.ndarray]] = {"step": [], "layer": [], "domain": [], "expert": [], "tokens": []}
    for step, counts in items:
        for layer, mat in enumerate(counts):
            c = np.asarray(mat)
            if c.ndim != 2:
                raise StoreError(f"routing: step {step} layer {layer}: counts of shape {c.shape}; allowed: "
                                 f"[n_domains, n_experts]")
            if np.any(c != np.round(c)) or np.any(c < 0):
                raise StoreError(f"routing: step {step} layer {layer}: counts must be whole numbers >= 0")
            domain, expert = np.indices(c.shape, dtype=np.int32)
            cols["step"].append(np.full(c.size, step, np.int64))
            cols["layer"].append(np.full(c.size, layer, np.int32))
            cols["domain"].append(domain.ravel())
            cols["expert"].append(expert.ravel())
            cols["tokens"].append(c.astype(np.int64).ravel())
    dtypes = {"step": np.int64, "tokens": np.int64}
    cat = {k: np.concatenate(v) if v else np.zeros(0, dtypes.get(k, np.int32)) for k, v in cols.items()}
    n = len(cat["step"])
    return pa.table({"trial_id": pa.array([trial_id] * n, pa.string()),
                     "attempt": pa.array(np.full(n, attempt, np.int64)),
                     **{k: pa.array(v) for k, v in cat.items()}}, schema=ROUTING_SCHEMA)


# ----------------------------------------------------------------------------------------------------------
# The writer


class _Buffer:
    """Rows of one (sweep, trial, attempt) waiting to be written, already typed and checked."""

    __slots__ = ("tables", "experts", "routing", "since", "retry_at", "failures", "stale")

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []  # metrics, in arrival order
        self.experts: list[tuple[int, list[np.ndarray]]] = []  # (step, load per layer)
        self.routing: list[tuple[int, list[np.ndarray]]] = []  # (step, counts per layer)
        self.since = time.monotonic()
        self.retry_at = 0.0  # after a failed automatic flush: not before this (monotonic seconds)
        self.failures = 0
        # Files published by a flush that failed later on (metrics written, experts not): the retry writes
        # them again, maybe under a wider step range, and then removes these.
        self.stale: set[str] = set()

    def __len__(self) -> int:
        return sum(t.num_rows for t in self.tables)


class Store:
    """Writes the tables under `root` (a directory or a pyarrow.fs URI). Thread-safe.

    Metric, expert and routing rows are buffered per (sweep, trial, attempt) and written as one Parquet file per
    batch once `batch_rows` metric rows are waiting or `flush_s` seconds have passed since the batch began
    (checked when rows arrive), and on `flush()` / `close()` / leaving a `with` block. Trial rows are
    written at once.

    A write that fails keeps its rows buffered. An automatic flush (from an append) then logs a warning and
    tries again on a later append, waiting `retry_s` seconds, doubling up to 5 minutes; `flush()` and
    `close()` try at once and raise OSError when rows remain unwritten.
    """

    def __init__(self, root: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                 batch_rows: int = 1000, flush_s: float = 30.0, compression: str = "snappy",
                 retry_s: float = 5.0):
        self.fs, self.root = resolve_root(root, filesystem)
        self.uri = os.fspath(root)
        self.display_uri = redact_uri(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.batch_rows, self.flush_s, self.compression = batch_rows, flush_s, compression
        self.retry_s = retry_s
        self._buffers: dict[tuple[str, str, int], _Buffer] = {}
        self._lock = threading.RLock()
        self.files_written = 0
        self.last_error: str | None = None  # the latest failed write, for progress lines

    # -- low level --------------------------------------------------------------------------------------------
    def _put(self, path: str, table: pa.Table) -> None:
        """Write `table` to `path` so that readers see the whole file or nothing (see `put_table`)."""
        put_table(self.fs, path, table, self.compression)
        self.files_written += 1

    def write_batch(self, table_name: str, sweep: str, name: str, table: pa.Table) -> str:
        """Write one whole file `ROOT/table_name/sweep=S/name` atomically (replacing any file of that name).
        `name` is one file name (letters, digits, `_`, `-`, single dots, `.parquet`): never a path."""
        if table_name not in TABLES:
            raise StoreError(f"table: got {_shorten(table_name)}; allowed: {', '.join(TABLES)}")
        if not isinstance(name, str) or not FILE_RE.match(name):
            raise StoreError(f"file name: got {_shorten(name)}; allowed: letters, digits, '_', '-' and single "
                             f"dots, ending in .parquet (a name, not a path)")
        path = f"{partition_dir(self.root, table_name, sweep)}/{name}"
        self._put(path, table)
        return path

    # -- trials -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _row_locked(self, sweep: str, trial_id: str) -> Iterator[None]:
        """Exclusive use of one trial row: in this process (every Store), and on a local disk across
        processes too (flock on ROOT/_locks/sweep=S/TRIAL.lock, released by the kernel if the holder dies)."""
        with _row_lock(self.fs, self.root, sweep, trial_id):
            if not self.local or fcntl is None:
                yield
                return
            directory = f"{self.root}/_locks/sweep={sweep}"
            os.makedirs(directory, exist_ok=True)
            with open(f"{directory}/{trial_id}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _write_row(self, row: dict[str, Any], sweep: str, trial_id: str) -> None:
        status = row.get("status")
        if status is not None and status not in STATUSES:
            raise StoreError(f"trials.status: got {status!r}; allowed: {', '.join(STATUSES)}")
        row["updated_at"] = datetime.now(timezone.utc)
        self.write_batch("trials", sweep, f"{trial_id}.parquet", _trial_table(row))

    def write_trial(self, row: Mapping[str, Any]) -> None:
        """Write a trial's whole row (keys: sweep, trial_id, and any columns; see TRIAL_TYPES), replacing the
        previous one. `updated_at` is set to now."""
        row = dict(row)
        sweep = check_name("sweep", row.get("sweep"))
        trial_id = check_name("trial_id", row.get("trial_id"))
        with self._row_locked(sweep, trial_id):
            self._write_row(row, sweep, trial_id)

    def read_trial(self, sweep: str, trial_id: str) -> dict[str, Any] | None:
        """The stored row of one trial, or None."""
        directory = partition_dir(self.root, "trials", sweep)
        path = f"{directory}/{check_name('trial_id', trial_id)}.parquet"
        try:
            # One open handle: reading by path opens the file more than once, and a writer's rename between
            # two opens (a row replaced while a sweep runs) fails the read.
            with self.fs.open_input_file(path) as fh:
                rows = pq.read_table(fh).to_pylist()
        except FileNotFoundError:
            return None
        return {"sweep": sweep, **rows[0]} if rows else None

    def update_trial(self, sweep: str, trial_id: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` (status, final_loss, error, ...) into the stored row and rewrite it; returns the row.
        Two updates of one row never interleave (see `_row_locked`), so neither loses the other's fields."""
        check_name("sweep", sweep)
        check_name("trial_id", trial_id)
        with self._row_locked(sweep, trial_id):
            row = self.read_trial(sweep, trial_id) or {"sweep": sweep, "trial_id": trial_id}
            row.update(fields)
            self._write_row(row, sweep, trial_id)
            return row

    # -- metrics and experts ------------------------------------------------------------------------------------
    def append_metrics(self, sweep: str, trial_id: str, attempt: int,
                       rows: Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> None:
        """Buffer logged steps of one trial attempt: a list of row dicts (the training loop's), or a mapping of
        equal-length columns (numpy arrays; `expert_load` then shaped steps x layers x experts, `expert_domain`
        steps x layers x domains x experts). A malformed value raises StoreError here, and nothing of the
        call is buffered."""
        key = (check_name("sweep", sweep), check_name("trial_id", trial_id), int(attempt))
        experts: list[tuple[int, list[np.ndarray]]] = []
        routing: list[tuple[int, list[np.ndarray]]] = []
        if isinstance(rows, Mapping):
            table, load = _columnar_metrics(trial_id, key[2], rows)
            steps = table.column("step").to_pylist()
            if load is not None:
                experts = [(s, _load_arrays(s, x)) for s, x in zip(steps, load)]
            if rows.get("expert_domain") is not None:
                routing = [(s, _count_arrays(s, x)) for s, x in zip(steps, rows["expert_domain"])]
        else:
            rows = list(rows)
            for r in rows:
                if r.get("step") is None:
                    raise StoreError(f"metrics: a row without 'step': {_shorten(dict(r))}")
                step = int(r["step"])
                if r.get("expert_load") is not None:
                    experts.append((step, _load_arrays(step, r["expert_load"])))
                if r.get("expert_domain") is not None:
                    routing.append((step, _count_arrays(step, r["expert_domain"])))
            table = _metrics_table(trial_id, key[2], rows)
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            if table.num_rows:
                buf.tables.append(table)
            buf.experts.extend(experts)
            buf.routing.extend(routing)
            self._maybe_flush(key, buf)

    def append_experts(self, sweep: str, trial_id: str, attempt: int, step: int,
                       expert_load: Sequence[Sequence[float]]) -> None:
        """Buffer the expert load of one step: a list per MoE layer of per-expert fractions."""
        key = (check_name("sweep", sweep), check_name("trial_id", trial_id), int(attempt))
        item = (int(step), _load_arrays(int(step), expert_load))
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            buf.experts.append(item)
            self._maybe_flush(key, buf)

    def append_routing(self, sweep: str, trial_id: str, attempt: int, step: int,
                       expert_domain: Sequence[Any]) -> None:
        """Buffer the routed-token counts of one step: a list per MoE layer of [n_domains][n_experts] counts."""
        key = (check_name("sweep", sweep), check_name("trial_id", trial_id), int(attempt))
        item = (int(step), _count_arrays(int(step), expert_domain))
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            buf.routing.append(item)
            self._maybe_flush(key, buf)

    def _maybe_flush(self, key: tuple[str, str, int], buf: _Buffer) -> None:
        now = time.monotonic()
        due = len(buf) >= self.batch_rows or max(len(buf.experts), len(buf.routing)) >= self.batch_rows \
            or now - buf.since >= self.flush_s
        if not due or now < buf.retry_at:
            return
        try:
            self._flush_key(key)
        except (OSError, pa.ArrowException) as e:
            # The rows stay buffered; the appender (a training run's reports) goes on.
            buf.failures += 1
            wait = min(self.retry_s * 2 ** (buf.failures - 1), 300.0)
            buf.retry_at = now + wait
            log.warning("store: writing %d buffered rows of %s/%s failed (%s); kept, retrying in %.0f s",
                        len(buf), key[0], key[1], self.last_error, wait)

    def _flush_key(self, key: tuple[str, str, int]) -> int:
        """Write one buffer's files; the rows are dropped only once every file is published."""
        buf = self._buffers.get(key)
        if buf is None:
            return 0
        sweep, trial_id, attempt = key
        plan: list[tuple[str, str, pa.Table]] = []
        if buf.tables:
            table = pa.concat_tables(buf.tables) if len(buf.tables) > 1 else buf.tables[0]
            table = _last_per_step(table)
            first, last = table.column("step")[0].as_py(), table.column("step")[-1].as_py()
            plan.append(("metrics", _batch_name(trial_id, attempt, first, last), table))
        if buf.experts:
            items = sorted({step: load for step, load in buf.experts}.items())
            plan.append(("experts", _batch_name(trial_id, attempt, items[0][0], items[-1][0]),
                         _experts_table(trial_id, attempt, items)))
        if buf.routing:
            items = sorted({step: counts for step, counts in buf.routing}.items())  # a step twice: the last wins
            plan.append(("routing", _batch_name(trial_id, attempt, items[0][0], items[-1][0]),
                         _routing_table(trial_id, attempt, items)))
        written: list[str] = []
        try:
            for table_name, name, table in plan:
                written.append(self.write_batch(table_name, sweep, name, table))
        except BaseException as e:
            buf.stale.update(written)
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        del self._buffers[key]
        for path in buf.stale.difference(written):  # superseded by the files just published
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)
        return len(written)

    def flush(self, sweep: str | None = None, trial_id: str | None = None) -> int:
        """Write out buffered rows (all, or one sweep's / one trial's); returns the number of files written.
        Every buffer is tried; if any write fails, its rows stay buffered and OSError says how many."""
        with self._lock:
            keys = [k for k in self._buffers
                    if (sweep is None or k[0] == sweep) and (trial_id is None or k[1] == trial_id)]
            written, failed = 0, []
            for k in keys:
                try:
                    written += self._flush_key(k)
                except (OSError, pa.ArrowException) as e:
                    failed.append((k, e))
            if failed:
                rows = sum(len(self._buffers[k]) for k, _ in failed if k in self._buffers)
                k, e = failed[0]
                raise OSError(f"store {self.display_uri}: {rows} metric rows of {len(failed)} trial attempt(s) "
                              f"not written, kept in memory (flush again to retry); {k[0]}/{k[1]}: "
                              f"{type(e).__name__}: {e}") from e
            return written

    def compact(self, sweep: str, trial_id: str | None = None) -> int:
        """Merge each trial's metric (expert, routing) batches into one deduplicated file; returns how many files
        were removed. For finished trials: reading is mostly a cost per file, and a trial flushed every
        `flush_s` for hours leaves hundreds. The merged file is written (atomically) before the old ones are
        deleted, so a reader never misses rows (it may see both for a moment; its dedupe hides that). A file
        that cannot be read is left where it is (DamagedFileWarning) and the others are merged."""
        check_name("sweep", sweep)
        self.flush(sweep, trial_id)
        removed = 0
        for table, keys in (("metrics", ["step"]), ("experts", ["step", "layer", "expert"]),
                            ("routing", ["step", "layer", "domain", "expert"])):
            files = list_files(self.fs, self.root, table, [sweep], None if trial_id is None else [trial_id])
            by_trial: dict[str, list[str]] = {}
            for path in files:
                by_trial.setdefault(path.rsplit("/", 1)[1].split(".", 1)[0], []).append(path)
            for tid, paths in by_trial.items():
                if len(paths) < 2:
                    continue
                parts, read = [], []
                for path in paths:
                    try:
                        parts.append(pq.read_table(path, filesystem=self.fs))
                        read.append(path)
                    except (OSError, pa.ArrowException) as e:
                        warn_damaged(path, e)
                if len(read) < 2:
                    continue
                merged = _keep_latest(pa.concat_tables(parts), keys)
                steps = merged.column("step")
                name = _batch_name(tid, int(pc.max(merged.column("attempt")).as_py()), steps[0].as_py(),
                                   steps[-1].as_py())
                target = self.write_batch(table, sweep, name, merged)
                for path in read:
                    if path != target:
                        self.fs.delete_file(path)
                        removed += 1
        return removed

    def lease(self, sweep: str, **kw: Any) -> "Lease":
        """The one-writer lease of `sweep` (not yet acquired): `with store.lease(name): ...` raises LeaseHeld
        naming the owner when another live process writes the sweep. See `Lease`."""
        return Lease(self, sweep, **kw)

    def pending_rows(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buffers.values())

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.display_uri!r})"


def warn_damaged(path: str, err: BaseException, stacklevel: int = 3) -> None:
    """Say that an unreadable file was skipped, naming it (readers and compaction go on without it)."""
    first = str(err).splitlines()[0] if str(err) else ""
    warnings.warn(f"{path}: skipped, not readable ({type(err).__name__}: {first}); `moelab store check ROOT "
                  f"--repair` moves such files aside", DamagedFileWarning, stacklevel=stacklevel)


def _batch_name(trial_id: str, attempt: int, first: int, last: int) -> str:
    return f"{trial_id}.a{attempt:03d}.s{first:09d}-{last:09d}.parquet"


def _keep_latest(table: pa.Table, keys: list[str]) -> pa.Table:
    """Rows sorted by `keys`, one per key: the one of the highest attempt."""
    cols = [table.column(k).to_numpy(zero_copy_only=False) for k in reversed(keys)]
    attempt = table.column("attempt").to_numpy(zero_copy_only=False)
    order = np.lexsort([-attempt, *cols])  # last key is primary: keys[0], ..., then highest attempt first
    first = np.ones(len(order), bool)
    sorted_keys = np.stack([c[order] for c in cols], axis=1)
    first[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    return table.take(pa.array(order[first]))


def _last_per_step(table: pa.Table) -> pa.Table:
    """Sorted by step; when one batch holds a step twice, the row that arrived last wins."""
    steps = table.column("step").to_numpy(zero_copy_only=False)
    order = np.argsort(steps, kind="stable")
    s = steps[order]
    keep = np.ones(len(s), bool)
    keep[:-1] = s[:-1] != s[1:]  # last of each run of equal steps (stable sort keeps arrival order)
    return table.take(pa.array(order[keep]))


# ----------------------------------------------------------------------------------------------------------
# Checking a store: `moelab store check ROOT [--repair]`

_KEY_COLUMNS = {"metrics": ("trial_id", "attempt", "step"), "experts": ("trial_id", "attempt", "step", "layer"),
                "routing": ("trial_id", "attempt", "step", "layer"), "trials": ("trial_id",), "fits": ()}


@dataclass
class CheckReport:
    """What `check_store` found. Paths are full paths under the root; `why` is one line."""

    root: str  # as given, credentials redacted
    base: str = ""  # the root's path on its filesystem: the prefix of every path below
    files: int = 0  # Parquet files read
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    moved: dict[str, str] = field(default_factory=dict)  # path -> where --repair put it
    held: dict[str, str] = field(default_factory=dict)  # sweep -> why --repair left it alone (its writer runs)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.orphans

    def text(self) -> str:
        """Paths relative to the root, one line per finding."""
        rel = (lambda p: p[len(self.base) + 1:] if p.startswith(self.base + "/") else p)
        lines = [f"store {self.root}: {self.files} Parquet files read, {len(self.damaged)} damaged, "
                 f"{len(self.orphans)} orphaned"]
        for kind, items in (("damaged", self.damaged), ("orphan", self.orphans)):
            for path, why in items:
                dest = self.moved.get(path)
                lines.append(f"  {kind:8} {rel(path)}: {why}" + (f"\n           -> moved to {rel(dest)}" if dest else ""))
        for sweep, why in self.held.items():
            lines.append(f"  not repaired: sweep {sweep}: {why}")
        return "\n".join(lines)


def _damage(fs: pafs.FileSystem, path: str, table: str) -> str | None:
    """Why the file at `path` is not a usable file of `table`, or None when it is."""
    try:
        t = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return f"not readable as Parquet ({type(e).__name__}: {first})"
    missing = [c for c in _KEY_COLUMNS[table] if c not in t.column_names]
    if missing:
        return f"no column(s) {', '.join(missing)}: not a {table} file"
    if table == "trials" and t.num_rows != 1:
        return f"{t.num_rows} rows; a trial file holds exactly one"
    return None


def check_store(root: str | os.PathLike, *, repair: bool = False, grace_s: float = 3600.0,
                filesystem: pafs.FileSystem | None = None) -> CheckReport:
    """Read every file of every table under `root` and report:

    * damaged: a visible `.parquet` file that does not read whole, lacks its table's key columns, or is a
      trial file without exactly one row;
    * orphans: temp files (`.tmp-*`) of writes interrupted more than `grace_s` seconds ago, and metric /
      expert / routing batches of a trial that has no file in `trials` (nothing shows them) and none in
      the quarantine either (a trial row moved aside keeps its batches: a second repair must not hide them).

    `repair` moves each of them to ROOT/_quarantine/STAMP/<its path under the root>, where no reader looks;
    nothing is deleted, so a file can be moved back by hand. It holds each sweep's lease while it moves that
    sweep's files, and leaves alone a sweep whose writer holds it (`held`: sweep -> the owner, for a rerun).
    """
    fs, base = resolve_root(root, filesystem)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no results store at {redact_uri(root)!r}")
    report = CheckReport(redact_uri(root), base)
    now = time.time()
    has_row: dict[str, set[str]] = {}  # sweep -> trial ids with a trial file (damaged or not)
    batches: list[tuple[str, str, str]] = []  # (path, sweep, trial id) of readable batches
    for table in PATH_TABLES:
        for info in list_file_infos(fs, base, table, hidden=True):
            name, sweep = info.base_name, info.path.rsplit("/", 2)[-2].removeprefix("sweep=")
            if name.startswith(TMP_PREFIX):
                age = None if info.mtime is None else now - info.mtime.timestamp()
                if age is not None and age >= grace_s:
                    report.orphans.append((info.path, f"temp file of a write interrupted {age / 3600:.1f} h ago"))
                continue
            if not _visible(name):
                continue  # _SUCCESS, notes: foreign, and skipped by every reader
            report.files += 1
            why = _damage(fs, info.path, table)
            if table == "trials":
                has_row.setdefault(sweep, set()).add(name.split(".", 1)[0])
            if why:
                report.damaged.append((info.path, why))
            elif table in ("metrics", "experts", "routing"):
                batches.append((info.path, sweep, name.split(".", 1)[0]))
    # A trial whose row an earlier --repair moved aside keeps its readable batches where they are: they are
    # that trial's data (move the row back by hand and they show again), not leftovers to sweep away too.
    for stamp in _entries(fs, base, f"{base}/{QUARANTINE}"):
        if stamp.type == pafs.FileType.Directory:
            for info in list_file_infos(fs, stamp.path, "trials", hidden=True):
                sweep = info.path.rsplit("/", 2)[-2].removeprefix("sweep=")
                has_row.setdefault(sweep, set()).add(info.base_name.split(".", 1)[0])
    for path, sweep, tid in batches:
        if tid not in has_row.get(sweep, set()):
            report.orphans.append((path, f"trial {tid} has no row in trials/sweep={sweep}"))
    if repair:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:6]}"
        by_sweep: dict[str, list[str]] = {}
        for path, _ in report.damaged + report.orphans:
            by_sweep.setdefault(path.rsplit("/", 2)[-2].removeprefix("sweep="), []).append(path)
        store = Store(root, filesystem=filesystem)
        for sweep, paths in by_sweep.items():
            # Moving files under a running sweep would race its writes: repair holds the sweep's lease, and
            # leaves a sweep alone whose writer holds it.
            lease = store.lease(sweep, owner="moelab store check --repair", settle_s=0.2) \
                if NAME_RE.match(sweep) else None
            try:
                if lease is not None:
                    lease.acquire()
            except LeaseHeld as e:
                report.held[sweep] = str(e)
                continue
            try:
                for path in paths:
                    dest = f"{base}/{QUARANTINE}/{stamp}/{path[len(base) + 1:]}"
                    if isinstance(fs, pafs.LocalFileSystem):
                        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                    fs.move(path, dest)
                    report.moved[path] = dest
            finally:
                if lease is not None:
                    lease.release()
    return report


# ----------------------------------------------------------------------------------------------------------
# One writer per sweep: a lease


class LeaseHeld(RuntimeError):
    """Another live process holds the sweep's lease; the message names it."""


LEASES = "_leases"  # ROOT/_leases/SWEEP.json: who writes the sweep; no reader lists it


class Lease:
    """The right to write one sweep, held by one process: a small JSON record at ROOT/_leases/SWEEP.json with
    owner, host, pid and a heartbeat that a background thread renews every `heartbeat_s`. A lease whose
    heartbeat is older than `ttl_s` (its owner crashed) may be taken over, and so may one whose owner ran on
    this host and is no longer running. Use as a context manager, or call
    `release()`; `lost` turns true if another process took the lease over (this one stalled past ttl_s).

    Acquiring writes the record, waits `settle_s` and reads it back: of two processes acquiring at the same
    moment, the one whose record is not the last written sees the other's and backs off. `acquire()` does both;
    `claim()` and `confirm()` split them, so a caller can read the sweep and start its machinery during the
    wait (`run_sweep` starts Ray and Tune meanwhile) and write only once the lease is confirmed. On a local disk or
    an object store with read-after-write consistency (S3, GCS) this decides between writers that start more
    than a network round trip apart; it is a guard against a second `--resume`, not a consensus protocol."""

    def __init__(self, store: "Store", sweep: str, *, owner: str | None = None, ttl_s: float = 120.0,
                 heartbeat_s: float = 30.0, settle_s: float = 1.0):
        self.store, self.sweep = store, check_name("sweep", sweep)
        self.path = f"{store.root}/{LEASES}/{sweep}.json"
        import getpass
        import socket

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = owner or f"{user}@{self.host} pid {self.pid}"
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._confirm_lock = threading.Lock()
        self._claimed_at: float | None = None
        self._confirmed: bool | LeaseHeld | None = None  # None: not yet confirmed

    # -- the record ---------------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        """The stored record, or None (none, or unreadable: a record cut short cannot be trusted)."""
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                rec = json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("store: unreadable lease %s; treated as lapsed", self.path)
            return None
        return rec if isinstance(rec, dict) else None

    def _write(self) -> None:
        rec = {"owner": self.owner, "host": self.host, "pid": self.pid, "token": self.token,
               "ttl_s": self.ttl_s, "heartbeat_at": time.time()}
        data = json.dumps(rec).encode()
        fs = self.store.fs
        if self.store.local:
            fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, self.path)
        else:
            with fs.open_output_stream(self.path) as f:  # one small PUT: atomic
                f.write(data)

    @staticmethod
    def live(rec: dict[str, Any] | None, now: float | None = None) -> bool:
        if not rec:
            return False
        age = (time.time() if now is None else now) - float(rec.get("heartbeat_at", 0))
        return age < float(rec.get("ttl_s", 0))

    def _held_by(self, rec: dict[str, Any]) -> LeaseHeld:
        age = time.time() - float(rec.get("heartbeat_at", 0))
        return LeaseHeld(
            f"sweep {self.sweep!r} in {self.store.display_uri} is being written by {rec.get('owner', '?')} "
            f"(host {rec.get('host', '?')}, pid {rec.get('pid', '?')}; last heartbeat {age:.0f} s ago). Two writers "
            f"of one sweep lose rows: wait for it to end, or stop it; if it crashed, its lease lapses "
            f"{max(float(rec.get('ttl_s', 0)) - age, 0):.0f} s from now (or delete {self.path})")

    # -- holding it -----------------------------------------------------------------------------------------------
    def _dead_here(self, rec: dict[str, Any]) -> bool:
        """The owner ran on this host and its process is gone (killed -9, out of memory): its lease need not
        run out its ttl. A reused pid reads as alive, which only means waiting for the ttl."""
        if rec.get("host") != self.host:
            return False
        try:
            pid = int(rec.get("pid"))
        except (TypeError, ValueError):
            return False
        if pid <= 0 or pid == self.pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OSError):
            return False
        return False

    def acquire(self) -> "Lease":
        """claim() then confirm(): the lease is held when this returns (LeaseHeld if it is not)."""
        return self.claim().confirm()

    def claim(self) -> "Lease":
        """The first half of acquiring: raise LeaseHeld if another live process holds the lease, else write
        this one's record. Nothing may be written to the sweep before `confirm()` returns; reading it is safe
        in between (a process that could be writing holds a confirmed lease, which this call would have seen),
        so a caller can do its slow set-up while the record settles."""
        with self._confirm_lock:
            rec = self.read()
            if self.live(rec) and rec.get("token") != self.token and not self._dead_here(rec):
                raise self._held_by(rec)
            self._write()
            self._claimed_at, self._confirmed = time.monotonic(), None
        return self

    def confirm(self) -> "Lease":
        """The second half: wait until `settle_s` has passed since claim(), read the record back (LeaseHeld if
        another process's record replaced it) and start the heartbeat. Thread-safe; later calls return (or
        raise) what the first one did."""
        with self._confirm_lock:
            if self._claimed_at is None:
                raise RuntimeError("Lease.confirm() before claim()")
            if self._confirmed is None:
                time.sleep(max(0.0, self._claimed_at + self.settle_s - time.monotonic()))
                rec = self.read()
                if not rec or rec.get("token") != self.token:
                    self._confirmed = self._held_by(rec or {"owner": "another process"})
                else:
                    self._confirmed = True
                    self._stop.clear()
                    self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.sweep}")
                    self._thread.start()
            if isinstance(self._confirmed, LeaseHeld):
                raise self._confirmed
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                rec = self.read()
                if rec is not None and rec.get("token") != self.token:
                    self.lost = True
                    log.error("store: the lease of sweep %s was taken over by %s", self.sweep, rec.get("owner"))
                    return
                self._write()
            except OSError as e:  # a blip: the next beat tries again; ttl_s leaves room for a few
                log.warning("store: renewing the lease of sweep %s failed: %s", self.sweep, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the record, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        rec = self.read()
        if rec is not None and rec.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.store.fs.delete_file(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()
