"""Plotly figures of the dashboard, built from the frames of `moelab.dashboards.curves`, `.effects`,
`.scaling`, `.experts` and `.trials` (also usable in a notebook: `curves_figure(curve_data(Reader(root), ...)).show()`).

Every builder takes plain frames / dataclasses and returns a `go.Figure`; none reads the store. Trace layout
is stable so tests can count traces:

* curves, grouped: per group 3 traces (stderr band, mean line named "LABEL (N=n)", every run faint in one
  trace with gaps between runs), plus one "stopped" marker trace when a diverged / failed run is shown;
* curves, ungrouped: per run 1 trace (2 with smoothing: raw faint + smoothed);
* effects: per split value 2 traces (mean +/- interval; difference to the baseline), baseline marked;
* scaling: dense points, the dense law (+ band), MoE points per colour label, faint training curves;
* EL surface: one heatmap (x = A, y = G, z = EL), then the optimal-G line when the law has one;
* domain routing: one heatmap trace; specialisation: one line per layer ("layer L").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from moelab.dashboards.curves import CurveData
from moelab.dashboards.scaling import DenseLaw, ELSurface
from moelab.dashboards.trials import fmt_value

__all__ = [
    "STATUS_COLORS", "message_figure", "overview_figure", "curves_figure", "effects_figure", "scaling_figure",
    "el_surface_figure",
    "expert_heatmap", "expert_time_heatmap", "imbalance_figure", "domain_heatmap", "specialisation_figure",
    "parallel_figure",
]

PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
STATUS_COLORS = {"pending": "#9e9e9e", "running": "#1f77b4", "finished": "#2ca02c", "failed": "#d62728",
                 "diverged": "#ff7f0e", "other": "#8c564b"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), hovermode="closest")
AXIS_TITLES = {"step": "step", "tokens": "tokens", "flops": "training FLOPs", "wall_s": "wall time (s)"}


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _balanced_scale(z: np.ndarray, balanced: float) -> dict[str, Any]:
    """Colour settings for loads: 0 .. max, white at the balanced load 1/E, blue under it, red over it."""
    zmax = float(np.nanmax(z)) if np.isfinite(z).any() else 1.0
    zmax = max(zmax, balanced * 1.001)
    mid = balanced / zmax
    return dict(zmin=0.0, zmax=zmax, colorscale=[[0.0, "#2166ac"], [mid, "#f7f7f7"], [1.0, "#b2182b"]])


def message_figure(text: str, title: str = "") -> go.Figure:
    """An empty figure that says `text` (nothing to plot, or why not)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14), align="center")
    fig.update_layout(**_LAYOUT, title=title, xaxis=dict(visible=False), yaxis=dict(visible=False), height=300)
    return fig


def overview_figure(overview: pd.DataFrame) -> go.Figure:
    """Trials per sweep, stacked by status (one bar trace per status that occurs)."""
    if not len(overview):
        return message_figure("No sweeps yet.")
    fig = go.Figure()
    for status, color in STATUS_COLORS.items():
        if status in overview and overview[status].sum() > 0:
            fig.add_bar(y=overview["sweep"], x=overview[status], name=status, orientation="h",
                        marker_color=color, hovertemplate="%{y}: %{x} " + status + "<extra></extra>")
    fig.update_layout(**_LAYOUT, barmode="stack", title="Trials by status",
                      height=max(220, 60 + 40 * len(overview)), xaxis_title="trials")
    return fig


