"""Read the results store (`moelab.platform.store`) from a notebook, the dashboard or the fits.

    import moelab.results as mr
    r = mr.open("results/")                 # or "s3://bucket/prefix"
    r.sweeps()                              # ['noise', ...]
    r.trials(sweep="noise")                 # one row per trial: status, axes, config columns, final metrics
    r.metrics(sweep="noise", columns=["loss"])
    r.routing(sweep="noise", trials="t1")   # synthetic data: routed tokens per (layer, domain, expert)
    r.sql("SELECT trial_id, min(loss) FROM metrics GROUP BY 1")

Every read lists the files afresh, so a store that is being written shows its latest finished batches.
`metrics`, `experts` and `routing` are deduplicated: for each (sweep, trial_id, step) only the rows of the highest
`attempt` are kept (a restarted attempt replaces the earlier one's rows for the same steps), sorted by
(sweep, trial_id, step). Files still being written (hidden `.tmp-*` names) are never read.

Sweep and trial arguments are names (letters, digits, `_`, `-`): anything else raises StoreError (a
ValueError) before the store is touched. A file that cannot be read (truncated, not Parquet) is skipped with a
`DamagedFileWarning` naming it, and recorded in `Results.skipped`; `moelab store check ROOT --repair` moves
such files aside.

A root that does not exist raises FileNotFoundError; a root that exists but holds no rows gives empty
DataFrames with the documented columns (and the SQL views exist, empty).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moelab.platform.store import (EXPERTS_SCHEMA, METRICS_SCHEMA, ROUTING_SCHEMA, SWEEP_FIELD, TRIALS_SCHEMA,
                                   DamagedFileWarning, check_name, list_files, list_sweeps, redact_uri,
                                   resolve_root)

__all__ = ["open", "Results"]

_KEYS = {"metrics": ["sweep", "trial_id", "step"], "experts": ["sweep", "trial_id", "step", "layer", "expert"],
         "routing": ["sweep", "trial_id", "step", "layer", "domain", "expert"]}
_FILE_SCHEMAS = {"metrics": METRICS_SCHEMA, "experts": EXPERTS_SCHEMA, "routing": ROUTING_SCHEMA,
                 "trials": TRIALS_SCHEMA}


def open(root: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> "Results":  # noqa: A001
    """The results under `root`: a local directory or a pyarrow.fs URI (`s3://bucket/prefix`)."""
    fs, path = resolve_root(root, filesystem)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        shown = redact_uri(root)
        raise FileNotFoundError(f"no results store at {shown!r}: nothing has been written there "
                                f"(a sweep writes it; `moelab sweep FILE --storage {shown}`)")
    return Results(fs, path, os.fspath(root))


def _as_list(x: str | Iterable[str] | None, kind: str) -> list[str] | None:
    """The names asked for, each checked: a sweep or trial argument becomes part of a path."""
    if x is None:
        return None
    names = [x] if isinstance(x, str) else list(x)
    return [check_name(kind, n) for n in names]


class Results:
    def __init__(self, fs: pafs.FileSystem, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root, uri
        self.skipped: dict[str, str] = {}  # path -> why, of every damaged file skipped so far

    def __repr__(self) -> str:
        return f"Results({redact_uri(self.uri)!r})"

    def _skip(self, path: str, err: BaseException) -> None:
        first = str(err).splitlines()[0] if str(err) else ""
        self.skipped[path] = f"{type(err).__name__}: {first}"
        warnings.warn(f"moelab.results: {path}: skipped, not readable ({self.skipped[path]}); `moelab store "
                      f"check ROOT --repair` moves such files aside", DamagedFileWarning, stacklevel=4)

    def _to_table(self, table: str, files: list[str], columns: list[str] | None = None) -> pa.Table | None:
        """Read `files` as one dataset; when that fails, file by file, skipping (and naming) the bad ones.
        None when no file could be read."""
        try:
            return self._files_dataset(table, files).to_table(columns=columns)
        except (OSError, pa.ArrowException):
            pass
        parts = []
        for path in files:
            try:
                parts.append(self._files_dataset(table, [path]).to_table(columns=columns))
            except (OSError, pa.ArrowException) as e:
                self._skip(path, e)
        if not parts:
            return None
        if table == "trials":  # columns differ between files
            return pa.concat_tables(parts, promote_options="permissive")
        return pa.concat_tables(parts)

    def _readable(self, files: list[str]) -> list[str]:
        """`files` less those whose footer does not read (for lazily read views such as DuckDB's)."""
        try:
            ds.dataset(files, format="parquet", filesystem=self.fs).count_rows()
            return files
        except (OSError, pa.ArrowException):
            pass
        good = []
        for path in files:
            try:
                pq.read_metadata(path, filesystem=self.fs)
                good.append(path)
            except (OSError, pa.ArrowException) as e:
                self._skip(path, e)
        return good

    # -- discovery ----------------------------------------------------------------------------------------------
    def sweeps(self) -> list[str]:
        """Names of the sweeps that have any table partition."""
        return list_sweeps(self.fs, self.root)

    def _files_dataset(self, table: str, files: list[str]) -> ds.Dataset:
        part = ds.partitioning(pa.schema([SWEEP_FIELD]), flavor="hive")
        base = f"{self.root}/{table}"
        if table == "trials":  # columns differ between sweeps: unify every file's schema
            factory = ds.FileSystemDatasetFactory(
                self.fs, files, ds.ParquetFileFormat(),
                ds.FileSystemFactoryOptions(partition_base_dir=base, partitioning=part))
            return factory.finish(factory.inspect(promote_options="permissive", fragments=None))
        schema = pa.schema([*_FILE_SCHEMAS[table], SWEEP_FIELD])
        return ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs, partitioning=part,
                          partition_base_dir=base)

    def _empty(self, table: str, columns: Sequence[str] | None = None) -> pa.Table:
        schema = pa.schema([SWEEP_FIELD, *_FILE_SCHEMAS[table]])
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        return schema.empty_table()

    # -- tables -------------------------------------------------------------------------------------------------
    def trials_arrow(self, sweep: str | Iterable[str] | None = None) -> pa.Table:
        files = list_files(self.fs, self.root, "trials", _as_list(sweep, "sweep"))
        t = self._to_table("trials", files) if files else None
        if t is None:
            return self._empty("trials")
        front = [c for c in ("sweep", *TRIALS_SCHEMA.names) if c in t.column_names]
        return t.select(front + [c for c in t.column_names if c not in front])

    def trials(self, sweep: str | Iterable[str] | None = None) -> pd.DataFrame:
        """One row per trial: ids, family, status, seed, axis values (a column per axis; `axes` holds them as
        JSON), the flattened config (`model.moe.n_experts`, ...), parameter / FLOP counts, final metrics."""
        df = self.trials_arrow(sweep).to_pandas()
        if len(df) and "updated_at" in df:
            df = df.sort_values("updated_at").drop_duplicates(["sweep", "trial_id"], keep="last")
        return df.sort_values(["sweep", "trial_id"]).reset_index(drop=True) if len(df) else df

    def _read(self, table: str, sweep: Any, trials: Any, columns: Sequence[str] | None) -> pa.Table:
        """`table` deduplicated (highest attempt per key) and sorted by its key.

        Planned from the file names (trial, attempt, step range): a trial whose batches do not overlap is
        read as is, in order; only the trials with overlapping batches (restarts) are deduplicated."""
        keys = _KEYS[table]
        if columns is not None:
            known = set(_FILE_SCHEMAS[table].names) | {"sweep"}
            bad = [c for c in columns if c not in known]
            if bad:
                raise KeyError(f"{table}: unknown column(s) {bad}; allowed: {sorted(known)}")
            cols = list(dict.fromkeys([*keys, "attempt", *columns]))
        else:
            cols = ["sweep", *_FILE_SCHEMAS[table].names]
        files = list_files(self.fs, self.root, table, _as_list(sweep, "sweep"), _as_list(trials, "trial_id"))
        parts = []
        for messy, group in _plan(files):
            t = self._to_table(table, group, cols)
            if t is not None:
                parts.append(_dedupe(t, keys) if messy else t)
        if not parts:
            return self._empty(table, cols)
        out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if not _sorted_unique(out, keys):  # files not written by Store (or renamed): do it the slow way
            out = _dedupe(out, keys)
        return out

    def metrics(self, sweep: str | Iterable[str] | None = None, trials: str | Iterable[str] | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per (sweep, trial_id, logged step), latest attempt. `columns` picks metric columns (the
        keys sweep, trial_id, step and attempt are always there)."""
        return self._read("metrics", sweep, trials, columns).to_pandas()

    def experts(self, sweep: str | Iterable[str] | None = None, trials: str | Iterable[str] | None = None,
                steps: Iterable[int] | None = None) -> pd.DataFrame:
        """One row per (sweep, trial_id, step, layer, expert): `load`, the fraction of the layer's routed
        tokens that went to the expert (layer = index among the MoE layers), latest attempt. `steps` keeps
        only those steps."""
        return _at_steps(self._read("experts", sweep, trials, None), steps).to_pandas()

    def routing(self, sweep: str | Iterable[str] | None = None, trials: str | Iterable[str] | None = None,
                steps: Iterable[int] | None = None) -> pd.DataFrame:
        """One row per (sweep, trial_id, step, layer, domain, expert): `tokens`, the routed slots (a token
        counts once per top-k expert that computed it; capacity drops excluded) of the domain's tokens that
        went to the expert over the log interval ending at `step`, latest attempt. Only runs on data with
        domains (`data.source: synthetic`) have rows. `steps` keeps only those steps."""
        return _at_steps(self._read("routing", sweep, trials, None), steps).to_pandas()

    # -- SQL ----------------------------------------------------------------------------------------------------
    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with views `trials`, `metrics`, `experts`, `routing` (deduplicated as above)
        over the files present now. Close it when done."""
        con = duckdb.connect()
        con.register("trials_raw", self.trials_arrow())
        con.execute("CREATE VIEW trials AS SELECT * FROM trials_raw")
        for table in ("metrics", "experts", "routing"):
            files = self._readable(list_files(self.fs, self.root, table))
            con.register(f"{table}_raw", self._files_dataset(table, files) if files else self._empty(table))
            if any(messy for messy, _ in _plan(files)):
                con.execute(f"CREATE VIEW {table} AS SELECT * EXCLUDE (_rank) FROM (SELECT *, row_number() OVER "
                            f"(PARTITION BY {', '.join(_KEYS[table])} ORDER BY attempt DESC) AS _rank "
                            f"FROM {table}_raw) WHERE _rank = 1")
            else:  # no batch overlaps another: nothing to deduplicate
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM {table}_raw")
        con.register("fits_raw", pa.Table.from_pandas(self.fits(), preserve_index=False))
        con.execute("CREATE VIEW fits AS SELECT * FROM fits_raw")
        return con

    def fits(self, sweep: str | None = None) -> pd.DataFrame:
        """The `fits` table written by `moelab fit` (one sweep, or all); an empty frame when there is none."""
        from moelab.platform.fitstable import read_fits

        return read_fits(self.root, sweep, filesystem=self.fs)

    def sql(self, query: str) -> pd.DataFrame:
        """Run a DuckDB query over the views `trials`, `metrics`, `experts`, `routing`, `fits`; returns a
        DataFrame."""
        con = self.connect()
        try:
            return con.execute(query).df()
        finally:
            con.close()


def _at_steps(table: pa.Table, steps: Iterable[int] | None) -> pa.Table:
    if steps is None:
        return table
    return table.filter(pc.is_in(table.column("step"), pa.array([int(x) for x in steps], pa.int64())))


_BATCH = re.compile(r"^(?P<trial>[^.]+)\.a(?P<attempt>\d+)\.s(?P<first>\d+)-(?P<last>\d+)\.parquet$")


def _plan(files: list[str]) -> list[tuple[bool, list[str]]]:
    """Split files into segments (needs_dedupe, files) whose concatenation, in order, is sorted by
    (sweep, trial_id, step): each trial's batches by (attempt, first step); a trial whose batches overlap
    (a restart rewrote steps) or whose names do not parse is its own segment, to deduplicate."""
    trials: dict[tuple[str, str], list[tuple[int, int, int, str]]] = {}
    odd: set[tuple[str, str]] = set()
    for path in files:
        directory, name = path.rsplit("/", 1)
        sweep = directory.rsplit("/", 1)[-1].removeprefix("sweep=")
        m = _BATCH.match(name)
        if m:
            key = (sweep, m["trial"])
            trials.setdefault(key, []).append((int(m["attempt"]), int(m["first"]), int(m["last"]), path))
        else:
            key = (sweep, name.split(".", 1)[0])
            trials.setdefault(key, []).append((0, 0, -1, path))
            odd.add(key)
    segments: list[tuple[bool, list[str]]] = []
    for key in sorted(trials):
        batches = sorted(trials[key])
        messy = key in odd or any(b[1] <= a[2] for a, b in zip(batches, batches[1:]))
        paths = [b[3] for b in batches]
        if messy or not segments or segments[-1][0]:
            segments.append((messy, paths))
        else:
            segments[-1][1].extend(paths)
    return segments


def _dedupe(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the highest attempt per key, sorted by key (DuckDB: a window over the rows)."""
    con = duckdb.connect()
    try:
        con.register("t", table)
        part = ", ".join(keys)
        return _arrow(con.sql(f"SELECT * FROM t QUALIFY row_number() OVER (PARTITION BY {part} "
                              f"ORDER BY attempt DESC) = 1 ORDER BY {part}"))
    finally:
        con.close()


def _sorted_unique(table: pa.Table, keys: list[str]) -> bool:
    """Whether rows are strictly increasing in (keys...) lexicographically: sorted and no key twice."""
    if table.num_rows < 2:
        return True
    prefix_equal = None
    bad = None
    for k in keys:
        col = table.column(k)
        nxt, prev = col.slice(1), col.slice(0, table.num_rows - 1)
        lt = pc.less(nxt, prev)
        eq = pc.equal(nxt, prev)
        bad = lt if bad is None else pc.or_(bad, pc.and_(prefix_equal, lt))
        prefix_equal = eq if prefix_equal is None else pc.and_(prefix_equal, eq)
    bad = pc.or_(bad, prefix_equal)
    return not pc.any(bad).as_py()


def _arrow(relation: Any) -> pa.Table:
    """A DuckDB relation as an Arrow table (`to_arrow_table` in duckdb 2, `arrow` before)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
