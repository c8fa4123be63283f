"""The dashboard's data layer: read the results store (cached), then filter, group, aggregate and downsample.

Two halves:

* `Reader` reads the store under one root and keeps what it read: trial rows per file and metric columns per
  trial, each keyed by the files' (name, mtime, size), so a refresh re-reads only files that changed. It
  never writes. Unreadable files (a truncated upload, a foreign file) are skipped and reported in
  `Reader.warnings`; a missing or empty root raises `StoreUnavailable` with a message for the page.
* Pure functions over DataFrames / Arrow tables (no I/O): the runs table, seed aggregation (mean, stderr, N),
  M4 downsampling, smoothing, per-axis effects, the dense compute law and leverage, expert-load summaries,
  domain-vs-expert routing and specialisation, the parallel-coordinates frame. The heavy ones run as DuckDB
  SQL over in-memory Arrow tables.

Downsampling (server side, spikes kept): M4 aggregation (Jugel et al. 2014, "M4: A Visualization-Oriented
Time Series Data Aggregation"): per run and x-bucket keep the first, last, min and max point. A line drawn
through those points covers the same pixels as the full line at that bucket width, so a loss spike one
step wide survives any reduction. Seed aggregation bins x the same way per group: each run contributes its
mean in the bucket, then mean, sample std, stderr = std / sqrt(N) and N across runs. With runs logged at
the same x and no more points than buckets, each bucket holds one point per run and the aggregate is exact.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from scipy import signal, stats

import moelab.results as mr
from moelab.platform.store import METRIC_COLUMNS, STATUSES

__all__ = [
    "StoreUnavailable", "Reader", "X_AXES", "METRICS", "FINAL_METRICS", "SEED_KEYS", "ALL_BUT_SEED",
    "axis_keys", "axis_frame", "filter_trials", "sweeps_overview", "recent_failures", "runs_table",
    "group_keys", "assign_groups", "ema", "m4_downsample", "aggregate_seeds", "CurveData", "curve_data",
    "axis_effects", "DenseLaw", "dense_law", "fits_law", "with_leverage", "scaling_points",
    "expert_load_at", "expert_load_over_time", "expert_imbalance", "domain_share_at", "specialisation",
    "parallel_frame",
]

X_AXES = ("step", "tokens", "flops", "wall_s")
METRICS = tuple(k for k in METRIC_COLUMNS if k not in X_AXES)
FINAL_METRICS = ("final_loss", "final_eval_loss", "leverage")
# Columns that identify a replicate rather than a configuration: grouping "all but seed" ignores them.
SEED_KEYS = ("seed", "train.seed", "upcycle.seed", "data.seed")
ALL_BUT_SEED = "(all but seed)"
# Trial columns that are results or bookkeeping, never grouping keys or "params".
_RESULT_COLS = {
    "sweep", "trial_id", "status", "attempt", "error", "updated_at", "config", "overrides", "axis_values",
    "depends_on", "params_total", "params_active", "params_non_embedding", "flops_per_token", "steps", "tokens",
    "flops", "final_step", "final_tokens", "final_flops", "final_loss", "final_eval_loss", "wall_s", "leverage",
    "leverage_extrapolated", "train.out_dir",
}
_ROUTING_COLS = ("step", "layer", "domain", "expert", "tokens")  # what Reader.routing returns, in this order


class StoreUnavailable(Exception):
    """The store cannot be shown (missing, empty); the message is meant for the page."""


# ----------------------------------------------------------------------------------------------------------
# Reading (cached)


def _visible(name: str) -> bool:
    # Same rule as the writer (moelab.platform.store): hidden `.tmp-*` files are being written.
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def _sweep_of(path: str) -> str | None:
    parent = path.rsplit("/", 2)[-2] if path.count("/") >= 1 else ""
    return parent.removeprefix("sweep=") if parent.startswith("sweep=") else None


def _sql(query: str, **tables: Any) -> pd.DataFrame:
    """Run `query` on a fresh in-memory DuckDB connection with `tables` registered under their names."""
    con = duckdb.connect()
    try:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(query).df()
    finally:
        con.close()


@dataclass
class _TrialMetrics:
    sig: tuple
    step: np.ndarray
    cols: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return self.step.nbytes + sum(a.nbytes for a in self.cols.values())


class Reader:
    """Cached, read-only access to the store under `root` (a directory or a pyarrow.fs URI).

    Thread-safe (one lock: the Dash server answers requests from several threads). `cache_bytes` bounds the
    metric arrays kept (least recently used trials are dropped first).
    """

    def __init__(self, root: str | os.PathLike, *, cache_bytes: int = 1 << 30, threads: int = 8):
        self.uri = os.fspath(root)
        self.cache_bytes, self.threads = cache_bytes, threads
        self._lock = threading.RLock()
        self._results: mr.Results | None = None
        self._trial_files: dict[str, tuple[tuple, pa.Table | None]] = {}
        self._trials_key: tuple | None = None
        self._trials_df: pd.DataFrame | None = None
        self._metrics: OrderedDict[tuple[str, str], _TrialMetrics] = OrderedDict()
        self._metrics_bytes = 0
        self._fits: dict[str, tuple[tuple, pd.DataFrame | None]] = {}
        self.warnings: dict[str, str] = {}  # path -> why it was skipped

    # -- the root -------------------------------------------------------------------------------------------
    def results(self) -> mr.Results:
        with self._lock:
            if self._results is None:
                try:
                    self._results = mr.open(self.uri)
                except FileNotFoundError:
                    raise StoreUnavailable(
                        f"No results store at {self.uri!r} yet: nothing has been written there. It appears when a "
                        f"sweep writes to it (`moelab sweep FILE --storage {self.uri}`); this page refreshes "
                        f"by itself.") from None
                except OSError as e:
                    raise StoreUnavailable(f"Cannot read the results store at {self.uri!r}: {e}") from None
            return self._results

    def _list(self, table: str, sweep: str | None = None) -> list[pafs.FileInfo]:
        r = self.results()
        base = f"{r.root}/{table}" + ("" if sweep is None else f"/sweep={sweep}")
        try:
            infos = r.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:
            raise StoreUnavailable(f"Cannot list {base!r}: {e}") from None
        return sorted((i for i in infos if i.type == pafs.FileType.File and _visible(i.base_name)),
                      key=lambda i: i.path)

    @staticmethod
    def _sig(info: pafs.FileInfo) -> tuple:
        return (info.path, info.mtime_ns, info.size)

    def _warn(self, path: str, err: BaseException) -> None:
        self.warnings[path] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    # -- trials -------------------------------------------------------------------------------------------------
    def trials(self) -> pd.DataFrame:
        """Every trial row of every sweep (one per (sweep, trial_id), the latest `updated_at`), with a
        `sweep` column. Raises StoreUnavailable when the root is missing."""
        with self._lock:
            infos = self._list("trials")
            sigs = {i.path: self._sig(i) for i in infos}
            stale = [p for p, s in sigs.items() if self._trial_files.get(p, (None,))[0] != s]
            for p in list(self._trial_files):
                if p not in sigs:
                    del self._trial_files[p]
                    self.warnings.pop(p, None)
            if stale:
                fs = self.results().fs

                def read(path: str) -> tuple[str, pa.Table | BaseException]:
                    try:
                        with fs.open_input_file(path) as f:
                            return path, pq.ParquetFile(f).read()
                    except Exception as e:  # noqa: BLE001 - a bad file is reported, not fatal
                        return path, e

                with ThreadPoolExecutor(self.threads) as pool:
                    for path, got in pool.map(read, stale):
                        if isinstance(got, BaseException):
                            self._warn(path, got)
                            self._trial_files[path] = (sigs[path], None)
                        else:
                            self.warnings.pop(path, None)
                            self._trial_files[path] = (sigs[path], got)
            key = tuple(sorted(sigs.values()))
            if key != self._trials_key or self._trials_df is None:
                self._trials_df = _assemble_trials(
                    [(_sweep_of(p), t) for p, (_, t) in sorted(self._trial_files.items()) if t is not None])
                self._trials_key = key
            return self._trials_df

    def sweeps(self) -> list[str]:
        """Sweeps with any table partition (trials, metrics or experts)."""
        return self.results().sweeps()

    # -- metrics ------------------------------------------------------------------------------------------------
    def metrics(self, sweep: str, trial_ids: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
        """Columns `trial_id`, `step` and `columns` (metric names) for the given trials, deduplicated (highest
        attempt per step) and sorted by (trial order given, step). Trials without rows are absent."""
        bad = [c for c in columns if c not in METRIC_COLUMNS]
        if bad:
            raise KeyError(f"unknown metric column(s) {bad}; allowed: {list(METRIC_COLUMNS)}")
        cols = [c for c in dict.fromkeys(columns) if c != "step"]
        with self._lock:
            by_trial: dict[str, list[pafs.FileInfo]] = {}
            for info in self._list("metrics", sweep):
                by_trial.setdefault(info.base_name.split(".", 1)[0], []).append(info)
            wanted = [t for t in dict.fromkeys(trial_ids) if t in by_trial]
            need: dict[tuple[str, ...], list[str]] = {}
            for t in wanted:
                sig = tuple(self._sig(i) for i in by_trial[t])
                entry = self._metrics.get((sweep, t))
                if entry is None or entry.sig != sig:
                    missing = tuple(cols)
                else:
                    missing = tuple(c for c in cols if c not in entry.cols)
                if missing:
                    need.setdefault(missing, []).append(t)
            for missing, ts in need.items():
                self._read_metrics(sweep, ts, list(missing), by_trial)
            parts_t, parts_s, parts_c = [], [], {c: [] for c in cols}
            for t in wanted:
                entry = self._metrics.get((sweep, t))
                if entry is None:
                    continue
                self._metrics.move_to_end((sweep, t))
                parts_t.append(np.full(len(entry.step), len(parts_t), np.int32))
                parts_s.append(entry.step)
                for c in cols:
                    parts_c[c].append(entry.cols[c])
            names = [t for t in wanted if (sweep, t) in self._metrics]
            self._evict()
        if not parts_t:
            return pd.DataFrame({"trial_id": pd.Series([], dtype=object), "step": np.zeros(0, np.int64),
                                 **{c: np.zeros(0) for c in cols}})
        codes = np.concatenate(parts_t)
        out = {"trial_id": pd.Categorical.from_codes(codes, categories=names), "step": np.concatenate(parts_s)}
        out.update({c: np.concatenate(parts_c[c]) for c in cols})
        return pd.DataFrame(out)

    def _read_metrics(self, sweep: str, trial_ids: list[str], cols: list[str],
                      by_trial: dict[str, list[pafs.FileInfo]]) -> None:
        """Read `cols` for `trial_ids` (one dataset scan) into the cache."""
        r = self.results()
        entries = {t: self._metrics.get((sweep, t)) for t in trial_ids}
        sigs = {t: tuple(self._sig(i) for i in by_trial[t]) for t in trial_ids}
        fresh = {t for t in trial_ids if entries[t] is None or entries[t].sig != sigs[t]}
        # A trial whose files changed is read whole (every column it had), the others only the missing ones.
        read_cols = list(dict.fromkeys(cols + [c for t in fresh if entries[t] is not None for c in entries[t].cols]))
        files = [i.path for t in trial_ids for i in by_trial[t]]
        table = self._scan(r, files, read_cols)
        if table is None:
            return
        tid = table.column("trial_id").combine_chunks().dictionary_encode()
        codes = tid.indices.to_numpy(zero_copy_only=False)
        names = tid.dictionary.to_pylist()
        order = np.argsort(codes, kind="stable")  # each trial's rows together, file order kept within
        codes = codes[order]
        steps = table.column("step").to_numpy()[order]
        attempts = table.column("attempt").to_numpy()[order]
        arrays = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[order] for c in read_cols}
        bounds = np.flatnonzero(np.diff(codes)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(codes)]])
        for s, e in zip(starts, ends):
            if e <= s:
                continue
            t = names[codes[s]]
            if t not in sigs:  # rows whose trial_id does not match their file name: not this trial's
                continue
            keep = slice(s, e)
            if not np.all(np.diff(steps[s:e]) > 0):
                # A restart rewrote steps: per step keep the row of the highest attempt (design.md "Tables").
                idx = np.lexsort((-attempts[s:e], steps[s:e]))
                first = np.r_[True, np.diff(steps[s:e][idx]) != 0]
                keep = s + idx[first]
            old = self._metrics.pop((sweep, t), None)
            if old is not None:
                self._metrics_bytes -= old.nbytes()
            if t in fresh or old is None:
                entry = _TrialMetrics(sigs[t], steps[keep].copy())
            else:
                entry = old
            for c in read_cols:
                entry.cols[c] = arrays[c][keep].copy()
            self._metrics[(sweep, t)] = entry
            self._metrics_bytes += entry.nbytes()

    def _scan(self, r: mr.Results, files: list[str], cols: list[str]) -> pa.Table | None:
        want = ["trial_id", "attempt", "step", *cols]
        schema = pa.schema([(n, pa.string() if n == "trial_id" else METRIC_COLUMNS.get(n, pa.int64()))
                            for n in want])
        try:
            return ds.dataset(files, schema=schema, format="parquet", filesystem=r.fs).to_table(columns=want)
        except (OSError, pa.ArrowException):  # some file is unreadable: read one by one, skip the bad ones
            parts = []
            for path in files:
                try:
                    parts.append(ds.dataset([path], schema=schema, format="parquet", filesystem=r.fs)
                                 .to_table(columns=want))
                    self.warnings.pop(path, None)
                except (OSError, pa.ArrowException) as e:
                    self._warn(path, e)
            return pa.concat_tables(parts) if parts else None

    def _evict(self) -> None:
        while self._metrics_bytes > self.cache_bytes and len(self._metrics) > 1:
            _, old = self._metrics.popitem(last=False)
            self._metrics_bytes -= old.nbytes()

    def version(self, sweep: str | None = None) -> str:
        """A fingerprint of the files behind a sweep (or the whole store): changes when anything is written."""
        import hashlib

        h = hashlib.sha1()
        for table in ("trials", "metrics", "experts", "routing", "fits"):
            for info in self._list(table, sweep):
                h.update(f"{info.path}|{info.mtime_ns}|{info.size}\n".encode())
        return h.hexdigest()

    # -- experts and fits ---------------------------------------------------------------------------------------
    def experts(self, sweep: str, trial_id: str, steps: Iterable[int] | None = None) -> pd.DataFrame:
        """step, layer, expert, load of one trial (latest attempt)."""
        r = self.results()
        try:
            df = r.experts(sweep=sweep, trials=[trial_id], steps=steps)
        except (OSError, pa.ArrowException) as e:
            self._warn(f"experts/sweep={sweep}/{trial_id}", e)
            return pd.DataFrame(columns=["step", "layer", "expert", "load"])
        return df[["step", "layer", "expert", "load"]]

    def routing(self, sweep: str, trial_id: str, steps: Iterable[int] | None = None) -> pd.DataFrame:
        """step, layer, domain, expert, tokens of one trial (latest attempt); empty when not recorded (real
        data, a dense run)."""
        try:
            df = self.results().routing(sweep=sweep, trials=[trial_id], steps=steps)
        except (OSError, pa.ArrowException) as e:
            self._warn(f"routing/sweep={sweep}/{trial_id}", e)
            return pd.DataFrame(columns=list(_ROUTING_COLS))
        return df[list(_ROUTING_COLS)]

    def fits(self, sweep: str) -> pd.DataFrame | None:
        """The `fits` table of a sweep when the store has one (design.md "Tables"), else None."""
        with self._lock:
            infos = self._list("fits", sweep)
            if not infos:
                return None
            key = tuple(self._sig(i) for i in infos)
            cached = self._fits.get(sweep)
            if cached is not None and cached[0] == key:
                return cached[1]
            try:
                df = ds.dataset([i.path for i in infos], format="parquet", filesystem=self.results().fs).to_table()
                df = df.to_pandas()
            except (OSError, pa.ArrowException) as e:
                self._warn(f"fits/sweep={sweep}", e)
                df = None
            self._fits[sweep] = (key, df)
            return df


def _assemble_trials(parts: list[tuple[str | None, pa.Table]]) -> pd.DataFrame:
    """One DataFrame from per-file trial tables whose columns (and column types) may differ."""
    tables = []
    for sweep, t in parts:
        if t.num_rows == 0:
            continue
        if "sweep" in t.column_names:
            t = t.drop_columns(["sweep"])
        tables.append(t.append_column("sweep", pa.array([sweep] * t.num_rows, pa.string())))
    if not tables:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in ("sweep", "trial_id", "status")})
    try:
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # Mixed types in one column (an axis that is 8 in one trial and "auto" in another): object columns.
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    if "trial_id" not in df:
        df["trial_id"] = None
    df = df[df["trial_id"].notna()]
    if "updated_at" in df and len(df):
        df = df.sort_values("updated_at", na_position="first").drop_duplicates(["sweep", "trial_id"], keep="last")
    front = [c for c in ("sweep", "trial_id", "status") if c in df]
    df = df[front + [c for c in df.columns if c not in front]]
    if "status" not in df:
        df["status"] = None
    return df.sort_values(["sweep", "trial_id"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Trials: axes, filters, overview, runs table


def _json_dict(text: Any) -> dict:
    """A JSON object's dict (axis_values, parameters); {} for anything else. Do not mutate the result."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str) or not text:
        return {}
    return _parse_json_object(text)