def _gapped(df: pd.DataFrame, with_names: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x, y (float arrays) of several runs joined into one trace, NaN between runs (a gap in the line), and
    the run id per point (None when not wanted). Numpy arrays keep plotly's validation and JSON fast."""
    if not len(df):
        return np.zeros(0), np.zeros(0), None
    run = df["run"].to_numpy()
    new = np.r_[True, run[1:] != run[:-1]]
    pos = np.arange(len(df)) + np.cumsum(new) - 1  # index of each point once a gap follows every run
    n = len(df) + int(new.sum())
    xs, ys = np.full(n, np.nan), np.full(n, np.nan)
    xs[pos], ys[pos] = df["x"].to_numpy(float), df["y"].to_numpy(float)
    names = None
    if with_names:
        names = np.full(n, "", dtype=object)
        names[pos] = run
    return xs, ys, names


def curves_figure(cd: CurveData, log_x: bool = False, log_y: bool = False, title: str | None = None,
                  uirevision: Any = None) -> go.Figure:
    """Metric curves (see the module docstring for the traces)."""
    if cd.note and not len(cd.runs):
        return message_figure(cd.note, title or cd.metric)
    fig = go.Figure()
    if cd.grouped:
        for i, group in enumerate(cd.group_n):
            color = PALETTE[i % len(PALETTE)]
            n = cd.group_n[group]
            a = cd.agg[cd.agg["group"] == group] if len(cd.agg) else pd.DataFrame(columns=["x", "mean", "stderr"])
            band = a[np.isfinite(a["stderr"].astype(float))]
            bx, bm, bs = (band[c].to_numpy(float) for c in ("x", "mean", "stderr"))
            fig.add_scatter(x=np.r_[bx, bx[::-1]], y=np.r_[bm + bs, (bm - bs)[::-1]],
                            fill="toself", fillcolor=_rgba(color, 0.2), line=dict(width=0), mode="lines",
                            hoverinfo="skip", showlegend=False, legendgroup=group, name=f"{group} stderr")
            fig.add_scatter(x=a["x"].to_numpy(float), y=a["mean"].to_numpy(float), mode="lines",
                            line=dict(color=color, width=2),
                            name=f"{group} (N={n})", legendgroup=group,
                            customdata=np.stack([a["stderr"].to_numpy(float), a["n"].to_numpy(float)], axis=-1)
                            if len(a) else None,
                            hovertemplate=f"<b>{group}</b><br>x=%{{x:.4g}}<br>mean=%{{y:.4g}}"
                                          "<br>stderr=%{customdata[0]:.3g}, N=%{customdata[1]}<extra></extra>")
            xs, ys, names = _gapped(cd.runs[cd.runs["group"] == group], with_names=len(cd.runs) <= 20_000)
            fig.add_scatter(x=xs, y=ys, text=names, mode="lines", line=dict(color=color, width=1), opacity=0.25,
                            showlegend=False, legendgroup=group, name=f"{group} runs",
                            hovertemplate=("%{text}" if names is not None else f"a run of {group}")
                            + "<br>x=%{x:.4g}<br>y=%{y:.4g}<extra></extra>")
    else:
        smooth = cd.smooth if len(cd.smooth) else None
        for i, (run, d) in enumerate(cd.runs.groupby("run", sort=False)):
            color = PALETTE[i % len(PALETTE)]
            fig.add_scatter(x=d["x"].to_numpy(float), y=d["y"].to_numpy(float), mode="lines", name=run,
                            legendgroup=run,
                            line=dict(color=color, width=1 if smooth is not None else 1.5),
                            opacity=0.3 if smooth is not None else 1.0, showlegend=smooth is None,
                            hovertemplate=f"{run}<br>x=%{{x:.4g}}<br>y=%{{y:.4g}}<extra></extra>")
            if smooth is not None:
                s = smooth[smooth["run"] == run]
                fig.add_scatter(x=s["x"].to_numpy(float), y=s["y"].to_numpy(float), mode="lines", name=run,
                                legendgroup=run,
                                line=dict(color=color, width=2),
                                hovertemplate=f"{run} (smoothed)<br>x=%{{x:.4g}}<br>y=%{{y:.4g}}<extra></extra>")
    if len(cd.ended):
        fig.add_scatter(x=cd.ended["x"], y=cd.ended["y"], mode="markers", name="stopped (diverged / failed)",
                        marker=dict(symbol="x", size=10, color="#d62728"), text=cd.ended["run"],
                        customdata=cd.ended["status"],
                        hovertemplate="%{text}: %{customdata} here<extra></extra>")
    fig.update_layout(**_LAYOUT, title=title or f"{cd.metric} vs {cd.x}", height=520,
                      xaxis=dict(title=AXIS_TITLES.get(cd.x, cd.x), type="log" if log_x else "linear"),
                      yaxis=dict(title=cd.metric, type="log" if log_y else "linear"),
                      legend=dict(font=dict(size=10)), uirevision=uirevision)
    return fig


def effects_figure(eff: pd.DataFrame, axis: str, metric: str, confidence: float = 0.95) -> go.Figure:
    """Left: mean per axis value with a t-interval over seeds; right: difference to the baseline value with
    Welch's interval. The baseline is a star (and a dashed line at its mean)."""
    if not len(eff):
        return message_figure(f"No trials with a finite {metric} on the axis {axis}.")
    pct = f"{confidence:.0%}"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{metric} (mean, {pct} interval over seeds)",
                                                        f"difference to baseline (Welch {pct} interval)"))
    splits = [(None, eff)] if "split" not in eff else list(eff.groupby("split", sort=True, dropna=False))
    for i, (sv, e) in enumerate(splits):
        color = PALETTE[i % len(PALETTE)]
        name = "all" if sv is None else fmt_value(sv)
        x = [fmt_value(v) for v in e["value"]]
        base = e["is_baseline"].to_numpy(bool)
        up = (e["ci_hi"] - e["mean"]).to_numpy(float)
        fig.add_scatter(x=x, y=e["mean"], mode="lines+markers", name=f"{name}", legendgroup=name,
                        marker=dict(color=color, size=np.where(base, 16, 9),
                                    symbol=np.where(base, "star", "circle").tolist()),
                        line=dict(color=color), error_y=dict(type="data", array=np.nan_to_num(up), visible=True),
                        customdata=np.stack([e["n"], e["stderr"]], axis=-1),
                        hovertemplate=f"{axis}=%{{x}}<br>mean=%{{y:.4g}}<br>N=%{{customdata[0]}}, "
                                      "stderr=%{customdata[1]:.3g}<extra>" + name + "</extra>", row=1, col=1)
        hi = (e["diff_hi"] - e["diff"]).to_numpy(float)
        lo = (e["diff"] - e["diff_lo"]).to_numpy(float)
        fig.add_scatter(x=x, y=e["diff"], mode="markers", name=f"{name} diff", legendgroup=name, showlegend=False,
                        marker=dict(color=color, size=np.where(base, 16, 9),
                                    symbol=np.where(base, "star", "diamond").tolist()),
                        error_y=dict(type="data", array=np.nan_to_num(hi), arrayminus=np.nan_to_num(lo),
                                     visible=True),
                        customdata=np.stack([e["p_value"]], axis=-1),
                        hovertemplate=f"{axis}=%{{x}}<br>diff=%{{y:.4g}}<br>p=%{{customdata[0]:.3g}}"
                                      "<extra>" + name + "</extra>", row=1, col=2)
        if base.any():
            fig.add_hline(y=float(e.loc[base, "mean"].iloc[0]), line=dict(color=color, dash="dash", width=1),
                          row=1, col=1)
    fig.add_hline(y=0, line=dict(color="#555", width=1), row=1, col=2)
    fig.update_xaxes(type="category", title_text=axis)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=90, b=50)}, height=480,
                      title=dict(text=f"Effect of {axis} on {metric} (star = baseline)", y=0.97),
                      legend_title_text="split" if len(splits) > 1 else None)
    return fig


