"""The `fits` table: what `moelab fit` concluded about a sweep, one Parquet file per analysed sweep.

    ROOT/fits/sweep=S/fits.parquet          rewritten whole by each `moelab fit` (atomically)

It lives with the other tables (platform: WHERE results go) so that the analysis (`moelab.ablations`, which
writes it) and the readers (`moelab.results`, the dashboard) both depend on this module and not on each other.

Rows have a ``scope``: ``law`` (a fitted law: chinchilla, power_law = a compute-optimal frontier
``L = E + A C^-alpha``, granularity), ``trial`` (one trial's leverage), ``size`` (the geometric mean of a
family's trials at one size and budget, over seeds) or ``family`` (a family's efficiency leverage at the
compute budget ``at_compute``; ``parameters.headline`` marks the figure the summary leads with).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from moelab.platform.store import NAME_RE, list_files, partition_dir, put_table, resolve_root

__all__ = ["FITS_SCHEMA", "fits_table", "write_fits_table", "read_fits"]

FITS_SCHEMA = pa.schema([
    ("family", pa.string()),         # "dense", or the MoE family's label, e.g. "moe[n_experts=8, noise_std=0]"
    ("law", pa.string()),            # chinchilla | power_law | granularity | parameter_leverage | compute_leverage
    ("scope", pa.string()),          # law | trial | size | family (module docstring)
    ("trial_id", pa.string()),       # scope trial only
    ("status", pa.string()),         # "ok" or "skipped" (then `message` says why)
    ("parameters", pa.string()),     # JSON object: the fitted values (laws) or the inputs/outputs (leverage)
    ("intervals", pa.string()),      # JSON object {name: [lo, hi]} at `confidence`, or null without bootstrap
    ("leverage", pa.float64()),      # leverage rows only (inf: the dense law never reaches the loss)
    ("leverage_lo", pa.float64()),
    ("leverage_hi", pa.float64()),   # inf: the interval has no finite upper end
    ("extrapolated", pa.bool_()),    # leverage rows: outside the dense fit's range (or unreachable)
    ("at_n", pa.float64()),          # the active non-embedding size the figure holds at (trial / size rows)
    ("at_tokens", pa.float64()),     # ... the tokens
    ("at_compute", pa.float64()),    # ... the training FLOPs (family rows: the stated budget)
    ("n_points", pa.int64()),        # points behind a law; trials behind a leverage
    ("points", pa.string()),         # "final" or "curve"
    ("n_boot", pa.int64()),
    ("confidence", pa.float64()),
    ("message", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy to Python, +/-inf to the strings "inf"/"-inf", NaN to None (JSON has neither)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return None
        return float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")
    return x


def fits_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with FITS_SCHEMA's keys; parameters / intervals as dicts) -> a table with FITS_SCHEMA."""
    now = datetime.now(timezone.utc)

    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    cols: dict[str, list] = {name: [] for name in FITS_SCHEMA.names}
    for r in rows:
        for name in FITS_SCHEMA.names:
            v = r.get(name)
            if name in ("parameters", "intervals"):
                v = None if v is None else json.dumps(_jsonable(v))
            elif pa.types.is_floating(FITS_SCHEMA.field(name).type):
                v = num(v)
            elif name == "created_at":
                v = now
            elif name in ("n_points", "n_boot") and v is not None:
                v = int(v)
            elif name == "extrapolated" and v is not None:
                v = bool(v)
            cols[name].append(v)
    return pa.table({k: pa.array(v, FITS_SCHEMA.field(k).type) for k, v in cols.items()}, schema=FITS_SCHEMA)


def write_fits_table(root: str, sweep: str, table: pa.Table, *, filesystem: pafs.FileSystem | None = None) -> str:
    """Replace ROOT/fits/sweep=S/fits.parquet with ``table``; returns its path."""
    if not NAME_RE.match(sweep or ""):
        raise ValueError(f"sweep label {sweep!r} is not a valid partition name (letters, digits, _ and -)")
    fs, base = resolve_root(root, filesystem)
    path = f"{partition_dir(base, 'fits', sweep)}/fits.parquet"
    put_table(fs, path, table)  # the store's own whole-or-nothing write (local and object store)
    return path


def read_fits(root: str, sweep: str | Sequence[str] | None = None, *,
              filesystem: pafs.FileSystem | None = None) -> pd.DataFrame:
    """The `fits` table (all sweeps, or some) with its `sweep` column; an empty frame with the columns when
    none was written. `parameters` and `intervals` are JSON strings (json.loads, or DuckDB's ->> operators).
    Files written before a column existed read it as null."""
    fs, base = resolve_root(root, filesystem)
    sweeps = None if sweep is None else ([sweep] if isinstance(sweep, str) else list(sweep))
    for s in sweeps or ():
        if not NAME_RE.match(str(s)):
            raise ValueError(f"sweep {s!r} is not a valid sweep name (letters, digits, _ and -)")
    files = list_files(fs, base, "fits", sweeps)
    schema = pa.schema([*FITS_SCHEMA, pa.field("sweep", pa.string())])
    if not files:
        return schema.empty_table().select(["sweep", *FITS_SCHEMA.names]).to_pandas()
    part = ds.partitioning(pa.schema([pa.field("sweep", pa.string())]), flavor="hive")
    data = ds.dataset(files, schema=schema, format="parquet", filesystem=fs, partitioning=part,
                      partition_base_dir=f"{base}/fits")
    return data.to_table().select(["sweep", *FITS_SCHEMA.names]).to_pandas()
