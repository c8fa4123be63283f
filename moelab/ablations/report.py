"""`moelab fit`'s presentation: the terminal summary, the self-contained HTML report and the fits table.

    from moelab.ablations.report import run_fit, summary_text
    analysis, html = run_fit("results/", sweep="noise")   # fits table written, report written
    print(summary_text(analysis))

The numbers come from `moelab.ablations.analysis` (which says how each is made); this module only shows
them and files them (`write_fits` -> `moelab.platform.fitstable`). Every leverage is printed with the point
it holds at (compute, or size and tokens), its interval, and a mark when it is extrapolated; an interval
with no finite upper end says so.
"""

from __future__ import annotations

import html
import math
import os
import uuid
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moelab.ablations.analysis import Analysis, analyse, fit_rows, group_order
from moelab.ablations.fits import frontier_loss
from moelab.platform.fitstable import fits_table, read_fits, write_fits_table

__all__ = ["write_fits", "read_fits", "write_report", "summary_text", "run_fit", "default_report_path"]


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
    if isinstance(hi, (float, np.floating)) and math.isinf(hi):
        return f" [{_fmt(lo)}, no finite upper end]"
    return f" [{_fmt(lo)}, {_fmt(hi)}]"


def write_fits(root: str | os.PathLike, analysis: Analysis, *, filesystem: Any = None) -> str | None:
    """Write `analysis`'s rows to ROOT/fits/sweep=S/fits.parquet (replacing an earlier run's); returns the
    path, or None when there is no sweep to file them under (an empty store)."""
    if analysis.sweep is None:
        return None
    return write_fits_table(os.fspath(root), analysis.sweep, fits_table(fit_rows(analysis)), filesystem=filesystem)


# ----------------------------------------------------------------------------------------------------------
# Text summary


def _leverage_lines(a: Analysis) -> list[str]:
    pct = f"{a.confidence:.0%}"
    lines = []
    fl = a.family_leverage
    if fl is not None and len(fl):
        lines.append(f"efficiency leverage per MoE family, C_dense(L_moe(C)) / C from the family's own law against "
                     f"the dense law ({pct} CI: both bootstraps; * = the dense law is extrapolated there):")
        width = max(len(str(g)) for g in fl["group"])
        for g, rows in fl.groupby("group", sort=False):
            cells = [f"C={_fmt(r['at_compute'], 2)}: {_fmt(r['leverage'])}{'*' if r['extrapolated'] else ''}"
                     f"{_interval_text(r['leverage_lo'], r['leverage_hi'])}" for _, r in rows.iterrows()]
            lines.append(f"  {str(g).ljust(width)}  " + "   ".join(cells) + f"   ({int(rows['n_trials'].iloc[0])} trials)")
    sl = a.size_leverage
    if sl is not None and len(sl):
        lines.append(f"leverage per MoE family and size (geometric mean over seeds, {pct} CI: dense bootstrap and "
                     f"the runs' seed noise; * = extrapolated):")
        width = max(len(str(g)) for g in sl["group"])
        with_law = set(fl["group"]) if fl is not None and len(fl) else set()
        if with_law:
            lines.append(f"  ({len(with_law)} famil{'y' if len(with_law) == 1 else 'ies'} with a law above: their "
                         f"per-size figures are in the report and the fits table)")
        for _, r in sl[~sl["group"].isin(with_law)].iterrows():
            cells = []
            for kind in ("parameter", "compute"):
                star = "*" if r[f"{kind}_extrapolated"] else ""
                inf = f" ({int(r[f'{kind}_n_inf'])} below the dense floor)" if r[f"{kind}_n_inf"] else ""
                cells.append(f"{kind} {_fmt(r[f'{kind}_leverage'])}{star}"
                             f"{_interval_text(r[f'{kind}_leverage_lo'], r[f'{kind}_leverage_hi'])}{inf}")
            lines.append(f"  {str(r['group']).ljust(width)}  N={_fmt(r['N'])} D={_fmt(r['D'])} C={_fmt(r['C'], 2)}: "
                         + "   ".join(cells) + f"   (seeds={int(r['seeds'])})")
    if a.noise:
        parts = sorted({f"{n.sd:.2%} ({n.source})" for n in a.noise.values()})
        lines.append("seed noise of log-loss used in the intervals: " + "; ".join(parts))
    t = a.trials
    if "leverage_note" in t and (t["leverage_note"] != "").any():
        lines.append(f"{int((t['leverage_note'] != '').sum())} trial(s) have parameter and compute leverage on "
                     f"opposite sides of 1 (trained far from the dense compute-optimal tokens per parameter; see "
                     f"the fits table's message column)")
    return lines


