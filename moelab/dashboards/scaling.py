"""What the Scaling & leverage view shows: the dense family's compute law L = E + A C^-alpha (from the
sweep's `fits` table, else fitted to its dense runs), each MoE run's compute leverage against it, and the
final (compute, loss) points. When `moelab fit` has written leverage rows, those are the numbers shown
(`fits_leverage`), never a second estimate; when it has written the joint efficiency-leverage law (Tian et al.
2025 Eq. 13), its surface over (A, G) at a budget (`el_surface`). Pure functions over DataFrames (no I/O)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import math

import numpy as np
import pandas as pd

from moelab.dashboards.trials import axis_frame, fmt_value, json_dict, short_key

__all__ = ["DenseLaw", "dense_law", "fits_law", "with_leverage", "fits_leverage", "with_fits_leverage",
           "scaling_points", "ELSurface", "el_row", "el_surface", "EL_FALLBACK_BUDGET"]


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
        params = json_dict(params) if not isinstance(params, dict) else params
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


def fits_leverage(fits: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The leverage `moelab fit` wrote (the report's numbers, not a refit): (per-trial compute leverage:
    trial_id, leverage, leverage_lo, leverage_hi, leverage_extrapolated; summary: one row per family figure,
    the efficiency leverage at each stated budget and the per-size geometric means). None without such rows."""
    need = {"scope", "law", "trial_id", "leverage", "leverage_lo", "leverage_hi", "extrapolated", "status"}
    if fits is None or not len(fits) or not need <= set(fits.columns):
        return None
    ok = fits[(fits["status"] == "ok") & (fits["law"] == "compute_leverage")]
    per = ok[ok["scope"] == "trial"]
    if per.empty:
        return None
    trial = pd.DataFrame({"trial_id": per["trial_id"].astype(str), "leverage": per["leverage"].astype(float),
                          "leverage_lo": per["leverage_lo"].astype(float),
                          "leverage_hi": per["leverage_hi"].astype(float),
                          "leverage_extrapolated": per["extrapolated"].fillna(False).astype(bool)})
    fam = fits[(fits["status"] == "ok") & fits["scope"].isin(["family", "size"])
               & fits["law"].isin(["compute_leverage", "parameter_leverage"])]
    cols = ["family", "scope", "law", "at_compute", "at_n", "at_tokens", "leverage", "leverage_lo", "leverage_hi",
            "extrapolated"]
    summary = fam[[c for c in cols if c in fam.columns]].sort_values(["family", "scope", "law"], kind="stable")
    return trial.reset_index(drop=True), summary.reset_index(drop=True)


def with_fits_leverage(trials: pd.DataFrame, per_trial: pd.DataFrame) -> pd.DataFrame:
    """`trials` plus the fits table's per-trial compute leverage (NaN for trials it has no row for)."""
    out = trials.drop(columns=[c for c in per_trial.columns if c != "trial_id" and c in trials.columns])
    out = out.merge(per_trial, on="trial_id", how="left")
    out["leverage_extrapolated"] = out["leverage_extrapolated"].fillna(False).astype(bool)
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
        lab = ax[color].reindex(pts["trial_id"]).map(fmt_value).to_numpy()
        pts["label"] = [f"{short_key(color, list(ax.columns))}={v}" for v in lab]
    elif color and color in t:
        pts["label"] = t[color].reindex(pts["trial_id"]).map(fmt_value).to_numpy()
    else:
        pts["label"] = "moe"
    dense = pts["family"] == "dense"
    names = t["name"].reindex(pts["trial_id"]).to_numpy() if "name" in t else np.array(["dense"] * len(pts))
    pts.loc[dense, "label"] = [f"dense {n}" if isinstance(n, str) else "dense" for n in names[dense.to_numpy()]]
    return pts


# ----------------------------------------------------------------------------------------------------------
# The efficiency-leverage law over (A, G)

# Only for a row that states no compute range (Table 2's constants come without one): the budget of the
# paper's worked example (EL 7.24 at A = 3.1%, G = 12), so the default lands where the constants were checked.
EL_FALLBACK_BUDGET = 1e22
# Axis spans for a row without a fit range: activation ratios from one active expert in 128 up to dense, and
# granularities 1 .. 64, which put Table 2's optimum 2^3.5 mid-plot.
_EL_DEFAULT_A = (2.0 ** -7, 1.0)
_EL_DEFAULT_G = (1.0, 64.0)


