"""Per-axis effects of an ablation sweep: mean +/- stderr per axis value and the difference to a baseline.

The difference of two group means uses Welch's t-interval (unequal variances; Welch 1947):

    diff = mean_v - mean_0,   se = sqrt(s_v^2/n_v + s_0^2/n_0),
    dof  = se^4 / ((s_v^2/n_v)^2/(n_v-1) + (s_0^2/n_0)^2/(n_0-1))       (Welch-Satterthwaite)
    CI   = diff +/- t_{dof, 1-(1-confidence)/2} * se

Replicates are seeds: several rows with the same (axis value, seed) are averaged first, so ``n`` counts
seeds, not rows. Rows without a seed (or frames without ``seed_col``) each count as one replicate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["effects"]

COLUMNS = [
    "n", "mean", "std", "stderr", "diff", "diff_stderr", "dof", "diff_lo", "diff_hi", "p_value", "is_baseline",
]


def _replicates(trials: pd.DataFrame, axis: str, metric: str, seed_col: str) -> pd.DataFrame:
    """Frame with columns [axis, metric]: one row per (axis value, seed), metric averaged over duplicates."""
    frame = trials[[c for c in (axis, metric, seed_col) if c in trials.columns]].copy()
    frame[metric] = pd.to_numeric(frame[metric], errors="coerce")
    frame = frame[frame[axis].notna() & np.isfinite(frame[metric].astype(float))]
    if seed_col not in frame.columns:
        return frame[[axis, metric]]
    seeded = frame[frame[seed_col].notna()]
    unseeded = frame[frame[seed_col].isna()]
    per_seed = seeded.groupby([axis, seed_col], sort=False, dropna=False)[metric].mean().reset_index()
    return pd.concat([per_seed[[axis, metric]], unseeded[[axis, metric]]], ignore_index=True)


def _ordered_values(values: pd.Series) -> list[Any]:
    """Distinct axis values, sorted when they are mutually comparable, else in order of first appearance."""
    distinct = list(pd.unique(values))
    try:
        return sorted(distinct)
    except TypeError:  # mixed types (e.g. 1 and "auto"): keep the order the trials came in
        return distinct


def _welch(mean1: float, var1: float, n1: int, mean0: float, var0: float, n0: int,
           confidence: float) -> dict[str, float]:
    """Welch difference mean1 - mean0 with its stderr, dof, t-interval and two-sided p-value."""
    diff = mean1 - mean0
    nan = float("nan")
    if n1 < 2 or n0 < 2:  # no variance estimate for a group of one
        return {"diff": diff, "diff_stderr": nan, "dof": nan, "diff_lo": nan, "diff_hi": nan, "p_value": nan}
    v1, v0 = var1 / n1, var0 / n0
    se = float(np.sqrt(v1 + v0))
    if se == 0.0:  # both groups constant: the difference is exact
        p = 1.0 if diff == 0 else 0.0
        return {"diff": diff, "diff_stderr": 0.0, "dof": nan, "diff_lo": diff, "diff_hi": diff, "p_value": p}
    dof = (v1 + v0) ** 2 / (v1**2 / (n1 - 1) + v0**2 / (n0 - 1))
    t_crit = float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, dof))
    p = float(2.0 * stats.t.sf(abs(diff) / se, dof))
    return {"diff": diff, "diff_stderr": se, "dof": float(dof),
            "diff_lo": diff - t_crit * se, "diff_hi": diff + t_crit * se, "p_value": p}


def effects(
    trials: pd.DataFrame,
    axis: str,
    metric: str,
    baseline: Any = None,
    seed_col: str = "seed",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Effect of each value of ``axis`` on ``metric``, one row per axis value (index = axis value).

    trials: one row per trial (run), with columns ``axis``, ``metric`` and optionally ``seed_col``. Rows with
    a missing axis value or a non-finite metric are dropped.
    baseline: the axis value differences are taken against; default the smallest value (first seen when
    values are not comparable).
    Columns: n (seeds), mean, std (ddof=1), stderr = std/sqrt(n), diff = mean - baseline mean, diff_stderr,
    dof, diff_lo/diff_hi (Welch t-interval at ``confidence``), p_value (Welch two-sided), is_baseline.
    Groups with n < 2 (or a baseline with n < 2) get NaN intervals.
    """
    for col in (axis, metric):
        if col not in trials.columns:
            raise ValueError(f"column {col!r} not in trials (columns: {list(trials.columns)})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    reps = _replicates(trials, axis, metric, seed_col)
    if reps.empty:
        raise ValueError(f"no trials with a value for {axis!r} and a finite {metric!r}")
    order = _ordered_values(reps[axis])
    if baseline is None:
        baseline = order[0]
    elif baseline not in order:
        raise ValueError(f"baseline {baseline!r} is not among the values of {axis!r}: {order}")

    groups = {value: reps.loc[reps[axis] == value, metric].to_numpy(dtype=float) for value in order}
    base = groups[baseline]
    base_var = float(np.var(base, ddof=1)) if len(base) > 1 else float("nan")
    rows = []
    for value in order:
        x = groups[value]
        n = len(x)
        var = float(np.var(x, ddof=1)) if n > 1 else float("nan")
        row = {"n": n, "mean": float(x.mean()), "std": float(np.sqrt(var)),
               "stderr": float(np.sqrt(var / n)), "is_baseline": value == baseline}
        if value == baseline:
            row.update(diff=0.0, diff_stderr=float("nan"), dof=float("nan"), diff_lo=float("nan"),
                       diff_hi=float("nan"), p_value=float("nan"))
        else:
            row.update(_welch(row["mean"], var, n, float(base.mean()), base_var, len(base), confidence))
        rows.append(row)
    out = pd.DataFrame(rows, index=pd.Index(order, name=axis), columns=COLUMNS)
    return out.astype({"n": int, "is_baseline": bool})
