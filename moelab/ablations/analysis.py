"""`moelab fit`'s analysis: scaling laws, leverage and per-axis effects of the trials in a results store.

    from moelab.ablations.analysis import analyse
    a = analyse("results/", sweep="noise")      # an Analysis: frames and fits, nothing written

What is fitted (laws in `fits`, leverage in `leverage`, effects in `effects`; the text and HTML live in
`report`):

* the dense Chinchilla law ``L(N, D) = E + A/N^alpha + B/D^beta`` over the dense trials (N the active
  non-embedding parameters, ``n_column``; D tokens; L the final eval loss), bootstrap over whole trials;
* the same law for every MoE family that ran at >= 2 sizes and >= 2 budgets (a family is a design: the MoE
  trials that share every non-scale axis value);
* the compute-optimal frontier of each law in closed form (`fits.frontier_params`: ``E + K C^-a``, FLOPs per
  token fitted to the family's own trials), so no power law without an offset is ever fitted to a frontier;
* leverage (`leverage`): per trial, per size (geometric mean over seeds) and per family at stated compute
  budgets inside its data; every interval carries the dense bootstrap *and* the MoE runs' seed noise;
* the granularity law (Krajewski et al. 2024, eq. 9) when the MoE trials have >= 3 granularities
  G = d_ff / d_expert (from the config: presets that set d_expert directly count);
* per-axis effects paired by seed (`effects`), Holm-corrected across all contrasts of one metric.

Points. ``points="final"`` uses one point per trial, as Hoffmann et al. do; a sweep whose dense baselines
share one token budget cannot separate A/N^alpha from B/D^beta that way, so ``points="auto"`` then falls
back to ``"curve"`` (each trial's logged evaluations from ``curve_min_frac`` of its tokens on, at most
``max_curve_points`` per trial) and says so. Curve points of one trial are resampled together.

Nothing here raises on a degenerate store: a fit that cannot be made is recorded as skipped with the
reason (``Analysis.skipped``, the fits table, the summary). Only a missing root and an unknown sweep raise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from moelab import results as _results
from moelab.ablations.effects import MIN_SEEDS, effects as _effects, holm
from moelab.ablations.el_law import ELFit, el_law_rows, fit_efficiency_leverage
from moelab.ablations.fits import ChinchillaFit, FlopsPerToken, GranularityFit, fit_chinchilla, fit_granularity, \
    frontier_params
from moelab.ablations.leverage import NO_NOISE, SeedNoise, cell_leverage, family_leverage, interval, seed_noise, \
    trial_leverage

__all__ = ["Analysis", "SCALE_AXES", "analyse", "analyse_trials", "data_floor", "fit_rows", "group_order",
           "BUDGET_QUANTILES"]

# Axes that change a model's size or budget rather than its design: they do not split MoE families (a family
# is a design seen at several sizes), but they still get per-axis effects.
SCALE_AXES = ("preset", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim",
              "model.d_ff", "model.moe.d_expert", "train.steps", "train.max_tokens", "train.batch_size",
              "train.seq_len")
SEED_AXES = ("seed", "train.seed", "upcycle.seed", "data.seed")
# Family efficiency leverage is stated at these quantiles of the family's log-compute range (the middle one is
# the headline): inside the data, where both laws were measured.
BUDGET_QUANTILES = (0.25, 0.5, 0.75)
_LOSS_FINAL = {"eval_loss": "final_eval_loss", "loss": "final_loss"}
_POINT_COLS = ["trial_id", "group", "family", "seed", "N", "N_total", "G", "D", "C", "L"]


@dataclass
class Analysis:
    """Everything `analyse` found. Frames are pandas; fits are `moelab.ablations.fits` objects.

    trials: one row per trial read, with group (family label), usable, excluded (reason), N, N_total, D, C, L,
      G, axis columns, and for MoE trials parameter_leverage(_lo/_hi), n_equivalent, parameter_extrapolated,
      compute_leverage(_lo/_hi), c_dense, compute_extrapolated, leverage_note.
    dense_points: points of the dense fit. family_fits / fpt: Chinchilla fit and FLOPs-per-token law per
      group ("dense" included). size_leverage: one row per (family, N, D) cell. family_leverage: one row per
      (family, budget). effects: axis -> metric -> effects frame (with p_holm). data_floor: the synthetic
      source's Bayes-optimal loss when every usable trial trained on the same one (`data_floor`), to read the
      dense law's E against.
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
    family_fits: dict[str, ChinchillaFit] = field(default_factory=dict)
    fpt: dict[str, FlopsPerToken] = field(default_factory=dict)
    noise: dict[str, SeedNoise] = field(default_factory=dict)
    size_leverage: pd.DataFrame | None = None
    family_leverage: pd.DataFrame | None = None
    granularity: GranularityFit | None = None
    el_law: ELFit | None = None
    data_floor: dict[str, Any] | None = None
    effects: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_fits: list[tuple[str, str, str]] = field(default_factory=list)  # (family, law, message) rows

    @property
    def dense_fit(self) -> ChinchillaFit | None:
        return self.family_fits.get("dense")

    def skip(self, what: str, why: str, family: str | None = None, law: str | None = None) -> None:
        self.skipped.append((what, why))
        if family is not None and law is not None:
            self.skipped_fits.append((family, law, f"{what}: {why}"))

    @property
    def fits(self) -> pd.DataFrame:
        """The rows `write_fits` writes (see `fit_rows`), as a DataFrame."""
        return pd.DataFrame(fit_rows(self))