@dataclass
class ELSurface:
    """Eq. 13's EL over an (A, G) grid at one compute budget.

    A: (n_A,) activation ratios, log-spaced; G: (n_G,) the paper's granularity 2 d_model / d_expert,
    log2-spaced; EL: (n_G, n_A) with EL[i, j] = EL(A[j], G[i], budget) (rows follow G: a heatmap's z).
    budget: training FLOPs; default_budget: what `budget=None` gives. extrapolated: the budget lies outside
    the fitted compute range (None: the row states no compute range). G_opt: the G maximising EL (None when
    gamma <= 0: no interior optimum). params: the six constants; fit_range: the row's [min, max] of C, A, G,
    EL; n_points: points behind the fit (None: not stated)."""

    A: np.ndarray
    G: np.ndarray
    EL: np.ndarray
    budget: float
    default_budget: float
    extrapolated: bool | None
    G_opt: float | None
    params: dict[str, float]
    fit_range: dict[str, Any]
    n_points: int | None = None


def el_row(fits: pd.DataFrame | None) -> pd.Series | None:
    """The fits table's `efficiency_leverage` law row (`moelab fit`, scope "law", status ok), or None."""
    if fits is None or not len(fits) or not {"law", "scope", "parameters"} <= set(fits.columns):
        return None
    rows = fits[(fits["law"] == "efficiency_leverage") & (fits["scope"] == "law")]
    if "status" in rows:
        rows = rows[rows["status"].fillna("ok") == "ok"]
    return rows.iloc[0] if len(rows) else None


def _pair(value: Any) -> tuple[float, float] | None:
    """A fit range's [min, max] as two finite positive floats lo <= hi, else None."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi else None


def _span(value: Any, default: tuple[float, float]) -> tuple[float, float]:
    """The grid's extent for a fit range's [min, max] (`default` when there is none). A single value is
    widened by 2x each way so that the grid still has an extent to draw."""
    pair = _pair(value)
    if pair is None:
        return default
    lo, hi = pair
    return (lo / 2, hi * 2) if lo == hi else (lo, hi)


def el_surface(fits: pd.DataFrame | None, budget: float | None = None, n_A: int = 48,
               n_G: int = 48) -> ELSurface | None:
    """EL(A, G) at compute `budget` from the sweep's `efficiency_leverage` law row (None when the fits table
    has none).

    The grid spans the fit range's A (log-spaced, capped at 1) and G (log2-spaced); without a fit range,
    A in [2^-7, 1] and G in [1, 64]. budget: training FLOPs; None = the geometric middle of the fitted
    compute range (EL_FALLBACK_BUDGET when the row states none). Returns an ELSurface: A (n_A,), G (n_G,),
    EL (n_G, n_A). ValueError naming `budget` unless it is a finite positive number, or naming what the row
    lacks (moelab.ablations.el_law.law_from_row)."""
    from moelab.ablations.el_law import efficiency_leverage, law_from_row, optimal_granularity

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float, np.number))
                               or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"budget: got {budget!r}; allowed: a finite positive number of training FLOPs")
    row = el_row(fits)
    if row is None:
        return None
    if not isinstance(row["parameters"], (str, dict)):
        raise ValueError("the efficiency_leverage row has no parameters")
    params, _, fit_range = law_from_row(row["parameters"])
    c_range = _pair(fit_range.get("C"))
    default_budget = math.sqrt(c_range[0] * c_range[1]) if c_range else EL_FALLBACK_BUDGET
    C = default_budget if budget is None else float(budget)
    a_lo, a_hi = _span(fit_range.get("A"), _EL_DEFAULT_A)
    a_hi = min(a_hi, 1.0)  # an activation ratio; Eq. 13 is undefined above 1
    if a_lo >= a_hi:
        a_lo = a_hi / 2
    g_lo, g_hi = _span(fit_range.get("G"), _EL_DEFAULT_G)
    A = np.geomspace(a_lo, a_hi, n_A)
    G = np.power(2.0, np.linspace(math.log2(g_lo), math.log2(g_hi), n_G))
    EL = efficiency_leverage(A[None, :], G[:, None], C, params)
    try:
        g_opt: float | None = float(optimal_granularity(params))
    except ValueError:
        g_opt = None
    n = row.get("n_points")
    return ELSurface(A=A, G=G, EL=np.asarray(EL, dtype=float), budget=C, default_budget=default_budget,
                     extrapolated=(not c_range[0] <= C <= c_range[1]) if c_range else None, G_opt=g_opt,
                     params=params, fit_range=fit_range, n_points=None if n is None or pd.isna(n) else int(n))
