"""`moelab fit`: scaling laws, leverage and per-axis effects of the trials in a results store.

    from moelab.ablations.report import run_fit, summary_text
    analysis, html = run_fit("results/", sweep="noise")   # fits table written, report written
    print(summary_text(analysis))

What is fitted (the laws themselves live in `moelab.ablations.fits`, the effects in `effects`):

* dense Chinchilla law ``L(N, D) = E + A/N^alpha + B/D^beta`` over the dense trials' points, with N the
  active non-embedding parameters (``n_column``), D the tokens and L the eval loss (``loss``);
* a compute law per family (dense, and each MoE configuration), C = training FLOPs: ``L = A C^-alpha``
  (Tian et al. 2025's form, the default) or ``L = E + A C^-alpha`` (``compute_law="offset"``);
* leverage of every finished MoE trial and of every MoE family over the dense baselines:
  parameter leverage ``N_dense_equivalent / N_active`` from the Chinchilla fit at the MoE's tokens, and
  compute leverage ``C_dense(L) / C`` from the dense compute law (Tian et al. 2025); intervals come from the
  dense fits' bootstrap, and every value outside the dense fits' range is flagged ``extrapolated``;
* the granularity law (Krajewski et al. 2024, eq. 9) when the MoE trials vary ``model.moe.granularity``;
* per-axis effects (mean, Welch interval of the difference to the baseline value, over seeds) of the final
  loss and of both leverages, for every axis of the sweep.

Points. ``points="final"`` uses one point per trial (its final eval loss at its final tokens / FLOPs), as
Hoffmann et al. do. That needs dense runs at two or more token budgets; a sweep whose dense baselines all
train for the same number of steps has a single D, so ``points="auto"`` (the default) then falls back to
``"curve"``: each trial's logged evaluations (from ``curve_min_frac`` of its tokens on, at most
``max_curve_points`` per trial, log-spaced). The summary says which was used and why; under a decaying LR
schedule intermediate evaluations sit above a fully annealed run's loss, so final points are preferred.
For the compute laws the points are averaged over seeds and reduced to their lower envelope (the lowest
loss reached at or below each compute: the compute-efficient frontier).

Nothing here raises on a degenerate store (no dense trials, one model size, too few points, NaN losses,
diverged trials): a fit that cannot be made is recorded as ``skipped`` with the reason, in
``Analysis.skipped``, in the ``fits`` table (``status = "skipped"``), in the summary and in the report. Only
a root that does not exist and an unknown sweep name raise (FileNotFoundError / ValueError).

The ``fits`` table (design.md "Tables") is one Parquet file per analysed sweep,
``ROOT/fits/sweep=S/fits.parquet``, rewritten whole by each run (atomically, like `moelab.platform.store`);
columns: see ``FITS_SCHEMA``. ``read_fits(root)`` reads it back.
"""

from __future__ import annotations

import html
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moelab import results as _results
from moelab.ablations.effects import effects as _effects
from moelab.ablations.fits import (ChinchillaFit, GranularityFit, PowerLawFit, fit_chinchilla, fit_granularity,
                                   fit_power_law, parameter_leverage)
from moelab.platform.store import NAME_RE, list_files, partition_dir, resolve_root

__all__ = [
    "Analysis", "FitRecord", "FITS_SCHEMA", "SCALE_AXES", "analyse", "write_fits", "read_fits", "write_report",
    "summary_text", "run_fit",
]

# Axes that change a model's size or budget rather than its design: they do not split MoE families (a family
# is a design seen at several sizes), but they still get per-axis effects.
SCALE_AXES = ("preset", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim",
              "model.d_ff", "model.moe.d_expert", "train.steps", "train.max_tokens", "train.batch_size",
              "train.seq_len")
SEED_AXES = ("seed", "train.seed", "upcycle.seed", "data.seed")