@functools.lru_cache(maxsize=4096)
def _parse_json_object(text: str) -> dict:
    try:
        out = json.loads(text)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def axis_keys(trials: pd.DataFrame) -> list[str]:
    """The sweep axes (dotted config keys), from the trials' `axis_values` JSON, in first-seen order."""
    if "axis_values" not in trials:
        return []
    keys: dict[str, None] = {}
    for text in trials["axis_values"].dropna().unique():
        keys.update(dict.fromkeys(_json_dict(text)))
    return list(keys)


def axis_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """One column per axis key with the trial's axis value (NaN for trials off the grid, e.g. dense
    baselines), indexed like `trials`."""
    keys = axis_keys(trials)
    if not keys:
        return pd.DataFrame(index=trials.index)
    parsed = trials["axis_values"].map(_json_dict)
    return pd.DataFrame({k: parsed.map(lambda d, k=k: d.get(k, np.nan)) for k in keys}, index=trials.index)


def filter_trials(trials: pd.DataFrame, sweep: str | None = None, statuses: Iterable[str] | None = None,
                  families: Iterable[str] | None = None) -> pd.DataFrame:
    """Rows of one sweep (None: all), with a status in `statuses` and a family in `families` (None: any)."""
    out = trials
    if sweep is not None:
        out = out[out["sweep"] == sweep]
    if statuses is not None:
        out = out[out["status"].isin(list(statuses))]
    if families is not None and "family" in out:
        out = out[out["family"].isin(list(families))]
    return out


