"""What the Curves view draws: a metric against step / tokens / FLOPs / time per run, smoothed, downsampled
and averaged over seeds (`curve_data`), from the cached reader.

Downsampling (server side, spikes kept): M4 aggregation (Jugel et al. 2014, "M4: A Visualization-Oriented
Time Series Data Aggregation"): per run and x-bucket keep the first, last, min and max point. A line drawn
through those points covers the same pixels as the full line at that bucket width, so a loss spike one
step wide survives any reduction. Seed aggregation bins x the same way per group: each run contributes its
mean in the bucket, then mean, sample std, stderr = std / sqrt(N) and N across runs. With runs logged at
the same x and no more points than buckets, each bucket holds one point per run and the aggregate is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import signal

from moelab.dashboards.inputs import ALL_BUT_SEED, check_metric, check_x
from moelab.dashboards.reader import Reader
from moelab.dashboards.sql import sql
from moelab.dashboards.trials import assign_groups

__all__ = ["ema", "bucket_index", "m4_downsample", "aggregate_seeds", "CurveData", "curve_data"]


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
    return sql(q, t=table)


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
    out = sql(q, t=table)
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
    check_metric(metric)
    check_x(x)
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