def _effect_lines(a: Analysis) -> list[str]:
    lines = []
    for axis, per_metric in a.effects.items():
        for metric, eff in per_metric.items():
            if metric.startswith("compute"):
                continue  # keep the terminal short: loss and parameter leverage
            base = eff.index[eff["is_baseline"]][0]
            cells = []
            for value, row in eff.iterrows():
                if row["is_baseline"]:
                    continue
                p = row.get("p_holm", np.nan)
                ptxt = f", p_holm={_fmt(p, 2)}" if np.isfinite(p) else ""
                note = f", {row['note']}" if row["note"] else ""
                inf = f", {int(row['n_inf'])} inf" if row["n_inf"] else ""
                cells.append(f"{_fmt(value)}: {row['diff']:+.3g}{_interval_text(row['diff_lo'], row['diff_hi'])} "
                             f"({row['method']}, n={int(row['n'])}{ptxt}{inf}{note})")
            detail = "; ".join(cells) if cells else "one value only"
            lines.append(f"effect of {axis} on {metric} vs {_fmt(base)} (mean {_fmt(eff.loc[base, 'mean'])}): {detail}")
    if a.effects:
        lines.append("effects: differences paired by seed within blocks of the other axes, size and budget; "
                     "p-values Holm-corrected across every contrast of a metric")
    return lines


def _floor_lines(a: Analysis, fit: Any) -> list[str]:
    """E beside the synthetic source's Bayes-optimal loss: on data whose floor is known, a sound design's E
    recovers it (within a few percent); a distant E means the runs do not pin the law's asymptote."""
    fl = a.data_floor
    if fl is None:
        return []
    bayes, E = fl["bayes_loss"], fit.E
    lo, hi = (fit.intervals or {}).get("E", (None, None))
    covered = lo is not None and hi is not None and lo <= bayes <= hi
    verdict = ("agrees within 5%" if abs(E / bayes - 1) <= 0.05 else
               "does not agree: the runs stop too far above the floor to pin the law's asymptote")
    return [f"  E = {_fmt(E)}{_interval_text(lo, hi)} against the data's Bayes-optimal loss {bayes:.4f} "
            f"({fl['describe']}, seq {fl['seq_len']}): E is {E / bayes - 1:+.1%} off, {verdict}"
            + ("" if lo is None else f"; the interval {'covers' if covered else 'misses'} it")]