def sweeps_overview(trials: pd.DataFrame, sweeps: Iterable[str] = ()) -> pd.DataFrame:
    """One row per sweep: trial count, count per status (pending, running, finished, failed, diverged,
    other), last update. `sweeps` adds sweeps that have metric files but no trial rows yet."""
    cols = ["sweep", "trials", *STATUSES, "other", "last_update"]
    rows = []
    names = list(dict.fromkeys([*sorted(trials["sweep"].dropna().unique()), *sweeps]))
    for s in names:
        t = trials[trials["sweep"] == s]
        status = t["status"].fillna("other")
        counts = status.value_counts()
        row = {"sweep": s, "trials": len(t), **{k: int(counts.get(k, 0)) for k in STATUSES}}
        row["other"] = int(len(t) - sum(row[k] for k in STATUSES))
        last = t["updated_at"].max() if "updated_at" in t and len(t) else None
        row["last_update"] = None if last is None or pd.isna(last) else pd.Timestamp(last).strftime(
            "%Y-%m-%d %H:%M:%S UTC")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def recent_failures(trials: pd.DataFrame, limit: int = 20) -> pd.DataFrame:
    """Failed and diverged trials, newest first: sweep, trial_id, status, updated_at, error."""
    bad = trials[trials["status"].isin(["failed", "diverged"])]
    if "updated_at" in bad:
        bad = bad.sort_values("updated_at", ascending=False)
    cols = [c for c in ("sweep", "trial_id", "status", "updated_at", "error") if c in bad]
    return bad[cols].head(limit).reset_index(drop=True)


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if v is None or v is pd.NA or v is pd.NaT:
        return "nan"
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def _varies(col: pd.Series) -> bool:
    """More than one distinct value (missing counts as one value; mixed types and lists are fine)."""
    try:
        return col.nunique(dropna=False) > 1
    except TypeError:  # unhashable values (lists, dicts)
        return col.map(_hashable).nunique(dropna=False) > 1


