"""Per-axis effects of an ablation sweep: each axis value against a baseline value, paired by seed.

Trials of one sweep share seeds and data: seed s of arm v and seed s of the baseline saw the same batches
(and, upcycled, the same dense source), so their losses move together. The difference is therefore taken
*within* a seed (and within a block: the same values of the other axes, sizes and budgets), averaged over
the blocks of that seed, and the interval comes from the spread of these per-seed differences (a paired
t-interval, n - 1 degrees of freedom, n = seeds present in both arms). Comparing seed means with Welch's
interval instead leaves the shared seed noise in both arms' variances: intervals too wide where the pairing
removes it, and the wrong degrees of freedom. Welch (1947) is used only when the arms share no seeds.

What is never printed:
* a p-value from fewer than 3 seeds per arm (``note`` says so; the difference is still shown),
* an interval or p-value from differences with no spread (two equal values give a variance of 0, which is
  not evidence of an exact effect),
* a silently dropped value: +inf (a leverage whose loss the dense law never reaches, the best designs) is
  kept. Such a contrast is compared by ranks (exact sign test when paired, Mann-Whitney otherwise; +inf
  ties with +inf and beats any finite value), its difference is the median per-seed difference, and
  ``n_inf`` counts the infinite values.

Several contrasts shown together are corrected with Holm's step-down method (``holm``; Holm 1979): it
controls the family-wise error rate at the stated level under any dependence between the contrasts.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["effects", "holm", "MIN_SEEDS"]

MIN_SEEDS = 3  # below this a seed variance has 1 degree of freedom or none: no p-value is given

COLUMNS = [
    "n", "mean", "std", "stderr", "n_inf", "diff", "diff_stderr", "dof", "diff_lo", "diff_hi", "p_value",
    "method", "note", "is_baseline",
]


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given; NaN stays NaN and is not counted).

    Sorted p_(1) <= ... <= p_(m): adjusted_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def _ordered_values(values: pd.Series) -> list[Any]:
    """Distinct axis values, sorted when they are mutually comparable, else in order of first appearance."""
    distinct = list(pd.unique(values))
    try:
        return sorted(distinct)
    except TypeError:  # mixed types (e.g. 1 and "auto"): keep the order the trials came in
        return distinct


def _block_key(frame: pd.DataFrame, blocks: Sequence[str]) -> pd.Series:
    if not blocks:
        return pd.Series("", index=frame.index)
    return frame[list(blocks)].map(str).agg("|".join, axis=1)  # map, not astype: NaN -> "nan", a value


def _summary(x: np.ndarray) -> dict[str, Any]:
    """n, mean, std, stderr over per-seed values x (n,); +inf values are counted, not averaged."""
    finite = x[np.isfinite(x)]
    n = len(x)
    var = float(np.var(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return {"n": n, "mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": math.sqrt(var) if var == var else float("nan"),
            "stderr": math.sqrt(var / len(finite)) if var == var else float("nan"),
            "n_inf": int(np.sum(np.isinf(x)))}


def _empty_contrast(diff: float, method: str, note: str) -> dict[str, Any]:
    nan = float("nan")
    return {"diff": diff, "diff_stderr": nan, "dof": nan, "diff_lo": nan, "diff_hi": nan, "p_value": nan,
            "method": method, "note": note}


def _t_contrast(d: np.ndarray | None, diff: float, se: float, dof: float, n_min: int, method: str,
                confidence: float) -> dict[str, Any]:
    if n_min < 2:
        return _empty_contrast(diff, method, "one seed: no interval")
    if not (se > 0) or not np.isfinite(se):
        return _empty_contrast(diff, method, "no spread across seeds: no interval")
    t_crit = float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, dof))
    out = {"diff": diff, "diff_stderr": se, "dof": float(dof), "diff_lo": diff - t_crit * se,
           "diff_hi": diff + t_crit * se, "p_value": float(2.0 * stats.t.sf(abs(diff) / se, dof)),
           "method": method, "note": ""}
    if n_min < MIN_SEEDS:
        out["p_value"] = float("nan")
        out["note"] = f"{n_min} seeds: no p-value (needs {MIN_SEEDS})"
    return out


def _paired(d: np.ndarray, confidence: float) -> dict[str, Any]:
    """Per-seed differences d (n,): paired t-interval, or a sign test when some are infinite."""
    n = len(d)
    if np.isinf(d).any() or np.isnan(d).any():
        return _rank_paired(d)
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return _t_contrast(d, diff, se, n - 1, n, "paired t", confidence)


def _rank_paired(d: np.ndarray) -> dict[str, Any]:
    """Exact two-sided sign test on per-seed differences; NaN (inf - inf) counts as a tie and is left out."""
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    med = float(np.nanmedian(np.where(np.isnan(d), 0.0, d))) if len(d) else float("nan")
    out = _empty_contrast(med, "sign test", "infinite values: compared by sign, median difference")
    if len(d) >= MIN_SEEDS and wins + losses:
        out["p_value"] = float(stats.binomtest(wins, wins + losses).pvalue)
    elif len(d) < MIN_SEEDS:
        out["note"] += f"; {len(d)} seeds: no p-value (needs {MIN_SEEDS})"
    return out


def _unpaired(x: np.ndarray, x0: np.ndarray, confidence: float) -> dict[str, Any]:
    """Welch's t-interval on per-seed values x (n1,), x0 (n0,); Mann-Whitney when some are infinite."""
    n1, n0 = len(x), len(x0)
    if np.isinf(x).any() or np.isinf(x0).any():
        med = float(np.median(x) - np.median(x0))
        out = _empty_contrast(med if np.isfinite(med) else float("nan"), "Mann-Whitney",
                              "infinite values: compared by ranks, difference of medians")
        if min(n1, n0) >= MIN_SEEDS:
            out["p_value"] = float(stats.mannwhitneyu(x, x0, alternative="two-sided").pvalue)
        return out
    diff = float(x.mean() - x0.mean())
    if min(n1, n0) < 2:
        return _empty_contrast(diff, "Welch", "one seed: no interval")
    v1, v0 = x.var(ddof=1) / n1, x0.var(ddof=1) / n0
    se = float(np.sqrt(v1 + v0))
    dof = (v1 + v0) ** 2 / (v1**2 / (n1 - 1) + v0**2 / (n0 - 1)) if se > 0 else float("nan")
    return _t_contrast(None, diff, se, dof, min(n1, n0), "Welch", confidence)