FITS_SCHEMA = pa.schema([
    ("family", pa.string()),         # "dense", or the MoE family's label, e.g. "moe[n_experts=8, noise_std=0]"
    ("law", pa.string()),            # chinchilla | power_law | granularity | parameter_leverage | compute_leverage
    ("trial_id", pa.string()),       # per-trial leverage rows; null for family-level rows
    ("status", pa.string()),         # "ok" or "skipped" (then `message` says why)
    ("parameters", pa.string()),     # JSON object: the fitted values (laws) or the inputs/outputs (leverage)
    ("intervals", pa.string()),      # JSON object {name: [lo, hi]} at `confidence`, or null without bootstrap
    ("leverage", pa.float64()),      # leverage rows only (inf: the dense law never reaches the loss)
    ("leverage_lo", pa.float64()),
    ("leverage_hi", pa.float64()),
    ("extrapolated", pa.bool_()),    # leverage rows: outside the dense fit's range (or unreachable)
    ("n_points", pa.int64()),        # points behind the fit (trials behind a family leverage)
    ("points", pa.string()),         # "final" or "curve" (see the module docstring)
    ("n_boot", pa.int64()),
    ("confidence", pa.float64()),
    ("message", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])

_LOSS_FINAL = {"eval_loss": "final_eval_loss", "loss": "final_loss"}


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class FitRecord:
    """One row of the `fits` table (see FITS_SCHEMA)."""

    family: str
    law: str
    status: str = "ok"
    parameters: dict[str, Any] | None = None
    intervals: dict[str, Any] | None = None
    leverage: float | None = None
    leverage_lo: float | None = None
    leverage_hi: float | None = None
    extrapolated: bool | None = None
    n_points: int | None = None
    trial_id: str | None = None
    message: str | None = None


@dataclass
class Analysis:
    """Everything `analyse` found. Frames are plain pandas; fits are `moelab.ablations.fits` objects.

    trials: one row per trial read, with the analysis columns: group (family label), usable, excluded
      (reason when not usable), N, N_total, D, C, L, G, axis columns, and for MoE trials
      parameter_leverage(_lo/_hi), n_equivalent, parameter_extrapolated, compute_leverage(_lo/_hi), c_dense,
      compute_extrapolated.
    dense_points: the (N, D, C, L) points of the Chinchilla fit. law_points: family -> (C, L) frontier points
      of its compute law. family_leverage: one row per MoE family. effects: axis -> metric -> effects frame.
    skipped: (what, why) for every fit or table that could not be made; notes: other things to know.
    """

    root: str
    sweep: str | None
    sweeps: list[str]
    points: str
    loss: str
    n_column: str
    n_boot: int
    confidence: float
    trials: pd.DataFrame
    axes: list[str] = field(default_factory=list)
    family_axes: list[str] = field(default_factory=list)
    dense_points: pd.DataFrame | None = None
    curve_points: pd.DataFrame | None = None
    law_points: dict[str, pd.DataFrame] = field(default_factory=dict)
    dense_fit: ChinchillaFit | None = None
    power_laws: dict[str, PowerLawFit] = field(default_factory=dict)
    family_leverage: pd.DataFrame | None = None
    granularity: GranularityFit | None = None
    effects: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    records: list[FitRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, what: str, why: str, family: str | None = None, law: str | None = None) -> None:
        self.skipped.append((what, why))
        if family is not None and law is not None:
            self.records.append(FitRecord(family=family, law=law, status="skipped", message=f"{what}: {why}"))

    @property
    def fits(self) -> pd.DataFrame:
        """The rows `write_fits` writes (without `sweep` and `created_at`), as a DataFrame."""
        return _records_table(self.records, self.points, self.n_boot, self.confidence).drop(
            columns=["created_at"]).to_pandas()


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    """Column as float (NaN where missing or not numeric)."""
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


def _interval_text(lo: Any, hi: Any) -> str:
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f" [{_fmt(lo)}, {_fmt(hi)}]"


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 of samples (m, ...); NaN samples count as +inf (never reached)."""
    s = np.where(np.isnan(samples), np.inf, samples)
    tail = (1.0 - confidence) / 2.0
    lo = np.quantile(s, tail, axis=0, method="inverted_cdf")
    hi = np.quantile(s, 1.0 - tail, axis=0, method="inverted_cdf")
    return lo, hi


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted segment of each key, unless two keys share it (then the full key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _axis_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            out = json.loads(value)
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}
    return {}


# ----------------------------------------------------------------------------------------------------------
# Reading the store


def _prepare_trials(raw: pd.DataFrame, loss: str, n_column: str) -> tuple[pd.DataFrame, list[str]]:
    """Trials with the analysis columns (see Analysis.trials) and the sweep's axes."""
    t = raw.copy().reset_index(drop=True)
    if "family" not in t.columns:
        t["family"] = None
    if "status" not in t.columns:
        t["status"] = "finished"
    if "seed" not in t.columns:
        t["seed"] = np.nan
    total, active, non_emb = _num(t, "params_total"), _num(t, "params_active"), _num(t, "params_non_embedding")
    t["N_total"] = non_emb  # total non-embedding parameters (the granularity law's N)
    if n_column == "active_non_embedding":
        t["N"] = active - (total - non_emb)
    else:
        t["N"] = _num(t, n_column)
    t["D"] = _num(t, "final_tokens")
    t["C"] = _num(t, "final_flops")
    _add_source_cost(t)
    t["L"] = _num(t, _LOSS_FINAL[loss])
    t["G"] = _num(t, "model.moe.granularity")

    axis_rows = [_axis_dict(v) for v in t.get("axis_values", pd.Series([None] * len(t)))]
    axes = sorted({k for row in axis_rows for k in row if k not in SEED_AXES})
    for axis in axes:  # the axis value as the sweep gave it (the config column holds defaults for dense rows)
        t[axis] = [_axis_value(axis, row) for row in axis_rows]

    reasons = []
    for _, row in t.iterrows():
        if row["family"] not in ("dense", "moe"):
            reasons.append(f"family {row['family']!r} is neither 'dense' nor 'moe'")
        elif row["status"] != "finished":
            reasons.append(f"status {row['status']}")
        elif not (np.isfinite(row["L"]) and row["L"] > 0):
            reasons.append(f"final {loss} is NaN or missing")
        elif not all(np.isfinite(row[c]) and row[c] > 0 for c in ("N", "D", "C")):
            bad = [c for c in ("N", "D", "C") if not (np.isfinite(row[c]) and row[c] > 0)]
            reasons.append(f"missing or non-positive {', '.join(bad)} (parameters / final tokens / final FLOPs)")
        else:
            reasons.append("")
    t["excluded"] = reasons
    t["usable"] = t["excluded"] == ""
    return t, axes


def _add_source_cost(t: pd.DataFrame) -> None:
    """Columns D0, C0: the tokens and FLOPs an upcycled trial inherited from its dense source (the source's
    own D0, C0 included, so chains add up); 0 for other trials. D and C then count them: an upcycled MoE's loss
    was bought with its source's training too, and leaving that out would inflate its compute leverage."""
    t["D0"], t["C0"] = 0.0, 0.0
    if "depends_on" not in t.columns or t.empty:
        return
    D, C = dict(zip(t["trial_id"], t["D"])), dict(zip(t["trial_id"], t["C"]))
    dep = {tid: src for tid, src in zip(t["trial_id"], t["depends_on"]) if isinstance(src, str) and src}

    def inherited(tid: str, seen: frozenset = frozenset()) -> tuple[float, float]:
        src = dep.get(tid)
        if src is None or src in seen or src not in D:
            return 0.0, 0.0
        d0, c0 = inherited(src, seen | {tid})
        return d0 + D[src], c0 + C[src]

    cost = [inherited(tid) for tid in t["trial_id"]]
    t["D0"], t["C0"] = [c[0] for c in cost], [c[1] for c in cost]
    t["D"] = t["D"] + t["D0"]
    t["C"] = t["C"] + t["C0"]


def _axis_value(axis: str, row: dict[str, Any]) -> Any:
    """A trial's value on `axis`; None when the trial does not carry the axis (a dense baseline). A null the
    sweep gave explicitly is a value of its own (`upcycle_from: [null, ladder-2]` -> "scratch"), not missing."""
    if axis not in row:
        return None
    value = row[axis]
    if value is None:
        return "scratch" if axis == "upcycle_from" else "none"
    return value


def _sort_key(value: Any) -> tuple:
    """Numbers before strings, numbers by value (so 8 sorts before 16)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _group_order(a: Analysis) -> list[str]:
    """"dense", then the MoE families ordered by their axis values."""
    t = a.trials
    if "group" not in t.columns or t.empty:
        return []
    keys: dict[str, tuple] = {}
    for _, row in t.iterrows():
        g = row["group"]
        if g not in keys:
            keys[g] = (0 if g == "dense" else 1, tuple(_sort_key(row.get(x)) for x in a.family_axes), str(g))
    return sorted(keys, key=keys.get)


def _label_groups(t: pd.DataFrame, family_axes: list[str]) -> None:
    """Column `group`: "dense" for dense trials, "moe" or "moe[key=value, ...]" for MoE trials."""
    short = _short_names(family_axes)
    labels = []
    for _, row in t.iterrows():
        if row["family"] != "moe" or not family_axes:
            labels.append(str(row["family"]))
            continue
        parts = [f"{short[a]}={_fmt(row[a], 6)}" for a in family_axes if row.get(a) is not None]
        labels.append(f"moe[{', '.join(parts)}]" if parts else "moe")
    t["group"] = labels


def _curve_points(r: _results.Results, sweeps: list[str], t: pd.DataFrame, loss: str,
                  min_frac: float, max_points: int) -> pd.DataFrame:
    """Logged evaluations of the usable trials: trial_id, group, family, seed, N, N_total, G, D, C, L."""
    use = t[t["usable"]]
    cols = ["trial_id", "group", "family", "seed", "N", "N_total", "G", "D", "C", "L"]
    if use.empty:
        return pd.DataFrame(columns=cols)
    m = r.metrics(sweep=sweeps, trials=list(use["trial_id"]), columns=["tokens", "flops", loss])
    if m.empty:
        return pd.DataFrame(columns=cols)
    info = use.drop_duplicates("trial_id").set_index("trial_id")
    out = []
    for tid, g in m.groupby("trial_id", sort=True):
        if tid not in info.index:
            continue
        row = info.loc[tid]
        D = pd.to_numeric(g["tokens"], errors="coerce").to_numpy(float)  # the trial's own tokens
        C = pd.to_numeric(g["flops"], errors="coerce").to_numpy(float)
        L = pd.to_numeric(g[loss], errors="coerce").to_numpy(float)
        ok = np.isfinite(D) & np.isfinite(C) & np.isfinite(L) & (D > 0) & (C > 0) & (L > 0)
        D, C, L = D[ok], C[ok], L[ok]
        if not len(D):
            continue
        keep = D >= min_frac * D.max()
        D, C, L = D[keep], C[keep], L[keep]
        if len(D) > max_points:  # log-spaced subsample (always keeping the last evaluation)
            targets = np.geomspace(D.min(), D.max(), max_points)
            idx = np.unique(np.r_[np.searchsorted(D, targets).clip(0, len(D) - 1), len(D) - 1])
            D, C, L = D[idx], C[idx], L[idx]
        D, C = D + float(row["D0"]), C + float(row["C0"])  # plus what an upcycled trial's source spent
        out.append(pd.DataFrame({"trial_id": tid, "group": row["group"], "family": row["family"],
                                 "seed": row["seed"], "N": row["N"], "N_total": row["N_total"], "G": row["G"],
                                 "D": D, "C": C, "L": L}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def _frontier(points: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged points (by trial design N, D), then the lowest loss reached at or below each compute."""
    if points.empty:
        return pd.DataFrame(columns=["C", "L"])
    avg = points.groupby(["N", "D"], sort=False)[["C", "L"]].mean().reset_index(drop=True)
    avg = avg.sort_values("C", kind="stable").reset_index(drop=True)
    best = np.minimum.accumulate(avg["L"].to_numpy())
    keep = np.r_[True, avg["L"].to_numpy()[1:] < best[:-1]]
    return avg[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# The analysis


def analyse(
    root: str | os.PathLike,
    sweep: str | Sequence[str] | None = None,
    *,
    points: str = "auto",
    loss: str = "eval_loss",
    n_column: str = "active_non_embedding",
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    family_axes: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
    compute_law: str = "no_offset",
    curve_min_frac: float = 0.1,
    max_curve_points: int = 20,
) -> Analysis:
    """Fit the laws, leverages and effects of the trials of `sweep` (a name, a list, or None: every sweep in
    the store, pooled; dense baselines may then come from another sweep) under `root`.

    points: "auto" | "final" | "curve" (module docstring). loss: "eval_loss" or "loss" (training loss); when
    no trial has a final eval loss the training loss is used, with a note. n_column: the N of the Chinchilla
    fit and of parameter leverage, "active_non_embedding" (params_active minus the embedding) or any numeric
    trials column (e.g. "params_active"). n_boot, seed, confidence: bootstrap of every fit. family_axes: the
    axes whose values split MoE trials into families (default every axis except SCALE_AXES and seeds).
    grid: Chinchilla starts (default Hoffmann et al.'s 4,500). compute_law: "no_offset" (Tian et al. 2025's
    per-family L = A C^-alpha, as refs.md gives it: always invertible, fast and stable to fit) or "offset"
    (L = E + A C^-alpha: better over long curves, but E is poorly determined by one family's points and
    MoE losses below the dense E get infinite leverage).
    """
    if compute_law not in ("no_offset", "offset"):
        raise ValueError(f"compute_law: got {compute_law!r}; allowed: no_offset, offset")
    if points not in ("auto", "final", "curve"):
        raise ValueError(f"points: got {points!r}; allowed: auto, final, curve")
    if loss not in _LOSS_FINAL:
        raise ValueError(f"loss: got {loss!r}; allowed: {', '.join(_LOSS_FINAL)}")
    r = _results.open(root)
    available = r.sweeps()
    if sweep is None:
        chosen = available
    else:
        chosen = [sweep] if isinstance(sweep, str) else list(sweep)
        unknown = [s for s in chosen if s not in available]
        if unknown:
            raise ValueError(f"sweep(s) {unknown} not in the store at {os.fspath(root)!r}; "
                             f"allowed: {', '.join(available) or '(none: the store is empty)'}")
    label = chosen[0] if len(chosen) == 1 else ("__".join(sorted(chosen)) if chosen else None)
    raw = r.trials(sweep=chosen) if chosen else pd.DataFrame()
    a = Analysis(root=os.fspath(root), sweep=label, sweeps=list(chosen), points=points, loss=loss,
                 n_column=n_column, n_boot=int(n_boot), confidence=float(confidence), trials=raw)
    if len(chosen) > 1:
        a.notes.append(f"{len(chosen)} sweeps pooled ({', '.join(chosen)}); the fits table goes to "
                       f"sweep={label}")
    if raw.empty:
        a.skip("analysis", "the store holds no trials" + (f" for sweep {label!r}" if label else ""))
        a.points = "final" if points == "auto" else points
        return a
    if loss == "eval_loss" and not np.isfinite(_num(raw, "final_eval_loss")).any() \
            and np.isfinite(_num(raw, "final_loss")).any():
        a.loss = loss = "loss"
        a.notes.append("no trial has a final eval loss: the training loss is used instead")

    t, axes = _prepare_trials(raw, loss, n_column)
    a.axes = axes
    fam_axes = [x for x in axes if x not in SCALE_AXES] if family_axes is None else list(family_axes)
    a.family_axes = fam_axes
    _label_groups(t, fam_axes)
    a.trials = t
    if (t["D0"] > 0).any():
        a.notes.append(f"{int((t['D0'] > 0).sum())} upcycled trial(s): their tokens and FLOPs include their dense "
                       f"source's training (the loss was bought with both)")
    excluded = t[~t["usable"]]
    for reason, g in excluded.groupby("excluded", sort=True):
        a.notes.append(f"{len(g)} trial(s) left out ({reason}): {', '.join(g['trial_id'].astype(str))}")
    dense = t[t["usable"] & (t["family"] == "dense")]
    moe = t[t["usable"] & (t["family"] == "moe")]
    if not len(dense):
        a.notes.append("no usable dense trials: the dense baselines are what laws and leverage are measured "
                       "against (add `baselines:` to the sweep, or pool a dense-ladder sweep)")

    # -- which points ----------------------------------------------------------------------------------------
    nd, dd = dense["N"].nunique(), dense["D"].nunique()
    final_ok = len(dense) >= 6 and nd >= 2 and dd >= 2
    if points == "auto":
        if final_ok or not len(dense):
            a.points = "final"
        else:
            a.points = "curve"
            a.notes.append(f"final points are not enough for the dense Chinchilla fit ({len(dense)} dense "
                           f"trial(s), {nd} model size(s), {dd} token budget(s)): fitting each trial's logged "
                           f"evaluations instead (points='curve'); with a decaying LR these sit above an "
                           f"annealed run's loss, so treat the laws as approximate")
    if a.points == "curve":
        cp = _curve_points(r, chosen, t, loss, curve_min_frac, max_curve_points)
        if cp.empty:
            a.notes.append(f"no logged {loss} values in the metrics table: no curve points")
    else:
        cp = t.loc[t["usable"], ["trial_id", "group", "family", "seed", "N", "N_total", "G", "D", "C", "L"]]
        cp = cp.reset_index(drop=True)
    a.curve_points = cp

    _fit_dense(a, cp, grid, seed)
    _fit_compute_laws(a, cp, seed, compute_law == "offset")
    _leverage(a)
    _fit_granularity(a, cp, moe)
    _effects_all(a)
    return a


def _fit_dense(a: Analysis, cp: pd.DataFrame, grid: np.ndarray | None, seed: int) -> None:
    pts = cp[cp["family"] == "dense"]
    a.dense_points = pts.reset_index(drop=True)
    what = "dense Chinchilla L(N, D)"
    if pts.empty:
        a.skip(what, "no usable dense points", "dense", "chinchilla")
        return
    try:
        fit = fit_chinchilla(pts["N"].to_numpy(float), pts["D"].to_numpy(float), pts["L"].to_numpy(float),
                             n_boot=a.n_boot, seed=seed, grid=grid, confidence=a.confidence)
    except ValueError as e:
        a.skip(what, str(e), "dense", "chinchilla")
        return
    a.dense_fit = fit
    d = fit.to_dict()
    params = {k: d[k] for k in ("E", "A", "B", "alpha", "beta", "objective", "n_range", "d_range", "huber_delta")}
    params.update(n_column=a.n_column, loss=a.loss, n_opt_exponent=fit.beta / (fit.alpha + fit.beta))
    a.records.append(FitRecord(family="dense", law="chinchilla", parameters=params, intervals=d["intervals"],
                               n_points=fit.n_points))


def _fit_compute_laws(a: Analysis, cp: pd.DataFrame, seed: int, with_offset: bool) -> None:
    present = set(cp["group"]) if len(cp) else set()
    groups = [g for g in _group_order(a) if g in present]
    if "dense" not in present:
        a.skip("dense compute law L(C)", "no usable dense points", "dense", "power_law")
    for g in groups:
        front = _frontier(cp[cp["group"] == g])
        a.law_points[g] = front
        what = f"compute law L(C) of {g}"
        try:
            fit = fit_power_law(front["C"].to_numpy(float), front["L"].to_numpy(float), n_boot=a.n_boot,
                                seed=seed, confidence=a.confidence, with_offset=with_offset)
        except ValueError as e:
            hint = "" if a.points == "curve" else " (one point per trial: a family needs several sizes or budgets)"
            a.skip(what, f"{e}{hint}", g, "power_law")
            continue
        a.power_laws[g] = fit
        d = fit.to_dict()
        params = {k: d[k] for k in ("E", "A", "alpha", "with_offset", "objective", "c_range", "huber_delta")}
        params["form"] = "L = E + A * C^-alpha" if with_offset else "L = A * C^-alpha"
        params["loss"] = a.loss
        rec = FitRecord(family=g, law="power_law", parameters=params, intervals=d["intervals"],
                        n_points=fit.n_points)
        # The dense compute law first: readers that take "the first dense row with A and alpha" get this one.
        a.records.insert(0, rec) if g == "dense" else a.records.append(rec)


def _compute_leverage_values(law: PowerLawFit, L: np.ndarray, C: np.ndarray,
                             confidence: float) -> dict[str, np.ndarray]:
    """C_dense(L) / C with the dense compute law's bootstrap interval; extrapolated outside its C range."""
    c_dense = np.asarray(law.inverse(L), dtype=float)
    lev = c_dense / C
    lo_c, hi_c = law.c_range
    extra = ~np.isfinite(c_dense) | (c_dense < lo_c) | (c_dense > hi_c)
    lo = hi = np.full(np.shape(L), np.nan)
    if law.boot_params is not None and len(law.boot_params):
        E, A, al = (law.boot_params[:, i, None] for i in range(3))
        gap = np.asarray(L, float)[None, :] - E
        with np.errstate(divide="ignore", invalid="ignore"):
            samples = np.where(gap > 0, np.power(A / gap, 1.0 / al), np.nan) / C[None, :]
        lo, hi = _quantiles(samples, confidence)
    return {"c_dense": c_dense, "leverage": np.where(np.isfinite(c_dense), lev, np.inf), "lo": lo, "hi": hi,
            "extrapolated": extra}


def _parameter_leverage_values(fit: ChinchillaFit, L: np.ndarray, D: np.ndarray, N: np.ndarray,
                               confidence: float) -> dict[str, np.ndarray]:
    out = parameter_leverage(fit, L, D, N, confidence=confidence)
    n = len(L)
    as_arr = (lambda v, dt=float: np.broadcast_to(np.asarray(v, dtype=dt), (n,)).copy())
    lev_iv = out["leverage_interval"] or (np.full(n, np.nan), np.full(n, np.nan))
    d_lo, d_hi = fit.d_range
    d_out = (D < d_lo) | (D > d_hi)
    return {"leverage": as_arr(out["leverage"]), "n_equivalent": as_arr(out["n_equivalent"]),
            "lo": as_arr(lev_iv[0]), "hi": as_arr(lev_iv[1]), "reachable": as_arr(out["reachable"], bool),
            "extrapolated": as_arr(out["extrapolated"], bool) | d_out, "d_outside": d_out}


def _leverage(a: Analysis) -> None:
    t = a.trials
    for col in ("parameter_leverage", "parameter_leverage_lo", "parameter_leverage_hi", "n_equivalent",
                "compute_leverage", "compute_leverage_lo", "compute_leverage_hi", "c_dense"):
        t[col] = np.nan
    t["parameter_extrapolated"] = pd.Series([None] * len(t), dtype=object)
    t["compute_extrapolated"] = pd.Series([None] * len(t), dtype=object)
    moe_mask = t["usable"] & (t["family"] == "moe")
    moe = t[moe_mask]
    dense_law = a.power_laws.get("dense")
    if not len(moe):
        if (t["family"] == "moe").any():
            a.skip("leverage", "no usable MoE trials (all diverged, failed or without a finite loss)")
        else:
            a.notes.append("no MoE trials: no leverage to compute")
        return
    if a.dense_fit is None:
        a.skip("parameter leverage", "no dense Chinchilla fit (see above)", "moe", "parameter_leverage")
    if dense_law is None:
        a.skip("compute leverage", "no dense compute law (see above)", "moe", "compute_leverage")
    idx = moe.index
    L, D, N, C = (moe[c].to_numpy(float) for c in ("L", "D", "N", "C"))
    if a.dense_fit is not None:
        p = _parameter_leverage_values(a.dense_fit, L, D, N, a.confidence)
        t.loc[idx, "parameter_leverage"] = p["leverage"]
        t.loc[idx, "parameter_leverage_lo"], t.loc[idx, "parameter_leverage_hi"] = p["lo"], p["hi"]
        t.loc[idx, "n_equivalent"] = p["n_equivalent"]
        t.loc[idx, "parameter_extrapolated"] = list(p["extrapolated"])
    if dense_law is not None:
        c = _compute_leverage_values(dense_law, L, C, a.confidence)
        t.loc[idx, "compute_leverage"] = c["leverage"]
        t.loc[idx, "compute_leverage_lo"], t.loc[idx, "compute_leverage_hi"] = c["lo"], c["hi"]
        t.loc[idx, "c_dense"] = c["c_dense"]
        t.loc[idx, "compute_extrapolated"] = list(c["extrapolated"])

    # per-trial rows
    for i, row in t.loc[idx].iterrows():
        common = dict(family=row["group"], trial_id=str(row["trial_id"]), n_points=1)
        inputs = {"loss": row["L"], "tokens": row["D"], "flops": row["C"], "n_active": row["N"],
                  "seed": row["seed"]}
        if a.dense_fit is not None:
            a.records.append(FitRecord(
                law="parameter_leverage", leverage=row["parameter_leverage"],
                leverage_lo=row["parameter_leverage_lo"], leverage_hi=row["parameter_leverage_hi"],
                extrapolated=bool(row["parameter_extrapolated"]),
                parameters={**inputs, "n_equivalent": row["n_equivalent"],
                            "reachable": bool(np.isfinite(row["n_equivalent"]))},
                intervals=None if a.n_boot == 0 else
                {"leverage": [row["parameter_leverage_lo"], row["parameter_leverage_hi"]]}, **common))
        if dense_law is not None:
            a.records.append(FitRecord(
                law="compute_leverage", leverage=row["compute_leverage"],
                leverage_lo=row["compute_leverage_lo"], leverage_hi=row["compute_leverage_hi"],
                extrapolated=bool(row["compute_extrapolated"]),
                parameters={**inputs, "c_dense": row["c_dense"], "reachable": bool(np.isfinite(row["c_dense"]))},
                intervals=None if a.n_boot == 0 else
                {"leverage": [row["compute_leverage_lo"], row["compute_leverage_hi"]]}, **common))

    # per-family: at the family's mean final loss / tokens / size / compute over its usable trials
    fam = moe.groupby("group", sort=True).agg(n_trials=("trial_id", "size"), L=("L", "mean"), D=("D", "mean"),
                                              N=("N", "mean"), C=("C", "mean"), L_std=("L", "std"))
    fam = fam.loc[[g for g in _group_order(a) if g in fam.index]].reset_index()
    L, D, N, C = (fam[c].to_numpy(float) for c in ("L", "D", "N", "C"))
    for col in ("parameter_leverage", "parameter_leverage_lo", "parameter_leverage_hi", "n_equivalent",
                "compute_leverage", "compute_leverage_lo", "compute_leverage_hi", "c_dense"):
        fam[col] = np.nan
    fam["parameter_extrapolated"] = None
    fam["compute_extrapolated"] = None
    if a.dense_fit is not None:
        p = _parameter_leverage_values(a.dense_fit, L, D, N, a.confidence)
        fam["parameter_leverage"], fam["n_equivalent"] = p["leverage"], p["n_equivalent"]
        fam["parameter_leverage_lo"], fam["parameter_leverage_hi"] = p["lo"], p["hi"]
        fam["parameter_extrapolated"] = list(p["extrapolated"])
    if dense_law is not None:
        c = _compute_leverage_values(dense_law, L, C, a.confidence)
        fam["compute_leverage"], fam["c_dense"] = c["leverage"], c["c_dense"]
        fam["compute_leverage_lo"], fam["compute_leverage_hi"] = c["lo"], c["hi"]
        fam["compute_extrapolated"] = list(c["extrapolated"])
    a.family_leverage = fam
    for _, row in fam.iterrows():
        inputs = {"loss": row["L"], "loss_std": row["L_std"], "tokens": row["D"], "flops": row["C"],
                  "n_active": row["N"], "n_trials": int(row["n_trials"]), "at": "mean over the family's trials"}
        for kind, extra_key in (("parameter", "n_equivalent"), ("compute", "c_dense")):
            if row[f"{kind}_extrapolated"] is None:
                continue
            a.records.append(FitRecord(
                family=row["group"], law=f"{kind}_leverage", leverage=row[f"{kind}_leverage"],
                leverage_lo=row[f"{kind}_leverage_lo"], leverage_hi=row[f"{kind}_leverage_hi"],
                extrapolated=bool(row[f"{kind}_extrapolated"]), n_points=int(row["n_trials"]),
                parameters={**inputs, extra_key: row[extra_key]},
                intervals=None if a.n_boot == 0 else
                {"leverage": [row[f"{kind}_leverage_lo"], row[f"{kind}_leverage_hi"]]}))
    n_extra = int(sum(bool(v) for col in ("parameter_extrapolated", "compute_extrapolated")
                      for v in t.loc[idx, col] if v is not None))
    if n_extra:
        a.notes.append(f"{n_extra} per-trial leverage value(s) are extrapolated beyond the dense fits' range "
                       f"(marked *)")


def _fit_granularity(a: Analysis, cp: pd.DataFrame, moe: pd.DataFrame) -> None:
    what = "granularity law (Krajewski et al. eq. 9)"
    if not len(moe):
        a.notes.append(f"{what}: not fitted (no usable MoE trials)")
        return
    values = sorted(moe["G"].dropna().unique())
    if len(values) < 2:
        shown = ", ".join(_fmt(v) for v in values) or "unknown"
        a.notes.append(f"{what}: not fitted, the sweep does not vary model.moe.granularity "
                       f"(all MoE trials have G = {shown})")
        return
    pts = cp[(cp["family"] == "moe")].dropna(subset=["G", "N_total"])
    try:
        fit = fit_granularity(pts["N_total"].to_numpy(float), pts["D"].to_numpy(float), pts["G"].to_numpy(float),
                              pts["L"].to_numpy(float))
    except ValueError as e:
        a.skip(what, str(e), "moe", "granularity")
        return
    a.granularity = fit
    d = fit.to_dict()
    d.pop("law", None)
    d.pop("n_points", None)
    d.update(n="params_non_embedding (total)", loss=a.loss)
    a.records.append(FitRecord(family="moe", law="granularity", parameters=d, n_points=fit.n_points))


def _effects_all(a: Analysis) -> None:
    t = a.trials
    metrics = [("L", f"final {a.loss}"), ("parameter_leverage", "parameter leverage"),
               ("compute_leverage", "compute leverage")]
    if not a.axes:
        a.notes.append("per-axis effects: the trials have no axis values (axis_values is empty)")
        return
    use = t[t["usable"]]
    for axis in a.axes:
        frame = use[use[axis].notna()]
        a.effects[axis] = {}
        for col, name in metrics:
            if col not in frame or not np.isfinite(frame[col].astype(float)).any():
                continue
            sub = pd.DataFrame({axis: frame[axis].to_numpy(), "seed": frame["seed"].to_numpy(),
                                name: frame[col].astype(float).to_numpy()})
            try:
                a.effects[axis][name] = _effects(sub, axis, name, confidence=a.confidence)
            except ValueError as e:
                a.skip(f"effects of {axis} on {name}", str(e))
        if not a.effects[axis]:
            a.skip(f"effects of {axis}", "no usable trials carry this axis")
            del a.effects[axis]
            continue
        others = [x for x in a.axes if x != axis and x in frame]
        if others:  # marginal effects: other axes' values must be equally represented under every value
            combos = frame[others].map(str).agg("|".join, axis=1)  # map, not astype: keeps NaN -> "nan"
            counts = pd.crosstab(frame[axis].astype(str), combos)
            if len(np.unique(counts.to_numpy())) > 1:
                a.notes.append(f"axis {axis}: its effects pool the other axes' values, and these are unbalanced "
                               f"across its values (missing, diverged or failed trials): read them with care")
        elif next(iter(a.effects[axis].values())).shape[0] < 2:
            a.notes.append(f"axis {axis}: only one value among the usable trials, no contrast")


# ----------------------------------------------------------------------------------------------------------
# The fits table


def _records_table(records: list[FitRecord], points: str, n_boot: int, confidence: float) -> pa.Table:
    now = datetime.now(timezone.utc)

    def f(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    cols: dict[str, list] = {name: [] for name in FITS_SCHEMA.names}
    for r in records:
        cols["family"].append(r.family)
        cols["law"].append(r.law)
        cols["trial_id"].append(r.trial_id)
        cols["status"].append(r.status)
        cols["parameters"].append(None if r.parameters is None else json.dumps(_jsonable(r.parameters)))
        cols["intervals"].append(None if r.intervals is None else json.dumps(_jsonable(r.intervals)))
        cols["leverage"].append(f(r.leverage))
        cols["leverage_lo"].append(f(r.leverage_lo))
        cols["leverage_hi"].append(f(r.leverage_hi))
        cols["extrapolated"].append(r.extrapolated)
        cols["n_points"].append(r.n_points)
        cols["points"].append(points)
        cols["n_boot"].append(int(n_boot))
        cols["confidence"].append(float(confidence))
        cols["message"].append(r.message)
        cols["created_at"].append(now)
    return pa.table({k: pa.array(v, FITS_SCHEMA.field(k).type) for k, v in cols.items()}, schema=FITS_SCHEMA)


def _put_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Whole file or nothing, as moelab.platform.store does: locally a hidden `.tmp-*` file in the same
    directory renamed over the target; on an object store a single PUT (atomic by itself)."""
    directory, name = path.rsplit("/", 1)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
    else:
        pq.write_table(table, path, filesystem=fs)


def write_fits(root: str | os.PathLike, analysis: Analysis, *,
               filesystem: pafs.FileSystem | None = None) -> str | None:
    """Write `analysis`'s rows to ROOT/fits/sweep=S/fits.parquet (replacing an earlier run's); returns the
    path, or None when there is no sweep to file them under (an empty store)."""
    if analysis.sweep is None:
        return None
    if not NAME_RE.match(analysis.sweep):
        raise ValueError(f"sweep label {analysis.sweep!r} is not a valid partition name")
    fs, base = resolve_root(root, filesystem)
    path = f"{partition_dir(base, 'fits', analysis.sweep)}/fits.parquet"
    _put_atomic(fs, path, _records_table(analysis.records, analysis.points, analysis.n_boot, analysis.confidence))
    return path


def read_fits(root: str | os.PathLike, sweep: str | Sequence[str] | None = None, *,
              filesystem: pafs.FileSystem | None = None) -> pd.DataFrame:
    """The `fits` table (all sweeps, or some) with its `sweep` column; an empty frame with the columns when
    none was written. `parameters` and `intervals` are JSON strings (json.loads, or DuckDB's ->> operators)."""
    fs, base = resolve_root(root, filesystem)
    sweeps = None if sweep is None else ([sweep] if isinstance(sweep, str) else list(sweep))
    files = list_files(fs, base, "fits", sweeps)
    schema = pa.schema([*FITS_SCHEMA, pa.field("sweep", pa.string())])
    if not files:
        return schema.empty_table().select(["sweep", *FITS_SCHEMA.names]).to_pandas()
    part = ds.partitioning(pa.schema([pa.field("sweep", pa.string())]), flavor="hive")
    data = ds.dataset(files, schema=schema, format="parquet", filesystem=fs, partitioning=part,
                      partition_base_dir=f"{base}/fits")
    t = data.to_table()
    return t.select(["sweep", *FITS_SCHEMA.names]).to_pandas()


# ----------------------------------------------------------------------------------------------------------
# Text summary


def summary_text(a: Analysis, *, notes: bool = True) -> str:
    """A short plain-text summary for the terminal (notes and skipped fits last, unless notes=False)."""
    t = a.trials
    lines = []
    n = len(t)
    head = f"moelab fit: sweep {a.sweep!r}" if a.sweep else f"moelab fit: {a.root}"
    if n:
        fam = t["family"].value_counts()
        usable = int(t["usable"].sum())
        head += (f": {n} trials ({int(fam.get('dense', 0))} dense, {int(fam.get('moe', 0))} MoE), {usable} usable; "
                 f"points={a.points}, loss={a.loss}, N={a.n_column}, n_boot={a.n_boot}")
    lines.append(head)
    pct = f"{a.confidence:.0%}"
    if a.dense_fit is not None:
        f = a.dense_fit
        iv = f.intervals or {}
        parts = [f"{k}={_fmt(getattr(f, k))}{_interval_text(*iv.get(k, (None, None)))}"
                 for k in ("E", "A", "B", "alpha", "beta")]
        lines.append(f"dense L(N,D) = E + A/N^alpha + B/D^beta ({f.n_points} points, {pct} CI): " + ", ".join(parts))
    for g, f in a.power_laws.items():
        iv = f.intervals or {}
        form = f"E + A C^-alpha: E={_fmt(f.E)}, " if f.with_offset else "A C^-alpha: "
        lines.append(f"L(C) {g} = {form}A={_fmt(f.A)}, alpha={_fmt(f.alpha)}"
                     f"{_interval_text(*iv.get('alpha', (None, None)))} ({f.n_points} points)")
    fl = a.family_leverage
    if fl is not None and len(fl):
        lines.append(f"leverage over dense per MoE family ({pct} CI from the dense fits' bootstrap; * = extrapolated):")
        width = max(len(str(g)) for g in fl["group"])
        for _, row in fl.iterrows():
            cells = []
            for kind in ("parameter", "compute"):
                if row[f"{kind}_extrapolated"] is None:
                    cells.append(f"{kind} -")
                    continue
                star = "*" if row[f"{kind}_extrapolated"] else ""
                cells.append(f"{kind} {_fmt(row[f'{kind}_leverage'])}{star}"
                             f"{_interval_text(row[f'{kind}_leverage_lo'], row[f'{kind}_leverage_hi'])}")
            lines.append(f"  {str(row['group']).ljust(width)}  " + "   ".join(cells) + f"   (n={int(row['n_trials'])})")
    if a.granularity is not None:
        g = a.granularity
        lines.append(f"granularity law: c={_fmt(g.c)}, g={_fmt(g.g)}, gamma={_fmt(g.gamma)}, a={_fmt(g.a)}, "
                     f"alpha={_fmt(g.alpha)}, b={_fmt(g.b)}, beta={_fmt(g.beta)} ({g.n_points} points)")
    for axis, per_metric in a.effects.items():
        for metric, eff in per_metric.items():
            if metric.startswith("compute"):
                continue  # keep the terminal short: loss and parameter leverage
            base = eff.index[eff["is_baseline"]][0]
            cells = []
            for value, row in eff.iterrows():
                if row["is_baseline"]:
                    continue
                cells.append(f"{_fmt(value)}: {row['diff']:+.3g}{_interval_text(row['diff_lo'], row['diff_hi'])} "
                             f"(n={int(row['n'])})")
            detail = "; ".join(cells) if cells else "one value only"
            lines.append(f"effect of {axis} on {metric} vs {_fmt(base)} (mean {_fmt(eff.loc[base, 'mean'])}): {detail}")
    if notes:
        for note in a.notes:
            lines.append(f"note: {note}")
        for what, why in a.skipped:
            lines.append(f"skipped: {what}: {why}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# HTML report

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]


def _rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    return f"rgba({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{alpha})"


def _group_colors(a: Analysis) -> dict[str, str]:
    return {g: _COLORS[i % len(_COLORS)] for i, g in enumerate(_group_order(a))}


def _band(boot: np.ndarray | None, predict, x: np.ndarray, confidence: float):
    if boot is None or not len(boot):
        return None
    curves = np.stack([predict(p, x) for p in boot])
    tail = (1 - confidence) / 2
    with np.errstate(invalid="ignore"):
        return np.nanquantile(curves, tail, axis=0), np.nanquantile(curves, 1 - tail, axis=0)


def _fig_compute(a: Analysis, go: Any) -> Any | None:
    if not a.power_laws and (a.curve_points is None or a.curve_points.empty):
        return None
    colors = _group_colors(a)
    fig = go.Figure()
    t = a.trials
    use = t[t["usable"]] if len(t) else t
    for g, color in colors.items():
        front = a.law_points.get(g)
        if front is not None and len(front) and a.points == "curve":
            fig.add_trace(go.Scatter(x=front["C"], y=front["L"], mode="markers", name=f"{g}: frontier points",
                                     legendgroup=g, marker=dict(color=color, size=5, opacity=0.45)))
        fin = use[use["group"] == g] if len(use) else use
        if len(fin):
            fig.add_trace(go.Scatter(x=fin["C"], y=fin["L"], mode="markers", name=f"{g}: final points",
                                     legendgroup=g, text=fin["trial_id"],
                                     marker=dict(color=color, size=9, symbol="diamond" if g == "dense" else "circle",
                                                 line=dict(width=1, color="white"))))
        fit = a.power_laws.get(g)
        if fit is None:
            continue
        lo, hi = fit.c_range
        x = np.geomspace(lo, hi, 120)
        band = _band(fit.boot_params, lambda p, c: p[0] + p[1] * np.power(c, -p[2]), x, a.confidence)
        if band is not None:
            fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[band[1], band[0][::-1]], fill="toself",
                                     fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip",
                                     name=f"{g}: {a.confidence:.0%} band", legendgroup=g, showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=fit.predict(x), mode="lines", legendgroup=g, line=dict(color=color, width=2),
                                 name=f"{g}: L = {fit.E:.3g} + {fit.A:.3g} C^-{fit.alpha:.3g}"))
    fig.update_layout(title="Loss vs training compute, fitted L(C) per family (bands: bootstrap)",
                      xaxis=dict(type="log", title="training FLOPs C"), yaxis=dict(title=a.loss),
                      template="plotly_white", height=520, legend=dict(font=dict(size=10)))
    return fig


def _fig_dense(a: Analysis, go: Any) -> Any | None:
    fit, pts = a.dense_fit, a.dense_points
    if fit is None or pts is None or pts.empty:
        return None
    fig = go.Figure()
    sizes = sorted(pts["N"].unique())
    for i, n in enumerate(sizes):
        color = _COLORS[i % len(_COLORS)]
        p = pts[pts["N"] == n]
        fig.add_trace(go.Scatter(x=p["D"], y=p["L"], mode="markers", name=f"N={n:.3g}", legendgroup=str(n),
                                 marker=dict(color=color, size=6)))
        x = np.geomspace(*fit.d_range, 100)
        band = _band(fit.boot_params, lambda q, d: q[0] + q[1] / n ** q[3] + q[2] / np.power(d, q[4]), x,
                     a.confidence)
        if band is not None:
            fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[band[1], band[0][::-1]], fill="toself",
                                     fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=str(n)))
        fig.add_trace(go.Scatter(x=x, y=fit.predict(n, x), mode="lines", line=dict(color=color),
                                 name=f"fit N={n:.3g}", legendgroup=str(n), showlegend=False))
    fig.update_layout(title=f"Dense Chinchilla fit: L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3g} + "
                            f"{fit.B:.3g}/D^{fit.beta:.3g}",
                      xaxis=dict(type="log", title="tokens D"), yaxis=dict(title=a.loss), template="plotly_white",
                      height=450)
    return fig