# ----------------------------------------------------------------------------------------------------------
# Reading the trials


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    """Column as float (NaN where missing or not numeric)."""
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (float, np.floating)) and math.isfinite(v):
        return f"{v:.{digits}g}"
    return str(v)


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


def _axis_value(axis: str, row: dict[str, Any]) -> Any:
    """A trial's value on `axis`; None when the trial does not carry the axis (a dense baseline). A null the
    sweep gave explicitly is a value of its own (`upcycle_from: [null, ladder-2]` -> "scratch"), not missing."""
    if axis not in row:
        return None
    value = row[axis]
    if value is None:
        return "scratch" if axis == "upcycle_from" else "none"
    return value


def granularity(t: pd.DataFrame) -> pd.Series:
    """G = d_ff / d_expert from the flattened config (d_expert 0 means d_ff / model.moe.granularity), so a
    config that sets d_expert directly (moe-1b: 5504 / 1024) is not recorded as G = 1. NaN for dense trials."""
    d_ff, d_exp, gran = _num(t, "model.d_ff"), _num(t, "model.moe.d_expert"), _num(t, "model.moe.granularity")
    width = d_exp.where(d_exp > 0, np.floor(d_ff / gran.where(gran > 0)))
    G = d_ff / width
    G = G.where(np.isfinite(G), gran)  # stores from before the config columns: the granularity knob
    if "family" in t:
        G = G.where(t["family"] == "moe")
    return G


def _prepare_trials(raw: pd.DataFrame, loss: str, n_column: str) -> tuple[pd.DataFrame, list[str]]:
    """Trials with the analysis columns (see Analysis.trials) and the sweep's axes."""
    t = raw.copy().reset_index(drop=True)
    for col, default in (("family", None), ("status", "finished"), ("seed", np.nan)):
        if col not in t.columns:
            t[col] = default
    total, active, non_emb = _num(t, "params_total"), _num(t, "params_active"), _num(t, "params_non_embedding")
    t["N_total"] = non_emb  # total non-embedding parameters (the granularity law's N)
    t["N"] = active - (total - non_emb) if n_column == "active_non_embedding" else _num(t, n_column)
    t["D"], t["C"] = _num(t, "final_tokens"), _num(t, "final_flops")
    _add_source_cost(t)
    t["L"] = _num(t, _LOSS_FINAL[loss])
    t["G"] = granularity(t)

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