def scaling_figure(points: pd.DataFrame, law: DenseLaw | None, curves: pd.DataFrame | None = None,
                   confidence: float = 0.95) -> go.Figure:
    """Final loss against training compute (log-log): dense points and law with its bootstrap band, MoE
    points per label with the mean leverage of each label annotated; `curves` (family, run, x=FLOPs, y=loss,
    downsampled) drawn faint underneath."""
    if not len(points):
        return message_figure("No finished trials with a final loss and FLOPs.")
    fig = go.Figure()
    if curves is not None and len(curves):
        for fam, color in (("dense", "#444444"), ("moe", "#1f77b4")):
            xs, ys, _ = _gapped(curves[curves["group"] == fam], with_names=False)
            if len(xs):
                fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=1), opacity=0.15,
                                name=f"{fam} training curves", hoverinfo="skip")
    dense = points[points["family"] == "dense"]
    if law is not None:
        lo = min(points["C"].min(), law.c_range[0] if np.isfinite(law.c_range[0]) else points["C"].min())
        hi = max(points["C"].max(), law.c_range[1] if np.isfinite(law.c_range[1]) else points["C"].max())
        C = np.geomspace(lo / 1.5, hi * 1.5, 120)
        band = law.band(C, confidence)
        if band is not None:
            fig.add_scatter(x=np.r_[C, C[::-1]], y=np.r_[band[1], band[0][::-1]], fill="toself",
                            fillcolor="rgba(0,0,0,0.12)", line=dict(width=0), hoverinfo="skip",
                            name=f"dense law {confidence:.0%} band")
        form = (f"{law.A:.3g}·C^-{law.alpha:.3g}" if law.E == 0 else f"{law.E:.3g} + {law.A:.3g}·C^-{law.alpha:.3g}")
        fig.add_scatter(x=C, y=law.predict(C), mode="lines", line=dict(color="black", dash="dash"),
                        name=f"dense law L = {form} ({law.source})")
    fig.add_scatter(x=dense["C"], y=dense["L"], mode="markers", name="dense runs",
                    marker=dict(color="black", size=9, symbol="square"), text=dense["trial_id"],
                    hovertemplate="%{text}<br>C=%{x:.3g}<br>L=%{y:.4g}<extra>dense</extra>")
    moe = points[points["family"] == "moe"]
    for i, (label, d) in enumerate(moe.groupby("label", sort=True)):
        color = PALETTE[i % len(PALETTE)]
        lev = d["leverage"].to_numpy(float)
        fig.add_scatter(x=d["C"], y=d["L"], mode="markers", name=label, marker=dict(color=color, size=9),
                        text=d["trial_id"], customdata=lev,
                        hovertemplate="%{text}<br>C=%{x:.3g}<br>L=%{y:.4g}<br>leverage=%{customdata:.3g}x"
                                      "<extra>" + label + "</extra>")
        if np.isfinite(lev).any():
            fig.add_annotation(x=math.log10(float(d["C"].mean())), y=math.log10(float(d["L"].mean())),
                               text=f"EL {np.nanmean(lev):.2f}x", showarrow=True, arrowhead=0, ax=30, ay=-25,
                               font=dict(color=color, size=11))
    fig.update_layout(**_LAYOUT, height=540, title="Final loss vs training compute; EL = dense compute for the "
                      "same loss / MoE compute", xaxis=dict(type="log", title="training FLOPs"),
                      yaxis=dict(type="log", title="final loss"))
    return fig


