"""The results store: Parquet tables `trials`, `metrics`, `experts`, `routing` (design.md "Tables") under one
root.

Layout (Hive-partitioned by sweep; the root is a local directory or any pyarrow.fs URI such as s3://b/p)::

    ROOT/trials/sweep=S/TRIAL_ID.parquet                       one row; rewritten whole on every change
    ROOT/metrics/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  one batch of logged steps FIRST..LAST
    ROOT/experts/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  expert load of the same steps
    ROOT/routing/sweep=S/TRIAL_ID.aATTEMPT.sFIRST-LAST.parquet  routed tokens per domain x expert, same steps

Guarantees:
  * A file is visible whole or not at all: on a local disk it is written to a hidden `.tmp-*` name in the
    same directory and renamed (atomic, replacing); on an object store the final key is PUT directly
    (a PUT or a completed multipart upload is atomic). Readers skip names starting with `.` or `_`.
  * Idempotent: a batch's name is its (trial, attempt, step range), so writing the same batch again replaces
    it; a trial's row is one file, so the latest write wins.
  * Restarts: a restarted trial must write with a higher `attempt`; readers (`moelab.results`) keep, for each
    (sweep, trial_id, step), the row of the highest attempt.

Metric rows are the training loop's dicts; `expert_load` (a list per MoE layer of per-expert load fractions)
is split off into `experts` (layer = index among the MoE layers), and `expert_domain` (only when the data
has domains: a list per MoE layer of [n_domains][n_experts] routed-slot counts over the log interval) into
`routing`, one row per (step, layer, domain, expert), zero counts included, so a restarted attempt's rows
replace every row of the step. Keys outside `METRIC_COLUMNS` are dropped:
Ray Tune adds bookkeeping keys (`training_iteration`, `time_this_iter_s`, ...) that are not metrics.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "Store", "StoreError", "TABLES", "STATUSES", "METRIC_COLUMNS", "METRICS_SCHEMA", "EXPERTS_SCHEMA",
    "ROUTING_SCHEMA",
    "TRIAL_TYPES", "resolve_root", "list_files", "partition_dir",
]

TABLES = ("trials", "metrics", "experts", "routing")
STATUSES = ("pending", "running", "finished", "failed", "diverged")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # sweep and trial ids: safe in paths, keys and URIs

# metrics: one row per trial x logged step. File schema (the `sweep` column comes from the partition).
METRIC_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "tokens": pa.int64(), "flops": pa.float64(), "wall_s": pa.float64(),
    "loss": pa.float64(), "eval_loss": pa.float64(), "lr": pa.float64(), "grad_norm": pa.float64(),
    "aux_loss": pa.float64(), "z_loss": pa.float64(), "tokens_per_s": pa.float64(), "mfu": pa.float64(),
    "drop_frac": pa.float64(), "imbalance": pa.float64(), "router_entropy": pa.float64(),
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


# ----------------------------------------------------------------------------------------------------------
# Paths


def resolve_root(root: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local directory or a pyarrow.fs URI (`s3://bucket/prefix?endpoint_override=..`)."""
    root = os.fspath(root)
    if filesystem is not None:
        return filesystem, root.rstrip("/")
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def partition_dir(root: str, table: str, sweep: str) -> str:
    return f"{root}/{table}/sweep={sweep}"