def _fig_leverage(a: Analysis, go: Any, make_subplots: Any) -> Any | None:
    fl = a.family_leverage
    if fl is None or not len(fl):
        return None
    kinds = [k for k in ("parameter", "compute") if fl[f"{k}_extrapolated"].notna().any()]
    if not kinds:
        return None
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[
        {"parameter": "parameter leverage N_dense(L, D) / N_active",
         "compute": "compute leverage C_dense(L) / C"}[k] for k in kinds])
    t = a.trials
    moe = t[t["usable"] & (t["family"] == "moe")]
    colors = _group_colors(a)
    for col, kind in enumerate(kinds, start=1):
        for _, row in fl.iterrows():
            g = row["group"]
            val = row[f"{kind}_leverage"]
            if not np.isfinite(val):
                continue
            lo, hi = row[f"{kind}_leverage_lo"], row[f"{kind}_leverage_hi"]
            err = None
            if np.isfinite(lo) and np.isfinite(hi):
                err = dict(type="data", symmetric=False, array=[hi - val], arrayminus=[val - lo])
            extra = bool(row[f"{kind}_extrapolated"])
            fig.add_trace(go.Scatter(
                x=[g], y=[val], error_y=err, mode="markers", legendgroup=g, showlegend=col == 1,
                name=g + (" (extrapolated)" if extra else ""),
                marker=dict(size=13, color=colors.get(g), symbol="diamond-open" if extra else "diamond")),
                row=1, col=col)
            trials = moe[moe["group"] == g]
            vals = trials[f"{kind}_leverage"].astype(float)
            ok = np.isfinite(vals)
            if ok.any():
                ex = trials[f"{kind}_extrapolated"].fillna(False).astype(bool)[ok]
                fig.add_trace(go.Scatter(
                    x=[g] * int(ok.sum()), y=vals[ok], mode="markers", legendgroup=g, showlegend=False,
                    text=trials["trial_id"][ok], name=f"{g} trials",
                    marker=dict(size=6, color=colors.get(g), opacity=0.6,
                                symbol=["x" if e else "circle" for e in ex])), row=1, col=col)
        fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"), row=1, col=col)
    fig.update_layout(title=f"Leverage over dense per MoE family (diamond: family at its mean loss, "
                            f"{a.confidence:.0%} CI from the dense bootstrap; dots: trials; open/x: extrapolated)",
                      template="plotly_white", height=480, legend=dict(font=dict(size=10)))
    fig.update_xaxes(tickangle=20, tickfont=dict(size=9))
    return fig