def el_surface_figure(surface: ELSurface) -> go.Figure:
    """Eq. 13's EL over (A, G) at the surface's budget: a heatmap on log axes (G ticks at powers of 2) and a
    dashed line at the optimal G. The title states the budget and says "extrapolated" when the budget is
    outside the fitted compute range."""
    s = surface
    fig = go.Figure(go.Heatmap(x=s.A, y=s.G, z=s.EL, colorscale="Viridis", colorbar=dict(title="EL"),
                               name="EL", hovertemplate="A=%{x:.3g}, G=%{y:.3g}: EL %{z:.3g}<extra></extra>"))
    g_lo, g_hi = float(s.G[0]), float(s.G[-1])
    if s.G_opt is not None:
        inside = g_lo <= s.G_opt <= g_hi
        label = f"optimal G = 2^{math.log2(s.G_opt):.2f} = {s.G_opt:.3g}" + ("" if inside else " (off this grid)")
        # drawn even off the grid: the legend still says where the optimum is
        fig.add_scatter(x=[float(s.A[0]), float(s.A[-1])], y=[s.G_opt, s.G_opt], mode="lines", name=label,
                        line=dict(color="white", dash="dash", width=2), hoverinfo="name")
    c_range = s.fit_range.get("C")
    if s.extrapolated:
        where = f"extrapolated: outside the fitted compute range [{float(c_range[0]):.3g}, {float(c_range[1]):.3g}]"
    elif s.extrapolated is None:
        where = "the fit states no compute range"
    else:
        where = "within the fitted compute range"
    pow2 = [2.0 ** k for k in range(math.floor(math.log2(g_lo)), math.ceil(math.log2(g_hi)) + 1)]
    fig.update_layout(**_LAYOUT, height=520, title=f"Efficiency leverage at C = {s.budget:.3g} FLOPs ({where})",
                      xaxis=dict(type="log", title="activation ratio A (active / total experts)"),
                      yaxis=dict(type="log", title="granularity G = 2 d_model / d_expert", range=[
                          math.log10(g_lo), math.log10(g_hi)], tickvals=pow2, ticktext=[f"{v:g}" for v in pow2]),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def expert_heatmap(mat: pd.DataFrame, step: int | None, trial: str = "") -> go.Figure:
    """Load per (layer, expert) at one step; white = the balanced load 1/E, red above, blue below."""
    if mat is None or not len(mat):
        return message_figure("No expert load recorded for this trial.")
    n_exp = mat.shape[1]
    z = mat.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in mat.columns], y=[str(i) for i in mat.index],
                               **_balanced_scale(z, 1.0 / n_exp), colorbar=dict(title="load"),
                               hovertemplate="layer %{y}, expert %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(260, 90 + 28 * mat.shape[0]),
                      title=f"Expert load at step {step} {trial} (balanced = 1/{n_exp} = {1 / n_exp:.3f})",
                      xaxis=dict(title="expert", type="category"), yaxis=dict(title="layer", type="category"))
    return fig