def _visible(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def list_files(fs: pafs.FileSystem, root: str, table: str, sweeps: Sequence[str] | None = None,
               trials: Iterable[str] | None = None) -> list[str]:
    """The finished Parquet files of `table` (temp files and other names skipped), optionally only those of
    some sweeps / trial ids (file names start with `TRIAL_ID.`). Sorted, so reads are deterministic."""
    dirs = [f"{root}/{table}"] if sweeps is None else [partition_dir(root, table, s) for s in sweeps]
    wanted = None if trials is None else set(trials)
    out = []
    for d in dirs:
        for info in fs.get_file_info(pafs.FileSelector(d, recursive=True, allow_not_found=True)):
            if info.type != pafs.FileType.File or not _visible(info.base_name):
                continue
            if wanted is not None and info.base_name.split(".", 1)[0] not in wanted:
                continue
            out.append(info.path)
    return sorted(out)


def _check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise StoreError(f"{kind}: got {value!r}; allowed: letters, digits, '_' and '-' (starting with a letter "
                         f"or digit)")
    return value


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
        if pa.types.is_integer(tp):
            values = [None if v is None else int(v) for v in values]
        else:
            values = [None if v is None else float(v) for v in values]
        cols[key] = pa.array(values, tp)
    return pa.table(cols, schema=METRICS_SCHEMA)


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
    __slots__ = ("rows", "tables", "experts", "routing", "since")

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tables: list[pa.Table] = []
        self.experts: list[tuple[int, Any]] = []  # (step, expert_load)
        self.routing: list[tuple[int, Any]] = []  # (step, expert_domain)
        self.since = time.monotonic()

    def __len__(self) -> int:
        return len(self.rows) + sum(t.num_rows for t in self.tables)


class Store:
    """Writes the tables under `root` (a directory or a pyarrow.fs URI). Thread-safe.

    Metric, expert and routing rows are buffered per (sweep, trial, attempt) and written as one Parquet file per
    batch once `batch_rows` metric rows are waiting or `flush_s` seconds have passed since the batch began
    (checked when rows arrive), and on `flush()` / `close()` / leaving a `with` block. Trial rows are
    written at once.
    """

    def __init__(self, root: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                 batch_rows: int = 1000, flush_s: float = 30.0, compression: str = "snappy"):
        self.fs, self.root = resolve_root(root, filesystem)
        self.uri = os.fspath(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.batch_rows, self.flush_s, self.compression = batch_rows, flush_s, compression
        self._buffers: dict[tuple[str, str, int], _Buffer] = {}
        self._lock = threading.RLock()
        self.files_written = 0

    # -- low level --------------------------------------------------------------------------------------------
    def _put(self, path: str, table: pa.Table) -> None:
        """Write `table` to `path` so that readers see the whole file or nothing."""
        directory, name = path.rsplit("/", 1)
        if self.local:
            self.fs.create_dir(directory, recursive=True)
            tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
            try:
                pq.write_table(table, tmp, filesystem=self.fs, compression=self.compression)
                self.fs.move(tmp, path)  # rename(2): atomic, replaces an existing file
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except OSError:
                    pass
                raise
        else:
            pq.write_table(table, path, filesystem=self.fs, compression=self.compression)
        self.files_written += 1

    def write_batch(self, table_name: str, sweep: str, name: str, table: pa.Table) -> str:
        """Write one whole file `ROOT/table_name/sweep=S/name` atomically (replacing any file of that name)."""
        if table_name not in TABLES:
            raise StoreError(f"table: got {table_name!r}; allowed: {', '.join(TABLES)}")
        _check_name("sweep", sweep)
        path = f"{partition_dir(self.root, table_name, sweep)}/{name}"
        self._put(path, table)
        return path

    # -- trials -------------------------------------------------------------------------------------------------
    def write_trial(self, row: Mapping[str, Any]) -> None:
        """Write a trial's whole row (keys: sweep, trial_id, and any columns; see TRIAL_TYPES), replacing the
        previous one. `updated_at` is set to now."""
        row = dict(row)
        sweep = _check_name("sweep", row.get("sweep"))
        trial_id = _check_name("trial_id", row.get("trial_id"))
        status = row.get("status")
        if status is not None and status not in STATUSES:
            raise StoreError(f"trials.status: got {status!r}; allowed: {', '.join(STATUSES)}")
        row["updated_at"] = datetime.now(timezone.utc)
        self.write_batch("trials", sweep, f"{trial_id}.parquet", _trial_table(row))

    def read_trial(self, sweep: str, trial_id: str) -> dict[str, Any] | None:
        """The stored row of one trial, or None."""
        directory = partition_dir(self.root, "trials", _check_name("sweep", sweep))
        path = f"{directory}/{_check_name('trial_id', trial_id)}.parquet"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        rows = pq.read_table(path, filesystem=self.fs).to_pylist()
        return {"sweep": sweep, **rows[0]} if rows else None

    def update_trial(self, sweep: str, trial_id: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` (status, final_loss, error, ...) into the stored row and rewrite it; returns the row."""
        with self._lock:
            row = self.read_trial(sweep, trial_id) or {"sweep": sweep, "trial_id": trial_id}
            row.update(fields)
            self.write_trial(row)
            return row

    # -- metrics and experts ------------------------------------------------------------------------------------
    def append_metrics(self, sweep: str, trial_id: str, attempt: int,
                       rows: Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> None:
        """Buffer logged steps of one trial attempt: a list of row dicts (the training loop's), or a mapping of
        equal-length columns (numpy arrays; `expert_load` then shaped steps x layers x experts, `expert_domain`
        steps x layers x domains x experts)."""
        key = (_check_name("sweep", sweep), _check_name("trial_id", trial_id), int(attempt))
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            if isinstance(rows, Mapping):
                table, load = _columnar_metrics(trial_id, key[2], rows)
                buf.tables.append(table)
                steps = table.column("step").to_pylist()
                if load is not None:
                    buf.experts.extend(zip(steps, load))
                if rows.get("expert_domain") is not None:
                    buf.routing.extend(zip(steps, rows["expert_domain"]))
            else:
                for r in rows:
                    if r.get("step") is None:
                        raise StoreError(f"metrics: a row without 'step': {dict(r)!r}")
                    load = r.get("expert_load")
                    if load is not None:
                        buf.experts.append((int(r["step"]), load))
                    if r.get("expert_domain") is not None:
                        buf.routing.append((int(r["step"]), r["expert_domain"]))
                    buf.rows.append(r)
            self._maybe_flush(key, buf)

    def append_experts(self, sweep: str, trial_id: str, attempt: int, step: int,
                       expert_load: Sequence[Sequence[float]]) -> None:
        """Buffer the expert load of one step: a list per MoE layer of per-expert fractions."""
        key = (_check_name("sweep", sweep), _check_name("trial_id", trial_id), int(attempt))
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            buf.experts.append((int(step), expert_load))
            self._maybe_flush(key, buf)

    def append_routing(self, sweep: str, trial_id: str, attempt: int, step: int,
                       expert_domain: Sequence[Any]) -> None:
        """Buffer the routed-token counts of one step: a list per MoE layer of [n_domains][n_experts] counts."""
        key = (_check_name("sweep", sweep), _check_name("trial_id", trial_id), int(attempt))
        with self._lock:
            buf = self._buffers.setdefault(key, _Buffer())
            buf.routing.append((int(step), expert_domain))
            self._maybe_flush(key, buf)

    def _maybe_flush(self, key: tuple[str, str, int], buf: _Buffer) -> None:
        if len(buf) >= self.batch_rows or max(len(buf.experts), len(buf.routing)) >= self.batch_rows \
                or time.monotonic() - buf.since >= self.flush_s:
            self._flush_key(key)

    def _flush_key(self, key: tuple[str, str, int]) -> int:
        buf = self._buffers.pop(key, None)
        if buf is None:
            return 0
        sweep, trial_id, attempt = key
        written = 0
        parts = list(buf.tables)
        if buf.rows:
            parts.append(_metrics_table(trial_id, attempt, buf.rows))
        if parts:
            table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            table = _last_per_step(table)
            first, last = table.column("step")[0].as_py(), table.column("step")[-1].as_py()
            self.write_batch("metrics", sweep, _batch_name(trial_id, attempt, first, last), table)
            written += 1
        if buf.experts:
            items = sorted({step: load for step, load in buf.experts}.items())
            table = _experts_table(trial_id, attempt, items)
            self.write_batch("experts", sweep, _batch_name(trial_id, attempt, items[0][0], items[-1][0]), table)
            written += 1
        if buf.routing:
            items = sorted({step: counts for step, counts in buf.routing}.items())  # a step twice: the last wins
            table = _routing_table(trial_id, attempt, items)
            self.write_batch("routing", sweep, _batch_name(trial_id, attempt, items[0][0], items[-1][0]), table)
            written += 1
        return written

    def flush(self, sweep: str | None = None, trial_id: str | None = None) -> int:
        """Write out buffered rows (all, or one sweep's / one trial's); returns the number of files written."""
        with self._lock:
            keys = [k for k in self._buffers
                    if (sweep is None or k[0] == sweep) and (trial_id is None or k[1] == trial_id)]
            return sum(self._flush_key(k) for k in keys)

    def compact(self, sweep: str, trial_id: str | None = None) -> int:
        """Merge each trial's metric (expert, routing) batches into one deduplicated file; returns how many files
        were removed. For finished trials: reading is mostly a cost per file, and a trial flushed every
        `flush_s` for hours leaves hundreds. The merged file is written (atomically) before the old ones are
        deleted, so a reader never misses rows (it may see both for a moment; its dedupe hides that)."""
        _check_name("sweep", sweep)
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
                merged = _keep_latest(pa.concat_tables([pq.read_table(p, filesystem=self.fs) for p in paths]), keys)
                steps = merged.column("step")
                name = _batch_name(tid, int(pc.max(merged.column("attempt")).as_py()), steps[0].as_py(),
                                   steps[-1].as_py())
                target = self.write_batch(table, sweep, name, merged)
                for path in paths:
                    if path != target:
                        self.fs.delete_file(path)
                        removed += 1
        return removed

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
        return f"Store({self.uri!r})"


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