def summary_text(a: Analysis, *, notes: bool = True) -> str:
    """A short plain-text summary for the terminal (notes and skipped fits last, unless notes=False)."""
    t = a.trials
    lines = []
    head = f"moelab fit: sweep {a.sweep!r}" if a.sweep else f"moelab fit: {a.root}"
    if len(t) and "usable" in t:
        fam = t["family"].value_counts()
        head += (f": {len(t)} trials ({int(fam.get('dense', 0))} dense, {int(fam.get('moe', 0))} MoE), "
                 f"{int(t['usable'].sum())} usable; points={a.points}, loss={a.loss}, N={a.n_column}, "
                 f"n_boot={a.n_boot}")
    lines.append(head)
    pct = f"{a.confidence:.0%}"
    for g in group_order(a):
        f = a.family_fits.get(g)
        if f is None:
            continue
        iv = f.intervals or {}
        parts = [f"{k}={_fmt(getattr(f, k))}{_interval_text(*iv.get(k, (None, None)))}"
                 for k in ("E", "A", "B", "alpha", "beta")]
        lines.append(f"{g} L(N,D) = E + A/N^alpha + B/D^beta ({f.n_points} points, {pct} CI): " + ", ".join(parts))
        if g == "dense":
            lines += _floor_lines(a, f)
    lines += _leverage_lines(a)
    if a.el_law is not None:
        f, iv = a.el_law, a.el_law.intervals or {}
        parts = [f"{k}={_fmt(v)}{_interval_text(*iv.get(k, (None, None)))}" for k, v in f.params.items()]
        lines.append(f"efficiency-leverage law (Tian et al. 2025 Eq. 13, {f.n_points} points from {f.points} in "
                     f"{f.n_groups} families): " + ", ".join(parts) + f"; optimal G = 2 d_model / d_expert = "
                     f"{_fmt(f.optimal_granularity())} (`moelab advise --fits` uses it)")
    if a.granularity is not None:
        g = a.granularity
        lines.append(f"granularity law: c={_fmt(g.c)}, g={_fmt(g.g)}, gamma={_fmt(g.gamma)}, a={_fmt(g.a)}, "
                     f"alpha={_fmt(g.alpha)}, b={_fmt(g.b)}, beta={_fmt(g.beta)} ({g.n_points} points)")
    lines += _effect_lines(a)
    if notes:
        lines += [f"note: {n}" for n in a.notes]
        lines += [f"skipped: {what}: {why}" for what, why in a.skipped]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# HTML report

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]


def _rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    return f"rgba({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{alpha})"


def _group_colors(a: Analysis) -> dict[str, str]:
    return {g: _COLORS[i % len(_COLORS)] for i, g in enumerate(group_order(a))}


def _band(boot: np.ndarray | None, predict, x: np.ndarray, confidence: float):
    if boot is None or not len(boot):
        return None
    curves = np.stack([predict(p, x) for p in boot])
    tail = (1 - confidence) / 2
    with np.errstate(invalid="ignore"):
        return np.nanquantile(curves, tail, axis=0), np.nanquantile(curves, 1 - tail, axis=0)