def runs_table(trials: pd.DataFrame, only_differing: bool = False) -> pd.DataFrame:
    """One row per trial: ids, status, error, axis values, final metrics and sizes, then the flattened
    config. only_differing: keep only config columns whose value differs between the rows (missing counts
    as a value). JSON blobs (config, overrides, axis_values) are left out; the axes have their own columns."""
    axes = axis_frame(trials)
    front = [c for c in ("trial_id", "status", "family", "name", "seed", "error") if c in trials]
    results = [c for c in ("final_loss", "final_eval_loss", "leverage", "final_step", "final_tokens",
                           "final_flops", "wall_s", "params_active", "params_total", "attempt", "updated_at")
               if c in trials]
    skip = set(front) | set(results) | {"sweep", "config", "overrides", "axis_values"}
    rest = [c for c in trials.columns if c not in skip]  # the config (an axis's config column is kept too)
    if only_differing:
        rest = [c for c in rest if _varies(trials[c])]
        axes = axes[[c for c in axes.columns if _varies(axes[c])]]
    out = pd.concat([trials[front], axes.add_prefix("axis:"), trials[results], trials[rest]], axis=1)
    if "updated_at" in out:
        out["updated_at"] = out["updated_at"].map(lambda v: None if pd.isna(v) else pd.Timestamp(v).isoformat())
    return out.reset_index(drop=True)


def group_keys(trials: pd.DataFrame) -> list[str]:
    """Columns worth grouping runs by: the axes first, then family / preset / name, then any other config
    column that varies, then the seed keys (grouping by seed shows the seeds apart)."""
    axes = axis_keys(trials)
    out = list(axes)
    for c in ("family", "preset", "name"):
        if c in trials and c not in out and _varies(trials[c]):
            out.append(c)
    for c in trials.columns:
        if c in out or c in _RESULT_COLS or c in SEED_KEYS:
            continue
        if c in ("family", "preset", "name", "upcycle_from") or _varies(trials[c]):
            if trials[c].map(lambda v: isinstance(v, (list, dict))).any():
                continue
            out.append(c)
    return out + [c for c in SEED_KEYS if c in trials]