def _per_seed(frame: pd.DataFrame, metric: str, seed_col: str) -> pd.Series:
    """Mean over a value's blocks per seed (rows without a seed are replicates of their own)."""
    seeds = frame[seed_col] if seed_col in frame else pd.Series(np.nan, index=frame.index)
    key = seeds.astype(object).where(seeds.notna(), pd.Series([f"row{i}" for i in range(len(frame))],
                                                               index=frame.index))
    return frame.groupby(key, sort=True)[metric].mean()


def effects(
    trials: pd.DataFrame,
    axis: str,
    metric: str,
    baseline: Any = None,
    seed_col: str = "seed",
    confidence: float = 0.95,
    blocks: Sequence[str] = (),
) -> pd.DataFrame:
    """Effect of each value of ``axis`` on ``metric`` against ``baseline`` (index = axis value).

    trials: one row per trial with columns ``axis``, ``metric``, optionally ``seed_col`` and ``blocks``
    (other axes, size, budget: trials that differ only in ``axis`` share a block). Rows with a missing axis
    value or a NaN metric are dropped; +inf is kept (module docstring).
    baseline: default the smallest value (first seen when values are not comparable).
    Columns: n (seeds), mean, std, stderr (over per-seed values, finite ones), n_inf, diff (mean paired
    difference), diff_stderr, dof, diff_lo / diff_hi (t-interval at ``confidence``), p_value (two-sided,
    uncorrected: see ``holm``), method (paired t / Welch / sign test / Mann-Whitney), note, is_baseline.
    """
    for col in (axis, metric):
        if col not in trials.columns:
            raise ValueError(f"column {col!r} not in trials (columns: {list(trials.columns)})")
    missing = [b for b in blocks if b not in trials.columns]
    if missing:
        raise ValueError(f"block column(s) {missing} not in trials")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    frame = trials.copy()
    frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype(float)
    frame = frame[frame[axis].notna() & ~np.isnan(frame[metric].to_numpy(float))]
    if frame.empty:
        raise ValueError(f"no trials with a value for {axis!r} and a finite {metric!r}")
    order = _ordered_values(frame[axis])
    if baseline is None:
        baseline = order[0]
    elif baseline not in order:
        raise ValueError(f"baseline {baseline!r} is not among the values of {axis!r}: {order}")
    frame["_block"] = _block_key(frame, blocks)
    seeded = seed_col in frame and frame[seed_col].notna().all()

    base = frame[frame[axis] == baseline]
    base_cells = base.groupby([seed_col, "_block"])[metric].mean() if seeded else None
    rows = []
    for value in order:
        sub = frame[frame[axis] == value]
        per_seed = _per_seed(sub, metric, seed_col).to_numpy(float)
        row = {**_summary(per_seed), "is_baseline": value == baseline}
        if value == baseline:
            row.update(_empty_contrast(0.0, "", "baseline"))
        elif seeded:
            row.update(_paired_or_welch(sub, base, base_cells, metric, seed_col, per_seed, confidence))
        else:
            row.update(_unpaired(per_seed, _per_seed(base, metric, seed_col).to_numpy(float), confidence))
        rows.append(row)
    out = pd.DataFrame(rows, index=pd.Index(order, name=axis), columns=COLUMNS)
    return out.astype({"n": int, "n_inf": int, "is_baseline": bool})


def _paired_or_welch(sub: pd.DataFrame, base: pd.DataFrame, b: pd.Series, metric: str, seed_col: str,
                     per_seed: np.ndarray, confidence: float) -> dict[str, Any]:
    """Within-seed, within-block differences averaged per seed (b: the baseline's cell means); Welch when no
    seed has both arms."""
    a = sub.groupby([seed_col, "_block"])[metric].mean()
    both = a.index.intersection(b.index)
    if len(both):
        with np.errstate(invalid="ignore"):
            d = (a.loc[both] - b.loc[both]).groupby(level=0).mean().to_numpy(float)
        return _paired(d, confidence)
    return _unpaired(per_seed, _per_seed(base, metric, seed_col).to_numpy(float), confidence)