def _fig_compute(a: Analysis, go: Any) -> Any | None:
    if not a.family_fits and (a.curve_points is None or a.curve_points.empty):
        return None
    colors = _group_colors(a)
    fig = go.Figure()
    t = a.trials
    use = t[t["usable"]] if len(t) else t
    for g, color in colors.items():
        fin = use[use["group"] == g] if len(use) else use
        if len(fin):
            fig.add_trace(go.Scatter(x=fin["C"], y=fin["L"], mode="markers", name=f"{g}: trials",
                                     legendgroup=g, text=fin["trial_id"],
                                     marker=dict(color=color, size=8, symbol="diamond" if g == "dense" else "circle",
                                                 line=dict(width=1, color="white"))))
        fit = a.family_fits.get(g)
        if fit is None or not len(fin):
            continue
        fpt = a.fpt[g]
        x = np.geomspace(fin["C"].min(), fin["C"].max(), 120)
        band = _band(fit.boot_params, lambda p, c: frontier_loss(p, c, fpt), x, a.confidence)
        if band is not None:
            fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[band[1], band[0][::-1]], fill="toself",
                                     fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip",
                                     name=f"{g}: {a.confidence:.0%} band", legendgroup=g, showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=frontier_loss(fit.params, x, fpt), mode="lines", legendgroup=g,
                                 line=dict(color=color, width=2), name=f"{g}: compute-optimal frontier"))
    fig.update_layout(title="Loss vs training compute: trials and each law's compute-optimal frontier "
                            "(bands: bootstrap)",
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


def _error_bars(val: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    """Asymmetric error bars; an infinite upper end is drawn up to 10x the value (the table says "no finite
    upper end")."""
    hi = np.where(np.isfinite(hi), hi, 10 * val)
    return dict(type="data", symmetric=False, array=np.nan_to_num(hi - val), arrayminus=np.nan_to_num(val - lo))


def _fig_leverage(a: Analysis, go: Any, make_subplots: Any) -> Any | None:
    fl, sl = a.family_leverage, a.size_leverage
    if (fl is None or not len(fl)) and (sl is None or not len(sl)):
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "compute leverage vs compute (lines: family law; markers: per size)",
        "parameter leverage N_dense(L, D) / N_active per size"])
    colors = _group_colors(a)
    for g in group_order(a):
        if g == "dense":
            continue
        color = colors.get(g)
        fam = fl[fl["group"] == g] if fl is not None and len(fl) else pd.DataFrame()
        if len(fam):
            v = fam["leverage"].to_numpy(float)
            fig.add_trace(go.Scatter(x=fam["at_compute"], y=v, mode="lines+markers", legendgroup=g, name=f"{g}: family",
                                     error_y=_error_bars(v, fam["leverage_lo"].to_numpy(float),
                                                         fam["leverage_hi"].to_numpy(float)),
                                     marker=dict(size=11, color=color, symbol="diamond")), row=1, col=1)
        size = sl[sl["group"] == g] if sl is not None and len(sl) else pd.DataFrame()
        if not len(size):
            continue
        for col, kind, x in ((1, "compute", size["C"]), (2, "parameter", size["N"])):
            v = size[f"{kind}_leverage"].to_numpy(float)
            extra = size[f"{kind}_extrapolated"].astype(bool).to_numpy()
            fig.add_trace(go.Scatter(
                x=x, y=v, mode="markers", legendgroup=g, showlegend=not len(fam) and col == 1, name=f"{g}: per size",
                error_y=_error_bars(v, size[f"{kind}_leverage_lo"].to_numpy(float),
                                    size[f"{kind}_leverage_hi"].to_numpy(float)),
                text=[f"N={_fmt(n)}, D={_fmt(d)}" for n, d in zip(size["N"], size["D"])],
                marker=dict(size=7, color=color, opacity=0.7, symbol=["circle-open" if e else "circle" for e in extra])),
                row=1, col=col)
    for col in (1, 2):
        fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="training FLOPs C", row=1, col=1)
    fig.update_xaxes(type="log", title_text="active non-embedding parameters N", row=1, col=2)
    fig.update_layout(title=f"Leverage over dense ({a.confidence:.0%} CI: dense bootstrap + seed noise; "
                            f"open markers: extrapolated)", template="plotly_white", height=480,
                      legend=dict(font=dict(size=10)))
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
                            f"{a.confidence:.0%} interval paired by seed",
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
        sections.append("<h2>Efficiency leverage per MoE family, at stated compute budgets</h2>")
        sections.append(_table_html(a.family_leverage))
    if a.size_leverage is not None and len(a.size_leverage):
        sections.append("<h2>Leverage per MoE family and size (geometric mean over seeds)</h2>")
        sections.append(_table_html(a.size_leverage))
    if a.effects:
        sections.append("<h2>Per-axis effects</h2>")
        for axis, per in a.effects.items():
            for metric, eff in per.items():
                sections.append(f"<h3>{html.escape(axis)} — {html.escape(metric)}</h3>")
                sections.append(_table_html(eff.reset_index()))
    fits = fits_table(fit_rows(a)).drop_columns(["created_at"]).to_pandas()
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
        a.notes.append(f"fits table: {fits_path} ({len(fit_rows(a))} rows)")
    out = os.fspath(report_path) if report_path is not None else default_report_path(root, a.sweep)
    a.notes.append(f"report: {out}")
    return a, write_report(a, out)