def _short(key: str, keys: Sequence[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def assign_groups(trials: pd.DataFrame, keys: Sequence[str] | str | None) -> pd.Series:
    """Group label per trial (indexed like `trials`). keys: None or [] -> every trial its own group (its id);
    ALL_BUT_SEED -> trials that differ only in seed share a group; else the values of those columns
    ("n_experts=8, noise_std=0.001"); a key that is not a column is ignored."""
    if keys is None or (not isinstance(keys, str) and len(keys) == 0):
        return trials["trial_id"].astype(str)
    if keys == ALL_BUT_SEED or (not isinstance(keys, str) and list(keys) == [ALL_BUT_SEED]):
        cand = [c for c in trials.columns if c not in _RESULT_COLS and c not in SEED_KEYS
                and c not in ("trial_id", "upcycle_from")]
        varying = [c for c in cand if _varies(trials[c])]
        keys = [k for k in axis_keys(trials) if k in varying] + \
               [c for c in varying if c not in axis_keys(trials)]
        if not keys:
            return pd.Series("all runs", index=trials.index)
        # Label with the few columns that tell the groups apart: name/preset for baselines, axes for the grid.
        axes = axis_keys(trials)
        names = trials["name"].tolist() if "name" in trials else [None] * len(trials)
        fams = trials["family"].tolist() if "family" in trials else [None] * len(trials)
        texts = trials["axis_values"].tolist() if "axis_values" in trials else [None] * len(trials)
        labels = []
        for text, name, fam in zip(texts, names, fams):
            vals = _json_dict(text)
            if vals:
                labels.append(", ".join(f"{_short(k, axes)}={_fmt(v)}" for k, v in vals.items()))
            elif isinstance(name, str):
                labels.append(name)
            else:
                labels.append(str(fam) if isinstance(fam, str) else "run")
        base = pd.Series(labels, index=trials.index)
        # Two configs with the same label (they differ in a non-axis column): tell them apart.
        full = trials[keys].map(_hashable).astype(str).agg("|".join, axis=1)
        dup = full.groupby(base).transform("nunique") > 1
        if dup.any():
            codes = full[dup].map({v: i for i, v in enumerate(dict.fromkeys(full[dup]))})
            base[dup] = base[dup] + " #" + codes.astype(str)
        return base
    keys = [k for k in ([keys] if isinstance(keys, str) else keys) if k in trials.columns]
    if not keys:
        return pd.Series("all runs", index=trials.index)
    return trials[keys].apply(
        lambda row: ", ".join(f"{_short(k, keys)}={_fmt(row[k])}" for k in keys), axis=1).astype(str)


# ----------------------------------------------------------------------------------------------------------
# Curves: smoothing, downsampling, seed aggregation


def ema(y: np.ndarray, segment_starts: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average within segments (runs), debiased like TensorBoard's smoothing slider:
    s_t = w s_{t-1} + (1 - w) y_t,  reported s_t / (1 - w^(t+1)) (t counted from each segment's start).
    weight 0 returns y unchanged. segment_starts: sorted start indices, first 0."""
    y = np.asarray(y, dtype=np.float64)
    if weight <= 0 or len(y) == 0:
        return y.copy()
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight: got {weight}; allowed: 0 <= w < 1")
    out = np.empty_like(y)
    ends = np.append(segment_starts[1:], len(y))
    for s, e in zip(segment_starts, ends):
        seg = y[s:e]
        raw = signal.lfilter([1 - weight], [1, -weight], seg)
        out[s:e] = raw / (1 - weight ** np.arange(1, e - s + 1))
    return out


def _columns(frame: pd.DataFrame | pa.Table, names: Sequence[str]) -> list[np.ndarray]:
    if isinstance(frame, pa.Table):
        return [frame.column(n).to_numpy() for n in names]
    return [frame[n].to_numpy() for n in names]


def bucket_index(keys: np.ndarray, x: np.ndarray, n_buckets: int, log_x: bool = False) -> np.ndarray:
    """Per row, which of `n_buckets` equal-width x-buckets (in ln x with log_x) it falls in, the buckets
    spanning each key's own x range (keys: run or group ids, any hashable dtype)."""
    fx = np.log(x) if log_x else np.asarray(x, np.float64)
    if not len(fx):
        return np.zeros(0, np.int64)
    codes, uniques = pd.factorize(keys, sort=False)
    lo = np.full(len(uniques), np.inf)
    hi = np.full(len(uniques), -np.inf)
    np.minimum.at(lo, codes, fx)
    np.maximum.at(hi, codes, fx)
    base, span = lo[codes], (hi - lo)[codes]
    rel = np.divide(fx - base, span, out=np.zeros_like(fx), where=span > 0)
    return np.minimum((rel * n_buckets).astype(np.int64), n_buckets - 1)


def _finite(keys: np.ndarray, x: np.ndarray, y: np.ndarray, log_x: bool, *more: np.ndarray):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if log_x:
        ok &= x > 0
    return (keys[ok], x[ok], y[ok], *[m[ok] for m in more])


def m4_downsample(frame: pd.DataFrame | pa.Table, n_buckets: int, log_x: bool = False,
                  by: str = "run") -> pd.DataFrame:
    """M4 downsampling per `by`: per x-bucket keep the first, last, min-y and max-y point (<= 4 n_buckets
    points per run; runs with fewer points come back whole). Input columns `by`, `x`, `y`; non-finite rows
    (and x <= 0 with log_x) are dropped. Output columns by, x, y, sorted by (by, x)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets: got {n_buckets}; allowed: >= 1")
    run, x, y = _finite(*_columns(frame, [by, "x", "y"]), log_x)
    table = pa.table({"run": run, "bucket": bucket_index(run, x, n_buckets, log_x), "x": x, "y": y})
    q = f"""
    WITH agg AS (SELECT run, bucket,
                   min(x) AS x_first, arg_min(y, x) AS y_first, max(x) AS x_last, arg_max(y, x) AS y_last,
                   arg_min(x, y) AS x_min, min(y) AS y_min, arg_max(x, y) AS x_max, max(y) AS y_max
                 FROM t GROUP BY run, bucket),
      pts AS (SELECT run, x_first AS x, y_first AS y FROM agg UNION ALL SELECT run, x_last, y_last FROM agg
              UNION ALL SELECT run, x_min, y_min FROM agg UNION ALL SELECT run, x_max, y_max FROM agg)
    SELECT DISTINCT run AS "{by}", x, y FROM pts ORDER BY "{by}", x
    """
    return _sql(q, t=table)


def aggregate_seeds(frame: pd.DataFrame | pa.Table, n_buckets: int, log_x: bool = False) -> pd.DataFrame:
    """Mean across runs per group and x-bucket (buckets span each group's x range). Input columns: group, run,
    x, y. Each run contributes its mean y (and x) in the bucket; output columns group, bucket, x (mean over
    runs), mean, std (sample; NaN for one run), stderr = std / sqrt(n), n (runs with a point in the bucket),
    sorted by (group, x)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets: got {n_buckets}; allowed: >= 1")
    group, x, y, run = _columns(frame, ["group", "x", "y", "run"])
    group, x, y, run = _finite(group, x, y, log_x, run)
    table = pa.table({"group": group, "run": run, "bucket": bucket_index(group, x, n_buckets, log_x),
                      "x": x, "y": y})
    q = """
    WITH per_run AS (SELECT "group", run, bucket, avg(x) AS x, avg(y) AS y FROM t GROUP BY ALL),
      agg AS (SELECT "group", bucket, avg(x) AS x, avg(y) AS mean, stddev_samp(y) AS std, count(*) AS n
              FROM per_run GROUP BY ALL)
    SELECT "group", bucket, x, mean, std, std / sqrt(n) AS stderr, n FROM agg ORDER BY "group", x
    """
    out = _sql(q, t=table)
    out["n"] = out["n"].astype(int)
    return out


@dataclass
class CurveData:
    """What the curves figure draws. runs: group, run, x, y (raw, downsampled); smooth: the same for the
    smoothed runs (empty without smoothing); agg: aggregate_seeds output (empty when not grouped);
    group_n: runs per group; note: a message for the page (truncation, nothing logged, ...)."""

    metric: str
    x: str
    runs: pd.DataFrame
    smooth: pd.DataFrame
    agg: pd.DataFrame
    group_n: dict[str, int]
    grouped: bool
    ended: pd.DataFrame = field(default_factory=pd.DataFrame)  # diverged/failed runs: last finite point
    note: str = ""


def curve_data(reader: Reader, sweep: str, trials: pd.DataFrame, metric: str, x: str = "step",
               group: Sequence[str] | str | None = ALL_BUT_SEED, smoothing: float = 0.0,
               log_x: bool = False, point_budget: int = 60_000, agg_buckets: int = 400,
               max_single: int = 100, aggregate: bool = True) -> CurveData:
    """Curves of `metric` against `x` for the trials given (rows of one sweep). Grouped: mean +/- stderr per
    group (over smoothed runs when smoothing > 0) plus every run, raw and downsampled so that all runs
    together stay near `point_budget` points. Ungrouped: the first `max_single` runs, each its own line.
    aggregate=False skips the group means (only the labelled, downsampled runs are wanted)."""
    if metric not in METRICS:
        raise KeyError(f"metric: got {metric!r}; allowed: {', '.join(METRICS)}")
    if x not in X_AXES:
        raise KeyError(f"x: got {x!r}; allowed: {', '.join(X_AXES)}")
    grouped = group is not None and not (not isinstance(group, str) and len(group) == 0)
    note = ""
    if not grouped and len(trials) > max_single:
        note = f"Showing the first {max_single} of {len(trials)} runs: group them or filter to see all."
        trials = trials.iloc[:max_single]
    labels = assign_groups(trials, group if grouped else None)
    label_of = dict(zip(trials["trial_id"], labels))
    status_of = dict(zip(trials["trial_id"], trials["status"]))
    m = reader.metrics(sweep, list(trials["trial_id"]), [x, metric] if x != "step" else [metric])
    names = list(m["trial_id"].cat.categories) if len(m) else []
    run = m["trial_id"].cat.codes.to_numpy(np.int32) if len(m) else np.zeros(0, np.int32)
    xs = m[x].to_numpy(np.float64)
    ys = m[metric].to_numpy(np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    if log_x:
        ok &= xs > 0
    gnames = list(dict.fromkeys(label_of[n] for n in names))
    gcode = np.array([gnames.index(label_of[n]) for n in names], np.int32)
    ended = pd.DataFrame(columns=["run", "x", "y", "status"])
    empty = pd.DataFrame(columns=["group", "run", "x", "y"])
    if not ok.any():
        return CurveData(metric, x, empty, empty, pd.DataFrame(), {}, grouped, ended,
                         note or f"No finite values of {metric!r} against {x!r} in these runs.")
    run, xs, ys = run[ok], xs[ok], ys[ok]
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
    lasts = np.r_[starts[1:], len(run)] - 1
    # Where a diverged / failed run stopped: its last finite point gets a marker.
    stopped = [i for i in lasts if status_of.get(names[run[i]]) in ("diverged", "failed")]
    if stopped:
        ended = pd.DataFrame({"run": [names[run[i]] for i in stopped], "x": xs[stopped], "y": ys[stopped],
                              "status": [status_of[names[run[i]]] for i in stopped]})
    present = np.unique(run)
    buckets = int(max(4, min(500, point_budget // (4 * len(present)))))

    def named(df: pd.DataFrame) -> pd.DataFrame:
        codes = df["run"].to_numpy(np.int64)
        return pd.DataFrame({"group": [gnames[gcode[c]] for c in codes], "run": [names[c] for c in codes],
                             "x": df["x"].to_numpy(), "y": df["y"].to_numpy()})

    raw = named(m4_downsample(pa.table({"run": run, "x": xs, "y": ys}), buckets, log_x=log_x))
    smooth = empty
    if smoothing > 0:
        ys = ema(ys, starts, smoothing)
        if not grouped:
            smooth = named(m4_downsample(pa.table({"run": run, "x": xs, "y": ys}), buckets, log_x=log_x))
    group_n = {g: 0 for g in gnames}
    for c in present:
        group_n[gnames[gcode[c]]] += 1
    group_n = {g: n for g, n in group_n.items() if n}
    agg = pd.DataFrame()
    if grouped and aggregate:
        agg = aggregate_seeds(pa.table({"group": gcode[run], "run": run, "x": xs, "y": ys}), agg_buckets,
                              log_x=log_x)
        agg["group"] = [gnames[c] for c in agg["group"].to_numpy(np.int64)]
    return CurveData(metric, x, raw, smooth, agg, group_n, grouped, ended, note)


# ----------------------------------------------------------------------------------------------------------
# Effects, scaling, leverage


def axis_effects(trials: pd.DataFrame, axis: str, metric: str = "final_loss", baseline: Any = None,
                 split: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Per axis value (and per value of `split`, another axis): n seeds, mean, stderr, a t-interval of the
    mean (ci_lo, ci_hi), and the Welch difference to `baseline` (moelab.ablations.effects). Only trials on
    the grid (with `axis` in their axis values) and with a finite metric count. Columns: split (when given),
    value, n, mean, std, stderr, ci_lo, ci_hi, diff, diff_lo, diff_hi, p_value, is_baseline."""
    from moelab.ablations.effects import effects

    if metric not in trials:
        raise ValueError(f"metric {metric!r} is not a trial column here")
    ax = axis_frame(trials)
    if axis not in ax:
        raise ValueError(f"{axis!r} is not an axis of these trials (axes: {list(ax.columns)})")
    frame = pd.DataFrame({"value": ax[axis], "metric": pd.to_numeric(trials[metric], errors="coerce"),
                          "seed": trials["seed"] if "seed" in trials else np.nan})
    if split:
        if split not in ax or split == axis:
            raise ValueError(f"split {split!r} must be another axis (axes: {list(ax.columns)})")
        frame["split"] = ax[split]
    frame = frame[frame["value"].notna() & np.isfinite(frame["metric"].astype(float))]
    parts = []
    for sv, sub in (frame.groupby("split", sort=True, dropna=False) if split else [(None, frame)]):
        if sub.empty:
            continue
        values = list(pd.unique(sub["value"]))
        base = baseline
        if base is not None and base not in values:
            # URL values arrive as strings: match by text
            hit = [v for v in values if _fmt(v) == str(base)]
            base = hit[0] if hit else None
        e = effects(sub, "value", "metric", baseline=base, seed_col="seed", confidence=confidence)
        e = e.reset_index()
        tcrit = stats.t.ppf(1 - (1 - confidence) / 2, np.maximum(e["n"] - 1, 1))
        half = np.where(e["n"] > 1, tcrit * e["stderr"], np.nan)
        e["ci_lo"], e["ci_hi"] = e["mean"] - half, e["mean"] + half
        if split:
            e.insert(0, "split", sv)
        parts.append(e)
    if not parts:
        raise ValueError(f"no trials with a value for {axis!r} and a finite {metric!r}")
    out = pd.concat(parts, ignore_index=True)
    cols = (["split"] if split else []) + ["value", "n", "mean", "std", "stderr", "ci_lo", "ci_hi", "diff",
                                           "diff_lo", "diff_hi", "p_value", "is_baseline"]
    return out[cols]


@dataclass
class DenseLaw:
    """Loss against compute for the dense family, L = E + A C^-alpha (E = 0: Tian et al. 2025's form
    L = alpha_X C^-beta_X). source: "fits table" or "fitted here"; boot: (m, 3) samples (E, A, alpha)."""

    E: float
    A: float
    alpha: float
    c_range: tuple[float, float]
    source: str
    n_points: int = 0
    boot: np.ndarray | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    def predict(self, C: Any) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(C, float), -self.alpha)

    def inverse(self, L: Any) -> np.ndarray:
        """Compute at which the law reaches loss L (NaN where L <= E)."""
        gap = np.asarray(L, float) - self.E
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, np.power(self.A / gap, 1.0 / self.alpha), np.nan)

    def band(self, C: Any, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray] | None:
        if self.boot is None or not len(self.boot):
            return None
        C = np.asarray(C, float)
        curves = self.boot[:, :1] + self.boot[:, 1:2] * np.power(C[None, :], -self.boot[:, 2:3])
        q = (1 - confidence) / 2
        return np.nanquantile(curves, q, axis=0), np.nanquantile(curves, 1 - q, axis=0)


_LAW_CACHE: OrderedDict[bytes, DenseLaw] = OrderedDict()


def _final_points(trials: pd.DataFrame, family: str) -> pd.DataFrame:
    need = {"family", "final_flops", "final_loss"}
    if not need <= set(trials.columns):
        return pd.DataFrame(columns=["trial_id", "C", "L"])
    t = trials[(trials["family"] == family) & (trials["status"] == "finished")]
    C = pd.to_numeric(t["final_flops"], errors="coerce")
    L = pd.to_numeric(t["final_loss"], errors="coerce")
    ok = np.isfinite(C) & np.isfinite(L) & (C > 0) & (L > 0)
    return pd.DataFrame({"trial_id": t["trial_id"][ok], "C": C[ok], "L": L[ok]})


def dense_law(trials: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> DenseLaw | None:
    """Fit L = A C^-alpha to the finished dense trials' (final FLOPs, final loss) with bootstrap (Tian et al.
    2025's per-family compute law; `moelab.ablations.fits.fit_power_law` without offset). None with fewer
    than 2 distinct compute values. Results are memoised on the points."""
    from moelab.ablations.fits import fit_power_law

    pts = _final_points(trials, "dense")
    if pts["C"].nunique() < 2:
        return None
    C, L = pts["C"].to_numpy(float), pts["L"].to_numpy(float)
    key = np.concatenate([C, L, [n_boot, seed]]).tobytes()
    if key in _LAW_CACHE:
        _LAW_CACHE.move_to_end(key)
        return _LAW_CACHE[key]
    fit = fit_power_law(C, L, with_offset=False, n_boot=n_boot, seed=seed)
    law = DenseLaw(fit.E, fit.A, fit.alpha, fit.c_range, "fitted here", len(C), fit.boot_params)
    _LAW_CACHE[key] = law
    while len(_LAW_CACHE) > 32:
        _LAW_CACHE.popitem(last=False)
    return law


def fits_law(fits: pd.DataFrame | None) -> DenseLaw | None:
    """The dense compute law of a `fits` table row (family "dense", a law with parameters E?, A, alpha given
    as a JSON object or a struct), or None when there is none that reads that way."""
    if fits is None or not len(fits) or "family" not in fits or "parameters" not in fits:
        return None
    dense = fits[fits["family"] == "dense"]
    if "law" in dense:  # a compute law (`moelab fit` writes law="power_law"), not the Chinchilla L(N, D) row
        dense = dense[dense["law"].isin(["power_law", "compute"]) | dense["law"].isna()]
    if "status" in dense:
        dense = dense[dense["status"].fillna("ok") == "ok"]
    for _, row in dense.iterrows():
        params = row["parameters"]
        params = _json_dict(params) if not isinstance(params, dict) else params
        if not {"A", "alpha"} <= set(params):
            continue
        try:
            E, A, alpha = float(params.get("E", 0.0) or 0.0), float(params["A"]), float(params["alpha"])
        except (TypeError, ValueError):
            continue
        c_range = params.get("c_range") or (np.nan, np.nan)
        return DenseLaw(E, A, alpha, (float(c_range[0]), float(c_range[1])), "fits table",
                        extra={"law": row.get("law")})
    return None


def with_leverage(trials: pd.DataFrame, law: DenseLaw | None) -> pd.DataFrame:
    """`trials` plus `leverage` = C_dense(L) / C (Tian et al. 2025: the dense compute reaching the same loss
    over the run's compute, from its final loss and FLOPs) for finished MoE trials, and
    `leverage_extrapolated` (the dense compute is outside the law's fitted range)."""
    out = trials.copy()
    out["leverage"] = np.nan
    out["leverage_extrapolated"] = False
    if law is None or not {"final_flops", "final_loss", "family"} <= set(out.columns):
        return out
    pts = _final_points(out, "moe")
    if not len(pts):
        return out
    c_dense = law.inverse(pts["L"].to_numpy())
    lev = c_dense / pts["C"].to_numpy()
    lo, hi = law.c_range
    extra = ~np.isfinite(c_dense) | (np.isfinite(lo) & ((c_dense < lo) | (c_dense > hi)))
    idx = out.index[out["trial_id"].isin(pts["trial_id"])]
    order = pd.Series(range(len(pts)), index=pts["trial_id"].to_numpy())
    pos = order[out.loc[idx, "trial_id"]].to_numpy()
    out.loc[idx, "leverage"] = lev[pos]
    out.loc[idx, "leverage_extrapolated"] = extra[pos]
    return out


def scaling_points(trials: pd.DataFrame, color: str | None = None) -> pd.DataFrame:
    """Finished trials' final points: trial_id, family, C (final FLOPs), L (final loss), params_active,
    leverage, and `label` (the `color` column's value for MoE trials, the run name for dense ones)."""
    rows = []
    for fam in ("dense", "moe"):
        p = _final_points(trials, fam)
        if len(p):
            rows.append(p.assign(family=fam))
    if not rows:
        return pd.DataFrame(columns=["trial_id", "family", "C", "L", "params_active", "leverage", "label"])
    pts = pd.concat(rows, ignore_index=True)
    t = trials.set_index("trial_id")
    for c in ("params_active", "leverage"):
        pts[c] = t[c].reindex(pts["trial_id"]).to_numpy() if c in t else np.nan
    ax = axis_frame(trials).set_axis(trials["trial_id"])
    if color and color in ax:
        lab = ax[color].reindex(pts["trial_id"]).map(_fmt).to_numpy()
        pts["label"] = [f"{_short(color, list(ax.columns))}={v}" for v in lab]
    elif color and color in t:
        pts["label"] = t[color].reindex(pts["trial_id"]).map(_fmt).to_numpy()
    else:
        pts["label"] = "moe"
    dense = pts["family"] == "dense"
    names = t["name"].reindex(pts["trial_id"]).to_numpy() if "name" in t else np.array(["dense"] * len(pts))
    pts.loc[dense, "label"] = [f"dense {n}" if isinstance(n, str) else "dense" for n in names[dense.to_numpy()]]
    return pts


# ----------------------------------------------------------------------------------------------------------
# Experts


def expert_load_at(experts: pd.DataFrame, step: int | None = None) -> tuple[int | None, pd.DataFrame]:
    """(step used, layer x expert matrix of load) at the logged step nearest to `step` (None: the last)."""
    if not len(experts):
        return None, pd.DataFrame()
    steps = np.sort(experts["step"].unique())
    if step is None:
        use = int(steps[-1])
    else:
        use = int(steps[np.argmin(np.abs(steps - int(step)))])
    at = experts[experts["step"] == use]
    return use, at.pivot_table(index="layer", columns="expert", values="load", aggfunc="mean").sort_index()


def expert_load_over_time(experts: pd.DataFrame, layer: int, n_buckets: int = 200) -> pd.DataFrame:
    """Expert x time matrix of one layer's load: columns = step buckets (labelled by the bucket's mean step),
    each the mean load over the logged steps in it; at most `n_buckets` columns."""
    e = experts[experts["layer"] == layer]
    if not len(e):
        return pd.DataFrame()
    q = f"""
    WITH s AS (SELECT min(step) lo, max(step) hi FROM t),
    k AS (SELECT t.*, least(CAST(floor(CASE WHEN hi > lo THEN (step - lo) / (hi - lo) ELSE 0 END * {n_buckets})
                             AS BIGINT), {n_buckets - 1}) AS bucket FROM t, s)
    SELECT bucket, expert, avg(step) AS step, avg(load) AS load FROM k GROUP BY ALL ORDER BY bucket, expert
    """
    out = _sql(q, t=e[["step", "expert", "load"]])
    steps = out.groupby("bucket")["step"].mean().round().astype(int)
    mat = out.pivot_table(index="expert", columns="bucket", values="load")
    mat.columns = steps.reindex(mat.columns).to_numpy()
    return mat


def expert_imbalance(experts: pd.DataFrame) -> pd.DataFrame:
    """Per step and layer: imbalance = max load / mean load (1 = balanced; E = one expert takes all),
    and the coefficient of variation of the load. Columns step, layer, imbalance, cv."""
    q = """SELECT step, layer, max(load) / avg(load) AS imbalance, stddev_pop(load) / avg(load) AS cv
           FROM t GROUP BY step, layer ORDER BY layer, step"""
    return _sql(q, t=experts[["step", "layer", "load"]])


def _nearest_step(steps: np.ndarray, step: int | None) -> int:
    steps = np.sort(np.unique(steps))
    return int(steps[-1] if step is None else steps[np.argmin(np.abs(steps - int(step)))])


def domain_share_at(routing: pd.DataFrame, layer: int, step: int | None = None) -> tuple[int | None, pd.DataFrame]:
    """(step used, domain x expert matrix) of one layer at the logged step nearest to `step` (None: the last).

    share[d, e] = tokens[d, e] / sum_e' tokens[d, e']: where domain d's routed tokens went (each row sums to
    1; a domain without tokens is NaN). Empty when the layer has no rows.
    """
    r = routing[routing["layer"] == layer] if len(routing) else routing
    if not len(r):
        return None, pd.DataFrame()
    use = _nearest_step(r["step"].to_numpy(), step)
    counts = r[r["step"] == use].pivot_table(index="domain", columns="expert", values="tokens", aggfunc="sum")
    counts = counts.sort_index().sort_index(axis=1).astype(float)
    return use, counts.div(counts.sum(axis=1).where(lambda x: x > 0), axis=0)


def specialisation(routing: pd.DataFrame) -> pd.DataFrame:
    """How much an expert's identity tells about the domain, per step and layer: columns step, layer,
    specialisation.

    With p(d, e) = tokens[d, e] / N over the (step, layer)'s routed slots, p(d), p(e) its marginals:

        specialisation = I(D; E) / H(D),   I(D; E) = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e))),
                                           H(D) = -sum_d p(d) log p(d)

    = 1 - H(D | E) / H(D): 1 when every expert sees a single domain (perfectly specialised), 0 when every
    domain spreads over the experts in the same proportions (routing independent of the domain). NaN when
    H(D) = 0 (a single domain: nothing to tell apart).
    """
    cols = ["step", "layer", "specialisation"]
    if not len(routing):
        return pd.DataFrame(columns=cols)
    r = routing[routing["tokens"] > 0][["step", "layer", "domain", "expert", "tokens"]].astype(
        {"tokens": float})  # 0 log 0 = 0: empty cells add nothing
    g = ["step", "layer"]
    n = r.groupby(g)["tokens"].transform("sum")
    nd = r.groupby([*g, "domain"])["tokens"].transform("sum")
    ne = r.groupby([*g, "expert"])["tokens"].transform("sum")
    mi = (r["tokens"] / n * np.log(r["tokens"] * n / (nd * ne))).groupby([r["step"], r["layer"]]).sum()
    dom = r.groupby([*g, "domain"])["tokens"].sum()
    q = dom / dom.groupby(level=g).transform("sum")
    h = -(q * np.log(q)).groupby(level=g).sum()
    spec = (mi / h.where(h > 1e-12)).clip(0.0, 1.0)  # clip: rounding can leave I a hair outside [0, H]
    return spec.rename("specialisation").reset_index().sort_values(["layer", "step"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Parallel coordinates


def parallel_frame(trials: pd.DataFrame, metric: str = "final_loss") -> pd.DataFrame:
    """One row per trial on the grid with a finite `metric`: trial_id, the axis values, the metric."""
    ax = axis_frame(trials)
    if not len(ax.columns) or metric not in trials:
        return pd.DataFrame(columns=["trial_id", *ax.columns, metric])
    out = pd.concat([trials[["trial_id"]], ax, pd.to_numeric(trials[metric], errors="coerce").rename(metric)],
                    axis=1)
    on_grid = ax.notna().any(axis=1)
    return out[on_grid & np.isfinite(out[metric].astype(float))].reset_index(drop=True)
