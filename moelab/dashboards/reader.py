"""The dashboard's cached, read-only reader of one results store.

`Reader` reads the store under one root and keeps what it read: trial rows per file and metric columns per
trial, each keyed by the files' (name, mtime, size), so a refresh re-reads only files that changed. It
never writes. Unreadable files (a truncated upload, a foreign file) are skipped and reported in
`Reader.warnings`; a missing or empty root raises `StoreUnavailable` with a message for the page. Sweep and
trial names are checked before they become paths (the store's `check_name`, `list_file_infos`), and the
URI it shows (`display_uri`) carries no credentials.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import moelab.results as mr
from moelab.dashboards.inputs import check_metric_columns, shown_uri
from moelab.platform.store import METRIC_COLUMNS, check_name, list_file_infos

__all__ = ["StoreUnavailable", "Reader"]

_ROUTING_COLS = ("step", "layer", "domain", "expert", "tokens")  # what Reader.routing returns, in this order


class StoreUnavailable(Exception):
    """The store cannot be shown (missing, empty); the message is meant for the page."""


def _sweep_of(path: str) -> str | None:
    parent = path.rsplit("/", 2)[-2] if path.count("/") >= 1 else ""
    return parent.removeprefix("sweep=") if parent.startswith("sweep=") else None


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
        self.display_uri = shown_uri(self.uri)  # what pages and messages show: never credentials
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
                        f"No results store at {self.display_uri!r} yet: nothing has been written there. It appears "
                        f"when a sweep writes to it (`moelab sweep FILE --storage {self.display_uri}`); this page "
                        f"refreshes by itself.") from None
                except OSError as e:
                    raise StoreUnavailable(f"Cannot read the results store at {self.display_uri!r}: {e}") from None
            return self._results

    def _list(self, table: str, sweep: str | None = None) -> list[pafs.FileInfo]:
        """The visible files of `table` (one sweep's, or all). Names are checked and symlinks out of the root
        are not followed (moelab.platform.store.list_file_infos): a sweep value from a request is a path."""
        r = self.results()
        try:
            return list_file_infos(r.fs, r.root, table, None if sweep is None else [sweep])
        except OSError as e:
            raise StoreUnavailable(f"Cannot list the {table} table: {type(e).__name__}: {e}") from None

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
        check_metric_columns(columns)
        cols = [c for c in dict.fromkeys(columns) if c != "step"]
        with self._lock:
            by_trial: dict[str, list[pafs.FileInfo]] = {}
            infos = self._list("metrics", sweep)
            for info in infos:
                by_trial.setdefault(info.base_name.split(".", 1)[0], []).append(info)
            # A skipped file that is gone (moved aside by `moelab store check --repair`) is no longer news.
            listed, part = {i.path for i in infos}, f"/metrics/sweep={sweep}/"
            for path in [p for p in self.warnings if part in p and p not in listed]:
                del self.warnings[path]
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
        check_name("sweep", sweep), check_name("trial_id", trial_id)
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
        check_name("sweep", sweep), check_name("trial_id", trial_id)
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
