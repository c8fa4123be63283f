"""The trial rows every view starts from: one sweep's rows, their axes, the overview of all sweeps, the runs
table, and how runs are grouped (the columns worth grouping by, a label per trial).

Pure functions over the Reader's trials DataFrame (no I/O). `offer` is what a sweep offers the page's
controls; `moelab.dashboards.inputs` checks the URL against it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moelab.dashboards.inputs import ALL_BUT_SEED, Offer
from moelab.platform.store import STATUSES

__all__ = [
    "SEED_KEYS", "ALL_BUT_SEED", "fmt_value", "short_key", "json_dict", "axis_keys", "axis_frame", "filter_trials",
    "latest_sweep", "sweeps_overview", "recent_failures", "runs_table", "group_keys", "assign_groups", "offer",
]

# Columns that identify a replicate rather than a configuration: grouping "all but seed" ignores them.
SEED_KEYS = ("seed", "train.seed", "upcycle.seed", "data.seed")
# Trial columns that are results or bookkeeping, never grouping keys or "params".
_RESULT_COLS = {
    "sweep", "trial_id", "status", "attempt", "error", "updated_at", "config", "overrides", "axis_values",
    "depends_on", "params_total", "params_active", "params_non_embedding", "flops_per_token", "steps", "tokens",
    "flops", "final_step", "final_tokens", "final_flops", "final_loss", "final_eval_loss", "wall_s", "leverage",
    "leverage_extrapolated", "train.out_dir",
}


def json_dict(text: Any) -> dict:
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
        keys.update(dict.fromkeys(json_dict(text)))
    return list(keys)


def axis_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """One column per axis key with the trial's axis value (NaN for trials off the grid, e.g. dense
    baselines), indexed like `trials`."""
    keys = axis_keys(trials)
    if not keys:
        return pd.DataFrame(index=trials.index)
    parsed = trials["axis_values"].map(json_dict)
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


def latest_sweep(trials: pd.DataFrame) -> str | None:
    """The sweep of the trial row written last (None without `updated_at` or rows): the page's default."""
    if "updated_at" not in trials or not len(trials):
        return None
    return trials.sort_values("updated_at").iloc[-1]["sweep"]


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


def short_key(key: str, keys: Sequence[str]) -> str:
    """`key`'s last dotted part when no other of `keys` ends the same, else `key` whole."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def fmt_value(v: Any) -> str:
    """A value as labels, tables and the baseline dropdown show it: "-" for missing, floats by `:g`."""
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
            vals = json_dict(text)
            if vals:
                labels.append(", ".join(f"{short_key(k, axes)}={fmt_value(v)}" for k, v in vals.items()))
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
        lambda row: ", ".join(f"{short_key(k, keys)}={fmt_value(row[k])}" for k in keys), axis=1).astype(str)



def offer(trials: pd.DataFrame) -> Offer:
    """What one sweep's rows offer the page's controls: the rows, the group keys, the axes and each axis's
    values as text (sorted when they compare)."""
    axes = axis_keys(trials)
    frame = axis_frame(trials)
    values = {}
    for a in axes:
        col = frame[a].dropna()
        try:
            values[a] = [fmt_value(v) for v in sorted(col.unique())]
        except TypeError:  # mixed types (8 and "auto") do not sort: first-seen order
            values[a] = [fmt_value(v) for v in col.unique()]
    return Offer(trials, group_keys(trials), axes, values)