def _sort_key(value: Any) -> tuple:
    """Numbers before strings, numbers by value (so 8 sorts before 16)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def group_order(a: Analysis) -> list[str]:
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


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted segment of each key, unless two keys share it (then the full key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


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


def _curve_points(metrics: pd.DataFrame, t: pd.DataFrame, loss: str, min_frac: float,
                  max_points: int) -> pd.DataFrame:
    """Logged evaluations of the usable trials (metrics: trial_id, tokens, flops, loss columns)."""
    use = t[t["usable"]]
    if use.empty or metrics.empty:
        return pd.DataFrame(columns=_POINT_COLS)
    info = use.drop_duplicates("trial_id").set_index("trial_id")
    out = []
    for tid, g in metrics.groupby("trial_id", sort=True):
        if tid not in info.index:
            continue
        row = info.loc[tid]
        D, C, L = (pd.to_numeric(g[c], errors="coerce").to_numpy(float) for c in ("tokens", "flops", loss))
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
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=_POINT_COLS)


# ----------------------------------------------------------------------------------------------------------
# The analysis


def analyse(root: str | os.PathLike, sweep: str | Sequence[str] | None = None, **kwargs: Any) -> Analysis:
    """Read the trials of `sweep` (a name, a list, or None: every sweep in the store, pooled; dense baselines
    may then come from another sweep) under `root` and analyse them (`analyse_trials`'s keyword arguments)."""
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

    def metrics(trial_ids: list[str], columns: list[str]) -> pd.DataFrame:
        return r.metrics(sweep=chosen, trials=trial_ids, columns=columns)

    a = analyse_trials(raw, metrics=metrics, root=os.fspath(root), sweep=label, sweeps=chosen, **kwargs)
    if len(chosen) > 1:
        a.notes.append(f"{len(chosen)} sweeps pooled ({', '.join(chosen)}); the fits table goes to sweep={label}")
    return a


def analyse_trials(
    raw: pd.DataFrame,
    *,
    metrics: Callable[[list[str], list[str]], pd.DataFrame] | None = None,
    root: str = "",
    sweep: str | None = None,
    sweeps: Sequence[str] = (),
    points: str = "auto",
    loss: str = "eval_loss",
    n_column: str = "active_non_embedding",
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    family_axes: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
    refine_top: int | None = 256,
    curve_min_frac: float = 0.1,
    max_curve_points: int = 20,
) -> Analysis:
    """Fit the laws, leverages and effects of trials `raw` (the `trials` table's rows).

    metrics(trial_ids, columns): the logged rows, needed only for curve points. points: "auto" | "final" |
    "curve". loss: "eval_loss" or "loss" (training loss; used with a note when no trial has an eval loss).
    n_column: the N of the laws and of parameter leverage, "active_non_embedding" or a numeric trials column.
    n_boot, seed, confidence: bootstrap of every fit (whole trials resampled). family_axes: the axes that split
    MoE trials into families (default every axis but SCALE_AXES and seeds). grid, refine_top: Chinchilla
    starts (default Hoffmann et al.'s 4,500) and how many of the best by objective are optimised.
    """
    if points not in ("auto", "final", "curve"):
        raise ValueError(f"points: got {points!r}; allowed: auto, final, curve")
    if loss not in _LOSS_FINAL:
        raise ValueError(f"loss: got {loss!r}; allowed: {', '.join(_LOSS_FINAL)}")
    a = Analysis(root=root, sweep=sweep, sweeps=list(sweeps), points=points, loss=loss, n_column=n_column,
                 n_boot=int(n_boot), confidence=float(confidence), trials=raw)
    if raw.empty:
        a.skip("analysis", "the store holds no trials" + (f" for sweep {sweep!r}" if sweep else ""))
        a.points = "final" if points == "auto" else points
        return a
    if loss == "eval_loss" and not np.isfinite(_num(raw, "final_eval_loss")).any() \
            and np.isfinite(_num(raw, "final_loss")).any():
        a.loss = loss = "loss"
        a.notes.append("no trial has a final eval loss: the training loss is used instead")

    t, axes = _prepare_trials(raw, loss, n_column)
    a.axes = axes
    a.family_axes = [x for x in axes if x not in SCALE_AXES] if family_axes is None else list(family_axes)
    _label_groups(t, a.family_axes)
    a.trials = t
    if (t["D0"] > 0).any():
        a.notes.append(f"{int((t['D0'] > 0).sum())} upcycled trial(s): their tokens and FLOPs include their dense "
                       f"source's training (the loss was bought with both)")
    for reason, g in t[~t["usable"]].groupby("excluded", sort=True):
        a.notes.append(f"{len(g)} trial(s) left out ({reason}): {', '.join(g['trial_id'].astype(str))}")
    dense = t[t["usable"] & (t["family"] == "dense")]
    if not len(dense):
        a.notes.append("no usable dense trials: the dense baselines are what laws and leverage are measured "
                       "against (add `baselines:` to the sweep, or pool a dense-ladder sweep)")

    nd, dd = dense["N"].nunique(), dense["D"].nunique()
    if points == "auto":
        if (len(dense) >= 6 and nd >= 2 and dd >= 2) or not len(dense):
            a.points = "final"
        else:
            a.points = "curve"
            a.notes.append(f"final points are not enough for the dense Chinchilla fit ({len(dense)} dense "
                           f"trial(s), {nd} model size(s), {dd} token budget(s)): fitting each trial's logged "
                           f"evaluations instead (points='curve'); with a decaying LR these sit above an "
                           f"annealed run's loss, so treat the laws as approximate")
    if a.points == "curve":
        use = t[t["usable"]]
        m = metrics(list(use["trial_id"]), ["tokens", "flops", loss]) if metrics and len(use) else pd.DataFrame()
        cp = _curve_points(m, t, loss, curve_min_frac, max_curve_points)
        if cp.empty:
            a.notes.append(f"no logged {loss} values in the metrics table: no curve points")
    else:
        cp = t.loc[t["usable"], _POINT_COLS].reset_index(drop=True)
    a.curve_points = cp
    a.dense_points = cp[cp["family"] == "dense"].reset_index(drop=True)

    if not len(dense):
        a.skip("dense Chinchilla L(N, D)", "no usable dense points", "dense", "chinchilla")
    for i, g in enumerate(group_order(a)):
        _fit_group(a, cp, g, grid, refine_top, seed + 7919 * i)
    a.data_floor = data_floor(t)
    _leverage(a, seed)
    _fit_el_law(a, seed)
    _fit_granularity(a, cp)
    _effects_all(a)
    return a


_FLOOR_COLS = ("data.source", "data.seed", "data.n_domains", "data.n_symbols", "data.concentration", "train.seq_len")


def data_floor(t: pd.DataFrame) -> dict[str, Any] | None:
    """The loss no model can beat on the trials' data, when it is known: every usable trial of `t` trained on
    one synthetic source (same `data.*` and `train.seq_len` config columns) -> {"bayes_loss", "entropy_rate",
    "describe"}; None for real data, mixed sources, or stores without those columns.

    The dense law's E estimates this floor (plus whatever the model family cannot learn): on the synthetic
    source a sound design recovers it within a few percent, so the report prints both side by side."""
    use = t[t["usable"]] if "usable" in t else t
    if use.empty or any(c not in use for c in _FLOOR_COLS):
        return None
    keys = use[list(_FLOOR_COLS)].drop_duplicates()
    if len(keys) != 1 or keys["data.source"].iloc[0] != "synthetic":
        return None
    k = keys.iloc[0]
    from moelab.trainers.data import SyntheticMarkov  # the source itself: its floor is exact, not a fit

    try:
        src = SyntheticMarkov(int(k["data.n_domains"]), int(k["data.n_symbols"]), float(k["data.concentration"]),
                              int(k["data.seed"]))
    except (TypeError, ValueError):
        return None
    seq = int(k["train.seq_len"])
    return {"bayes_loss": src.bayes_loss(seq), "entropy_rate": src.entropy_rate(), "seq_len": seq,
            "describe": f"{int(k['data.n_domains'])} Markov domains over {int(k['data.n_symbols'])} symbols, "
                        f"concentration {float(k['data.concentration']):g}, data.seed {int(k['data.seed'])}"}


def _fit_group(a: Analysis, cp: pd.DataFrame, g: str, grid: np.ndarray | None, refine_top: int | None,
               seed: int) -> None:
    """The Chinchilla law of one group (dense or an MoE family) and its FLOPs per token."""
    pts = cp[cp["group"] == g]
    use = a.trials[a.trials["usable"] & (a.trials["group"] == g)]
    what = "dense Chinchilla L(N, D)" if g == "dense" else f"Chinchilla L(N, D) of {g}"
    if pts.empty or use.empty:
        if g == "dense":
            a.skip(what, "no usable dense points", g, "chinchilla")
        return
    if g != "dense" and (pts["N"].nunique() < 2 or pts["D"].nunique() < 2):
        a.skip(what, f"the family ran at {pts['N'].nunique()} size(s) and {pts['D'].nunique()} budget(s); its own "
                     f"law needs >= 2 of each (its leverage is given per size only)", g, "chinchilla")
        return
    try:
        fit = fit_chinchilla(pts["N"].to_numpy(float), pts["D"].to_numpy(float), pts["L"].to_numpy(float),
                             n_boot=a.n_boot, seed=seed, grid=grid, confidence=a.confidence,
                             refine_top=refine_top, groups=pts["trial_id"].to_numpy(), boot_starts=3)
    except ValueError as e:
        a.skip(what, str(e), g, "chinchilla")
        return
    a.family_fits[g] = fit
    a.fpt[g] = FlopsPerToken.fit(use["N"], use["D"] - use["D0"], use["C"] - use["C0"])


def _budgets(C: np.ndarray) -> np.ndarray:
    """Stated compute budgets (k,) inside a family's range: BUDGET_QUANTILES of its distinct log C, rounded to
    two significant digits (clipped back into the range)."""
    logc = np.log10(np.unique(C))
    raw = 10 ** np.quantile(logc, BUDGET_QUANTILES)
    rounded = np.array([float(f"{c:.2g}") for c in raw])
    return np.clip(rounded, 10 ** logc.min(), 10 ** logc.max())


def _noise_for(a: Analysis, moe: pd.DataFrame, dense: pd.DataFrame) -> None:
    """The seed noise of each family: its own cells, else every MoE cell pooled, else the dense cells."""
    pooled_moe = seed_noise(moe, ["group", "N", "D"], source="pooled over every MoE family's seeds")
    pooled_dense = seed_noise(dense, ["N", "D"], source="from the dense baselines' seeds")
    for g, sub in moe.groupby("group"):
        own = seed_noise(sub, ["N", "D"])
        a.noise[g] = own if own.dof >= 2 else (pooled_moe if pooled_moe.dof >= 1 else pooled_dense)
    if all(n is NO_NOISE for n in a.noise.values()):
        a.notes.append("no trial has a seed replicate: leverage intervals carry the dense fit's error only, "
                       "not the runs' own seed noise (add seeds to the sweep)")


def _leverage(a: Analysis, seed: int) -> None:
    t = a.trials
    cols = ("parameter_leverage", "parameter_leverage_lo", "parameter_leverage_hi", "n_equivalent",
            "compute_leverage", "compute_leverage_lo", "compute_leverage_hi", "c_dense")
    for col in cols:
        t[col] = np.nan
    t["parameter_extrapolated"] = pd.Series([None] * len(t), dtype=object)
    t["compute_extrapolated"] = pd.Series([None] * len(t), dtype=object)
    t["leverage_note"] = ""
    moe = t[t["usable"] & (t["family"] == "moe")]
    dense = t[t["usable"] & (t["family"] == "dense")]
    if not len(moe):
        if (t["family"] == "moe").any():
            a.skip("leverage", "no usable MoE trials (all diverged, failed or without a finite loss)")
        else:
            a.notes.append("no MoE trials: no leverage to compute")
        return
    fit = a.dense_fit
    if fit is None:
        a.skip("leverage", "no dense Chinchilla fit (see above)", "moe", "parameter_leverage")
        return
    _noise_for(a, moe, dense)
    dense_fpt = a.fpt["dense"]
    L, D, N, C = (moe[c].to_numpy(float) for c in ("L", "D", "N", "C"))
    lev = trial_leverage(fit, dense_fpt, L, D, N, C, [a.noise[g] for g in moe["group"]], seed=seed + 1)
    idx = moe.index
    t.loc[idx, "parameter_leverage"], t.loc[idx, "n_equivalent"] = lev["parameter"], lev["n_equivalent"]
    t.loc[idx, "compute_leverage"], t.loc[idx, "c_dense"] = lev["compute"], lev["c_dense"]
    for kind in ("parameter", "compute"):
        if len(lev[f"{kind}_draws"]):
            lo, hi = interval(lev[f"{kind}_draws"], a.confidence)
            t.loc[idx, f"{kind}_leverage_lo"], t.loc[idx, f"{kind}_leverage_hi"] = lo, hi
    n_lo, n_hi = fit.n_range
    d_lo, d_hi = fit.d_range
    c_lo, c_hi = float(dense["C"].min()), float(dense["C"].max())
    n_eq, c_dense = lev["n_equivalent"], lev["c_dense"]
    t.loc[idx, "parameter_extrapolated"] = list(~np.isfinite(n_eq) | (n_eq < n_lo) | (n_eq > n_hi)
                                                | (D < d_lo) | (D > d_hi))
    t.loc[idx, "compute_extrapolated"] = list(~np.isfinite(c_dense) | (c_dense < c_lo) | (c_dense > c_hi))
    t.loc[idx, "leverage_note"] = _disagreements(fit, dense_fpt, moe, lev)
    a.size_leverage = _size_rows(a, moe, lev)
    a.family_leverage = _family_rows(a, moe, dense_fpt)
    n_extra = int(sum(bool(v) for col in ("parameter_extrapolated", "compute_extrapolated") for v in t.loc[idx, col]))
    if n_extra:
        a.notes.append(f"{n_extra} per-trial leverage value(s) are extrapolated beyond the dense fit's range "
                       f"(marked *)")


def _disagreements(fit: ChinchillaFit, fpt: FlopsPerToken, moe: pd.DataFrame, lev: dict) -> list[str]:
    """Why a trial's parameter and compute leverage fall on opposite sides of 1, where they do: the parameter
    figure compares at the trial's own tokens, the compute figure against the dense compute-optimal run, so a
    trial trained far from the dense optimal tokens per parameter buys less (or more) with its compute."""
    E, A, B, al, be = fit.params
    sl, c = fpt.slope, np.exp(fpt.log_coef)
    _, K, ex = frontier_params(fit.params, fpt)
    notes = []
    for (L, D, N), p, cl in zip(moe[["L", "D", "N"]].to_numpy(float), lev["parameter"], lev["compute"]):
        if not (np.isfinite(p) and np.isfinite(cl)) or (p > 1) == (cl > 1):
            notes.append("")
            continue
        c_opt = (K / (L - E)) ** (1.0 / ex)  # the dense frontier's compute at this loss (fits.frontier_params)
        n_opt = (al * A / (sl * be * B * c ** be)) ** (1 / (al + sl * be)) * c_opt ** (be / (al + sl * be))
        d_opt = c_opt / (c * n_opt ** sl)
        notes.append(f"parameter and compute leverage disagree: the run trained on {D / N:.3g} tokens per active "
                     f"parameter; the dense run that reaches its loss at least compute uses {d_opt / n_opt:.3g}")
    return notes


def _size_rows(a: Analysis, moe: pd.DataFrame, lev: dict) -> pd.DataFrame:
    """One row per (family, N, D): geometric means over seeds with intervals (leverage.cell_leverage)."""
    rows = []
    pos = pd.Series(np.arange(len(moe)), index=moe.index)
    for (g, N, D), cell in moe.groupby(["group", "N", "D"], sort=False):
        j = pos[cell.index].to_numpy()
        row: dict[str, Any] = {"group": g, "N": N, "D": D, "C": float(np.exp(np.log(cell["C"]).mean())),
                               "n_trials": len(cell), "seeds": int(cell["seed"].nunique())}
        for kind in ("parameter", "compute"):
            draws = lev[f"{kind}_draws"][:, j] if len(lev[f"{kind}_draws"]) else np.empty((0, len(j)))
            c = cell_leverage(lev[kind][j], draws, a.confidence)
            row.update({f"{kind}_leverage": c["leverage"], f"{kind}_leverage_lo": c["lo"],
                        f"{kind}_leverage_hi": c["hi"], f"{kind}_n_inf": c["n_inf"],
                        f"{kind}_extrapolated": bool(np.any(a.trials.loc[cell.index, f"{kind}_extrapolated"]
                                                            .astype(bool)))})
        rows.append(row)
    order = {g: i for i, g in enumerate(group_order(a))}
    out = pd.DataFrame(rows)
    return out.sort_values(["group", "N", "D"], key=lambda s: s.map(order) if s.name == "group" else s,
                           kind="stable").reset_index(drop=True)


def _family_rows(a: Analysis, moe: pd.DataFrame, dense_fpt: FlopsPerToken) -> pd.DataFrame:
    """One row per (family, budget): efficiency leverage from the family's own law (leverage.family_leverage)."""
    rows = []
    dense_c = a.trials.loc[a.trials["usable"] & (a.trials["family"] == "dense"), "C"]
    c_lo, c_hi = float(dense_c.min()), float(dense_c.max())
    for g in group_order(a):
        if g == "dense" or g not in a.family_fits:
            continue
        budgets = _budgets(moe.loc[moe["group"] == g, "C"].to_numpy(float))
        f = family_leverage(a.dense_fit, dense_fpt, a.family_fits[g], a.fpt[g], budgets, a.confidence)
        for i, c in enumerate(budgets):
            rows.append({"group": g, "at_compute": c, "headline": i == len(budgets) // 2,
                         "leverage": f["leverage"][i], "leverage_lo": f["lo"][i], "leverage_hi": f["hi"][i],
                         "loss": f["loss"][i], "c_dense": f["c_dense"][i],
                         "extrapolated": bool(not np.isfinite(f["c_dense"][i]) or f["c_dense"][i] < c_lo
                                              or f["c_dense"][i] > c_hi),
                         "n_trials": int((moe["group"] == g).sum())})
    return pd.DataFrame(rows, columns=["group", "at_compute", "headline", "leverage", "leverage_lo", "leverage_hi",
                                       "loss", "c_dense", "extrapolated", "n_trials"])


def _design(t: pd.DataFrame) -> pd.DataFrame:
    """Per trial: activation ratio A (activated routed + shared over all routed + shared experts, counted in
    expert widths), the paper's G = 2 d_model / d_expert, and moelab's G = d_ff / d_expert (Tian et al. 2025's
    conventions; refs.md). NaN where the flattened config lacks a column."""
    E, k = _num(t, "model.moe.n_experts"), _num(t, "model.moe.top_k")
    n_sh, d_sh = _num(t, "model.moe.n_shared").fillna(0.0), _num(t, "model.moe.d_shared").fillna(0.0)
    G = t["G"] if "G" in t else granularity(t)
    d_exp = _num(t, "model.d_ff") / G
    d_sh = d_sh.where(d_sh > 0, d_exp)
    A = (k * d_exp + n_sh * d_sh) / (E * d_exp + n_sh * d_sh)
    return pd.DataFrame({"A": A, "G_paper": 2.0 * _num(t, "model.d_model") / d_exp, "G_moelab": G}, index=t.index)


def _el_points(a: Analysis) -> list[tuple[pd.DataFrame, str]]:
    """The candidate (group, at_compute, EL) point sets Eq. 13 can be fitted to, best first.

    "family laws": each family with its own law gives its efficiency leverage at the stated budgets (the
    paper's EL: both sides compute-optimal). "cells": every (family, size, budget) cell gives its compute
    leverage at its own compute (the dense frontier against that cell's allocation, so a cell trained away
    from the MoE-optimal tokens per parameter reads lower than the paper's EL would); it covers families
    that ran at one size or one budget. A set is offered only with at least two families."""
    out = []
    fl = a.family_leverage
    if fl is not None and fl["group"].nunique() >= 2:
        out.append((fl.rename(columns={"leverage": "EL"})[["group", "at_compute", "EL"]], "family laws"))
    sl = a.size_leverage
    if sl is not None and sl["group"].nunique() >= 2:
        pts = sl.rename(columns={"C": "at_compute", "compute_leverage": "EL"})[["group", "at_compute", "EL"]]
        out.append((pts, "cells"))
    return out


def _fit_el_law(a: Analysis, seed: int) -> None:
    """Tian et al. 2025 Eq. 13 over the families' measured leverages (the first of `_el_points` that varies A,
    G and C enough; whole families resampled); skipped with every candidate's reason otherwise."""
    what = "efficiency-leverage law (Tian et al. 2025 Eq. 13)"
    candidates = _el_points(a)
    if not candidates:
        return
    moe = a.trials[a.trials["usable"] & (a.trials["family"] == "moe")]
    design = _design(moe).groupby(moe["group"]).first()
    reasons = []
    for pts, source in candidates:
        pts = pts.join(design, on="group")
        pts = pts[np.isfinite(pts["EL"]) & (pts["EL"] > 0) & np.isfinite(pts["A"]) & np.isfinite(pts["G_paper"])]
        try:
            a.el_law = fit_efficiency_leverage(pts["A"], pts["G_paper"], pts["at_compute"], pts["EL"],
                                               groups=pts["group"], G_moelab=pts["G_moelab"], n_boot=a.n_boot,
                                               confidence=a.confidence, seed=seed)
        except ValueError as e:
            reasons.append(f"from {source}: {e}")
            continue
        a.el_law.points = source
        a.notes += _el_regime(a.el_law, pts)
        if source == "cells":
            a.notes.append(f"{what}: fitted on each (family, size, budget) cell's compute leverage"
                           + (f" (the families' own laws could not fit it: {reasons[0]})" if reasons else
                              ", since fewer than two families ran at enough sizes and budgets for a law of "
                              "their own"))
        return
    a.skip(what, "; ".join(reasons) + " (needs the families' activation ratio, granularity and budget to vary)",
           "moe", "efficiency_leverage")


def _el_regime(fit: ELFit, pts: pd.DataFrame) -> list[str]:
    """Notes when the data sit outside the regime Eq. 13 describes, so its constants are not comparable with
    Tian et al.'s Table 2: leverages below 1 (the law gives EL < 1 only with A_hat > 1), or a fitted A_start
    at or above the smallest measured A (EL then saturates before the data's own activation ratios)."""
    notes = []
    below = int((pts["EL"] < 1).sum())
    if below:
        notes.append(f"efficiency-leverage law: {below} of {len(pts)} points have EL < 1 (the MoE needed more compute "
                     f"than dense for its loss), a regime Eq. 13 reaches only with A_hat > 1: read the fitted "
                     f"constants as a description of these points, not as Tian et al.'s Table 2 quantities")
    if fit.params["A_start"] >= float(pts["A"].min()):
        notes.append(f"efficiency-leverage law: fitted A_start = {fit.params['A_start']:.3g} is at or above the "
                     f"smallest activation ratio measured ({float(pts['A'].min()):.3g}): the law's saturation is "
                     f"not seen in these data")
    return notes


def _fit_granularity(a: Analysis, cp: pd.DataFrame) -> None:
    what = "granularity law (Krajewski et al. eq. 9)"
    moe = a.trials[a.trials["usable"] & (a.trials["family"] == "moe")]
    if not len(moe):
        return
    values = sorted(moe["G"].dropna().unique())
    if len(values) < 2:
        shown = ", ".join(_fmt(v) for v in values) or "unknown"
        a.notes.append(f"{what}: not fitted, all MoE trials have G = d_ff / d_expert = {shown}")
        return
    pts = cp[(cp["family"] == "moe")].dropna(subset=["G", "N_total"])
    try:
        a.granularity = fit_granularity(pts["N_total"].to_numpy(float), pts["D"].to_numpy(float),
                                        pts["G"].to_numpy(float), pts["L"].to_numpy(float))
    except ValueError as e:
        a.skip(what, str(e), "moe", "granularity")


_EFFECT_METRICS = (("L", "final {loss}"), ("parameter_leverage", "parameter leverage"),
                   ("compute_leverage", "compute leverage"))


def _effects_all(a: Analysis) -> None:
    """Effects of every axis on loss and both leverages, paired by seed within blocks of the other axes (and
    size, budget), Holm-corrected per metric across every contrast of every axis (they are shown together)."""
    t = a.trials
    if not a.axes:
        a.notes.append("per-axis effects: the trials have no axis values (axis_values is empty)")
        return
    use = t[t["usable"]].copy()
    use["_N"], use["_D"] = use["N"].round(-2), use["D"].round(-2)
    for axis in a.axes:
        frame = use[use[axis].notna()]
        blocks = [x for x in a.axes if x != axis and frame[x].notna().any()] + ["_N", "_D"]
        a.effects[axis] = {}
        for col, name in _EFFECT_METRICS:
            name = name.format(loss=a.loss)
            if col not in frame or not np.isfinite(frame[col].astype(float)).any() and \
                    not np.isinf(frame[col].astype(float)).any():
                continue
            sub = frame[[axis, "seed", col, *blocks]].rename(columns={col: name})
            try:
                a.effects[axis][name] = _effects(sub, axis, name, confidence=a.confidence, blocks=blocks)
            except ValueError as e:
                a.skip(f"effects of {axis} on {name}", str(e))
        if not a.effects[axis]:
            a.skip(f"effects of {axis}", "no usable trials carry this axis")
            del a.effects[axis]
        elif next(iter(a.effects[axis].values())).shape[0] < 2:
            a.notes.append(f"axis {axis}: only one value among the usable trials, no contrast")
    for _, name in _EFFECT_METRICS:
        name = name.format(loss=a.loss)
        frames = [per[name] for per in a.effects.values() if name in per]
        adjusted = holm(np.concatenate([f["p_value"].to_numpy(float) for f in frames])) if frames else []
        start = 0
        for f in frames:
            f["p_holm"] = adjusted[start:start + len(f)]
            start += len(f)
    few = [axis for axis, per in a.effects.items()
           if any(((f["n"] < MIN_SEEDS) & ~f["is_baseline"]).any() for f in per.values())]
    if few:
        a.notes.append(f"fewer than {MIN_SEEDS} seeds behind some contrasts of {', '.join(few)}: their differences "
                       f"are shown without p-values")


# ----------------------------------------------------------------------------------------------------------
# Rows of the fits table (moelab.platform.fitstable)


def _law_row(a: Analysis, g: str, fit: ChinchillaFit) -> list[dict[str, Any]]:
    d = fit.to_dict()
    params = {k: d[k] for k in ("E", "A", "B", "alpha", "beta", "objective", "n_range", "d_range", "huber_delta")}
    params.update(n_column=a.n_column, loss=a.loss, n_opt_exponent=fit.beta / (fit.alpha + fit.beta))
    if g == "dense" and a.data_floor is not None:
        params["data_floor"] = {k: a.data_floor[k] for k in ("bayes_loss", "entropy_rate", "seq_len", "describe")}
    rows = [{"family": g, "law": "chinchilla", "scope": "law", "status": "ok", "parameters": params,
             "intervals": d["intervals"], "n_points": fit.n_points}]
    fpt = a.fpt[g]
    E, K, ex = frontier_params(fit.params, fpt)
    iv = None
    if fit.boot_params is not None:
        bE, bK, ba = frontier_params(fit.boot_params, fpt)
        iv = {name: [float(v) for v in interval(s, a.confidence)] for name, s in (("E", bE), ("A", bK), ("alpha", ba))}
    c_use = a.trials.loc[a.trials["usable"] & (a.trials["group"] == g), "C"]
    rows.append({"family": g, "law": "power_law", "scope": "law", "status": "ok", "intervals": iv,
                 "n_points": fit.n_points,
                 "parameters": {"E": float(E), "A": float(K), "alpha": float(ex), "with_offset": True,
                                "form": "L = E + A * C^-alpha: the compute-optimal frontier of the Chinchilla fit",
                                "flops_per_token": {"log_coef": fpt.log_coef, "slope": fpt.slope},
                                "c_range": [float(c_use.min()), float(c_use.max())], "loss": a.loss}})
    return rows


def fit_rows(a: Analysis) -> list[dict[str, Any]]:
    """Every row `write_fits` writes: laws, then per-trial, per-size and per-family leverage, then skips."""
    base = {"points": a.points, "n_boot": a.n_boot, "confidence": a.confidence}
    rows: list[dict[str, Any]] = []
    for g in group_order(a):
        if g in a.family_fits:
            rows += _law_row(a, g, a.family_fits[g])
    rows.sort(key=lambda r: (r["family"] != "dense", r["law"] != "power_law"))  # the dense frontier first
    if a.el_law is not None:
        rows += el_law_rows(a.el_law)
    if a.granularity is not None:
        d = a.granularity.to_dict()
        rows.append({"family": "moe", "law": "granularity", "scope": "law", "status": "ok", "n_points": d["n_points"],
                     "parameters": {k: v for k, v in d.items() if k not in ("law", "n_points")}})
    t = a.trials
    if "parameter_leverage" in t:
        for _, r in t[t["parameter_leverage"].notna()].iterrows():
            for kind, extra in (("parameter", "n_equivalent"), ("compute", "c_dense")):
                rows.append({"family": r["group"], "law": f"{kind}_leverage", "scope": "trial", "status": "ok",
                             "trial_id": str(r["trial_id"]), "leverage": r[f"{kind}_leverage"],
                             "leverage_lo": r[f"{kind}_leverage_lo"], "leverage_hi": r[f"{kind}_leverage_hi"],
                             "extrapolated": bool(r[f"{kind}_extrapolated"]), "at_n": r["N"], "at_tokens": r["D"],
                             "at_compute": r["C"], "n_points": 1, "message": r["leverage_note"] or None,
                             "parameters": {"loss": r["L"], "seed": r["seed"], extra: r[extra],
                                            "noise": a.noise[r["group"]].source,
                                            "seed_sd": a.noise[r["group"]].sd}})
    if a.size_leverage is not None:
        for _, r in a.size_leverage.iterrows():
            for kind in ("parameter", "compute"):
                rows.append({"family": r["group"], "law": f"{kind}_leverage", "scope": "size", "status": "ok",
                             "leverage": r[f"{kind}_leverage"], "leverage_lo": r[f"{kind}_leverage_lo"],
                             "leverage_hi": r[f"{kind}_leverage_hi"], "extrapolated": r[f"{kind}_extrapolated"],
                             "at_n": r["N"], "at_tokens": r["D"], "at_compute": r["C"], "n_points": r["n_trials"],
                             "parameters": {"seeds": r["seeds"], "n_inf": r[f"{kind}_n_inf"],
                                            "at": "geometric mean over seeds at one size and budget"}})
    if a.family_leverage is not None:
        for _, r in a.family_leverage.iterrows():
            rows.append({"family": r["group"], "law": "compute_leverage", "scope": "family", "status": "ok",
                         "leverage": r["leverage"], "leverage_lo": r["leverage_lo"], "leverage_hi": r["leverage_hi"],
                         "extrapolated": r["extrapolated"], "at_compute": r["at_compute"], "n_points": r["n_trials"],
                         "parameters": {"headline": bool(r["headline"]), "loss": r["loss"], "c_dense": r["c_dense"],
                                        "at": "efficiency leverage C_dense(L_moe(C)) / C of the family's law"}})
    for family, law, message in a.skipped_fits:
        rows.append({"family": family, "law": law, "scope": "law", "status": "skipped", "message": message})
    for r in rows:
        for k, v in base.items():
            r.setdefault(k, v)
    return rows
