"""What the Axis effects and Parallel coordinates views show: how a trial's final metric moves with the
sweep's axes (per-value means with intervals and the difference to a baseline; one row per trial on the
grid). Pure functions over the trials DataFrame."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from moelab.dashboards.inputs import check_axis, check_split, check_trial_column
from moelab.dashboards.trials import axis_frame, fmt_value

__all__ = ["axis_effects", "parallel_frame"]


def axis_effects(trials: pd.DataFrame, axis: str, metric: str = "final_loss", baseline: Any = None,
                 split: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Per axis value (and per value of `split`, another axis): n seeds, mean, stderr, a t-interval of the
    mean (ci_lo, ci_hi), and the Welch difference to `baseline` (moelab.ablations.effects). Only trials on
    the grid (with `axis` in their axis values) and with a finite metric count. Columns: split (when given),
    value, n, mean, std, stderr, ci_lo, ci_hi, diff, diff_lo, diff_hi, p_value, is_baseline."""
    from moelab.ablations.effects import effects

    check_trial_column(metric, trials)
    ax = axis_frame(trials)
    check_axis(axis, list(ax.columns))
    frame = pd.DataFrame({"value": ax[axis], "metric": pd.to_numeric(trials[metric], errors="coerce"),
                          "seed": trials["seed"] if "seed" in trials else np.nan})
    if split:
        check_split(split, axis, list(ax.columns))
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
            hit = [v for v in values if fmt_value(v) == str(base)]
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


def parallel_frame(trials: pd.DataFrame, metric: str = "final_loss") -> pd.DataFrame:
    """One row per trial on the grid with a finite `metric`: trial_id, the axis values, the metric."""
    ax = axis_frame(trials)
    if not len(ax.columns) or metric not in trials:
        return pd.DataFrame(columns=["trial_id", *ax.columns, metric])
    out = pd.concat([trials[["trial_id"]], ax, pd.to_numeric(trials[metric], errors="coerce").rename(metric)],
                    axis=1)
    on_grid = ax.notna().any(axis=1)
    return out[on_grid & np.isfinite(out[metric].astype(float))].reset_index(drop=True)