def _fig_effects(a: Analysis, go: Any, make_subplots: Any) -> Any | None:
    if not a.effects:
        return None
    axes = list(a.effects)
    metrics = []
    for per in a.effects.values():
        for m in per:
            if m not in metrics:
                metrics.append(m)
    fig = make_subplots(rows=len(metrics), cols=len(axes), shared_xaxes=False,
                        subplot_titles=[f"{ax}: {m}" for m in metrics for ax in axes])
    for i, m in enumerate(metrics, start=1):
        for j, ax in enumerate(axes, start=1):
            eff = a.effects[ax].get(m)
            if eff is None:
                continue
            x = [_fmt(v) for v in eff.index]
            base = eff["is_baseline"].to_numpy()
            lo = (eff["diff"] - eff["diff_lo"]).to_numpy(float)
            hi = (eff["diff_hi"] - eff["diff"]).to_numpy(float)
            fig.add_trace(go.Scatter(
                x=x, y=eff["diff"], mode="markers", showlegend=False, name=f"{ax} / {m}",
                error_y=dict(type="data", symmetric=False, array=np.nan_to_num(hi), arrayminus=np.nan_to_num(lo)),
                text=[f"n={int(k)}, mean={_fmt(v)}" for k, v in zip(eff["n"], eff["mean"])],
                marker=dict(size=10, color=["grey" if b else _COLORS[0] for b in base],
                            symbol=["square" if b else "circle" for b in base])), row=i, col=j)
            fig.add_hline(y=0.0, line=dict(dash="dot", color="grey"), row=i, col=j)
    fig.update_layout(title=f"Per-axis effects: difference to the baseline value (grey square), "
                            f"{a.confidence:.0%} Welch interval over seeds",
                      template="plotly_white", height=300 * len(metrics) + 80)
    fig.update_annotations(font_size=11)
    return fig


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="tbl", na_rep="-", float_format=lambda v: _fmt(v, 4),
                      escape=True)


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 12px; }
.msg { background: #fff8e1; border-left: 4px solid #f0ad4e; padding: 8px 12px; margin: 8px 0; }
.skip { background: #fdecea; border-left: 4px solid #d9534f; padding: 8px 12px; margin: 8px 0; }
table.tbl { border-collapse: collapse; font-size: 12px; } table.tbl td, table.tbl th { padding: 3px 8px;
       border-bottom: 1px solid #eee; text-align: left; }
"""


def write_report(a: Analysis, path: str | os.PathLike) -> str:
    """Write one self-contained HTML file (plotly.js inlined, no network needed) and return its path.

    Figures: loss vs compute with the fitted L(C) and bootstrap bands per family, the dense Chinchilla fit,
    leverage per MoE family, per-axis effects with intervals; then the summary, notes, skipped fits and the
    fits table. Without plotly installed the report has the text and tables and says how to get figures.
    """
    path = os.fspath(path)
    sections: list[str] = []
    title = f"moelab fit — {a.sweep or a.root}"
    sections.append(f"<h1>{html.escape(title)}</h1>")
    sections.append(f"<pre>{html.escape(summary_text(a, notes=False))}</pre>")
    for what, why in a.skipped:
        sections.append(f'<div class="skip"><b>skipped</b> {html.escape(what)}: {html.escape(why)}</div>')
    for note in a.notes:
        sections.append(f'<div class="msg">{html.escape(note)}</div>')

    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        go = None
        sections.append('<div class="skip">figures need plotly: pip install "moelab[dashboard]" '
                        '(or pip install plotly) and run again</div>')
    if go is not None:
        figures = [
            ("Loss vs compute", _fig_compute(a, go), "no compute laws or points to show"),
            ("Dense scaling law", _fig_dense(a, go), "no dense Chinchilla fit (see skipped)"),
            ("Leverage per MoE family", _fig_leverage(a, go, make_subplots), "no leverage (see skipped/notes)"),
            ("Per-axis effects", _fig_effects(a, go, make_subplots), "no per-axis effects (see notes)"),
        ]
        js_done = False
        for name, fig, empty in figures:
            sections.append(f"<h2>{html.escape(name)}</h2>")
            if fig is None:
                sections.append(f'<div class="msg">{html.escape(empty)}</div>')
                continue
            div = fig.to_html(full_html=False, include_plotlyjs=not js_done, include_mathjax=False,
                              config={"displaylogo": False, "responsive": True})
            js_done = True
            sections.append(f'<div class="figure" data-figure="{html.escape(name)}">{div}</div>')

    if a.family_leverage is not None and len(a.family_leverage):
        sections.append("<h2>Leverage per MoE family</h2>")
        sections.append(_table_html(a.family_leverage))
    if a.effects:
        sections.append("<h2>Per-axis effects</h2>")
        for axis, per in a.effects.items():
            for metric, eff in per.items():
                sections.append(f"<h3>{html.escape(axis)} — {html.escape(metric)}</h3>")
                sections.append(_table_html(eff.reset_index()))
    fits = a.fits
    if len(fits):
        sections.append("<h2>fits table</h2>")
        sections.append(_table_html(fits))
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(doc)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Everything


def default_report_path(root: str | os.PathLike, label: str | None) -> str:
    """ROOT/reports/fit-LABEL.html for a local store, ./moelab-fit-LABEL.html for an object-store URI."""
    name = f"fit-{label or 'empty'}.html"
    root = os.fspath(root)
    if "://" in root:
        return os.path.abspath(f"moelab-{name}")
    return os.path.join(os.path.abspath(root), "reports", name)


def run_fit(root: str | os.PathLike, sweep: str | Sequence[str] | None = None,
            report_path: str | os.PathLike | None = None, **kwargs: Any) -> tuple[Analysis, str]:
    """analyse + write_fits + write_report; returns (analysis, report path). kwargs go to `analyse`
    (n_boot, points, loss, n_column, ...). Raises only for a missing root or an unknown sweep."""
    a = analyse(root, sweep, **kwargs)
    fits_path = write_fits(root, a)
    if fits_path is not None:
        a.notes.append(f"fits table: {fits_path} ({len(a.records)} rows)")
    out = os.fspath(report_path) if report_path is not None else default_report_path(root, a.sweep)
    a.notes.append(f"report: {out}")
    return a, write_report(a, out)