def expert_time_heatmap(mat: pd.DataFrame, layer: int) -> go.Figure:
    """Load per (expert, time bucket) of one layer."""
    if mat is None or not len(mat):
        return message_figure(f"No expert load recorded for layer {layer}.")
    n_exp = mat.shape[0]
    z = mat.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=list(mat.columns), y=[str(i) for i in mat.index],
                               **_balanced_scale(z, 1.0 / n_exp), colorbar=dict(title="load"),
                               hovertemplate="step ~%{x}, expert %{y}: %{z:.3f}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(260, 90 + 18 * n_exp), title=f"Layer {layer}: expert load over training",
                      xaxis=dict(title="step"), yaxis=dict(title="expert", type="category"))
    return fig


def imbalance_figure(imb: pd.DataFrame, metrics: pd.DataFrame | None = None) -> go.Figure:
    """Top: load imbalance (max / mean) per layer over training, from the experts table, with the logged
    `imbalance` metric dashed; bottom: the dropped-token fraction (metric `drop_frac`)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.65, 0.35],
                        subplot_titles=("load imbalance (max / mean load)", "dropped-token fraction"))
    for i, (layer, d) in enumerate(imb.groupby("layer", sort=True)) if len(imb) else []:
        fig.add_scatter(x=d["step"], y=d["imbalance"], mode="lines", name=f"layer {layer}",
                        line=dict(color=PALETTE[i % len(PALETTE)], width=1.5), row=1, col=1)
    if metrics is not None and len(metrics):
        if "imbalance" in metrics and metrics["imbalance"].notna().any():
            fig.add_scatter(x=metrics["step"], y=metrics["imbalance"], mode="lines", name="imbalance (logged)",
                            line=dict(color="black", dash="dash"), row=1, col=1)
        if "drop_frac" in metrics and metrics["drop_frac"].notna().any():
            fig.add_scatter(x=metrics["step"], y=metrics["drop_frac"], mode="lines", name="drop_frac (logged)",
                            line=dict(color="#d62728"), row=2, col=1)
        else:
            fig.add_annotation(text="drop_frac not logged", x=0.5, y=0.12, xref="paper", yref="paper",
                               showarrow=False)
    fig.update_layout(**_LAYOUT, height=520, title="Routing balance over training")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def domain_heatmap(share: pd.DataFrame, step: int | None, layer: int, trial: str = "") -> go.Figure:
    """Share of each domain's routed tokens per expert (share: domain x expert, rows sum to 1, from
    `query.domain_share_at`); white = the uniform share 1/E, red = an expert the domain prefers."""
    if share is None or not len(share):
        return message_figure(f"No domain routing recorded for layer {layer}.")
    n_exp = share.shape[1]
    z = share.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in share.columns], y=[str(i) for i in share.index],
                               **_balanced_scale(z, 1.0 / n_exp), colorbar=dict(title="share"),
                               hovertemplate="domain %{y}, expert %{x}: %{z:.3f} of the domain's tokens"
                                             "<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(260, 90 + 28 * share.shape[0]),
                      title=f"Layer {layer} at step {step} {trial}: where each domain's tokens go "
                            f"(rows sum to 1; uniform = 1/{n_exp})",
                      xaxis=dict(title="expert", type="category"), yaxis=dict(title="domain", type="category"))
    return fig


def specialisation_figure(spec: pd.DataFrame) -> go.Figure:
    """Specialisation I(domain; expert) / H(domain) per layer over training (`query.specialisation`)."""
    if spec is None or not len(spec):
        return message_figure("No domain routing recorded for this trial.")
    fig = go.Figure()
    for i, (layer, d) in enumerate(spec.groupby("layer", sort=True)):
        fig.add_scatter(x=d["step"], y=d["specialisation"], mode="lines", name=f"layer {layer}",
                        line=dict(color=PALETTE[i % len(PALETTE)], width=1.5))
    fig.update_layout(**_LAYOUT, height=360, title="Expert specialisation: I(domain; expert) / H(domain) "
                      "(0 = routing ignores the domain, 1 = each expert sees one domain)",
                      xaxis=dict(title="step"), yaxis=dict(title="specialisation", range=[0, 1.02]))
    return fig


def parallel_figure(frame: pd.DataFrame, axes: Sequence[str], metric: str) -> go.Figure:
    """Parallel coordinates over the axis values and the final metric, coloured by the metric. Categorical
    (or mixed-type) axes get one tick per value."""
    if not len(frame) or not len(axes):
        return message_figure("No trials on a sweep grid with a finite " + metric + ".")
    dims = []
    for a in axes:
        col = frame[a]
        num = pd.to_numeric(col, errors="coerce")
        if num.notna().all() and col.map(lambda v: isinstance(v, (int, float, np.number))).all():
            vals = sorted(num.unique())
            if len(vals) <= 12:
                dims.append(dict(label=a, values=num, tickvals=vals, ticktext=[fmt_value(float(v)) for v in vals]))
            else:
                dims.append(dict(label=a, values=num))
        else:
            cats = list(dict.fromkeys(col.map(fmt_value)))
            codes = col.map(fmt_value).map({c: i for i, c in enumerate(cats)})
            dims.append(dict(label=a, values=codes, tickvals=list(range(len(cats))), ticktext=cats))
    y = frame[metric].astype(float)
    dims.append(dict(label=metric, values=y))
    fig = go.Figure(go.Parcoords(line=dict(color=y, colorscale="Viridis_r", showscale=True,
                                           colorbar=dict(title=metric)), dimensions=dims))
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=80, r=40, t=80, b=40)}, height=480,
                      title=f"{len(frame)} trials: axis values and {metric}")
    return fig
