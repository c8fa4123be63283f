"""The results dashboard: a Dash app over one results store, read-only.

    from moelab.dashboards.app import serve
    serve("results/")                       # http://127.0.0.1:8050, `moelab dashboard results/`

Views (tabs): sweeps overview, runs table, curves, axis effects, scaling & leverage, experts, parallel
coordinates. The page URL holds the state (`?view=curves&sweep=noise&metric=loss&x=tokens&log=x,y&group=family`),
so a view can be shared; unknown or malformed parameters fall back to defaults. Parameters: view, sweep,
status and family (comma lists, "none" = empty), metric, x (step / tokens / flops / wall_s), log (x,y), smooth
(EMA weight), group ("seeds" = mean over seeds [default], "none", or comma-joined config keys), axis, baseline,
split, emetric (effects metric), color (scaling), trial, step, layer (experts: the layer whose load over time
and domain routing are shown), pmetric (parallel coordinates), differ=0 (all config columns), refresh=0 (no
auto-refresh). Every table has a CSV button; every figure a PNG button (Plotly's mode bar).
While the page is open it re-reads the store every `refresh_s` seconds (only files that changed are read,
and a view is redrawn only when its sweep's files changed).

Data comes from `moelab.dashboards.query` (cached Reader + pure functions), figures from
`moelab.dashboards.figures`. A callback that fails shows a one-line message in its view, never a traceback
(the traceback goes to the server log).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any, Callable

import dash
import dash_ag_grid as dag
import pandas as pd
from dash import Input, Output, Patch, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from moelab.dashboards import figures as F
from moelab.dashboards import query as Q

__all__ = ["create_app", "serve", "Views", "VIEWS"]

log = logging.getLogger("moelab.dashboards")

VIEWS = {"overview": "Sweeps", "runs": "Runs", "curves": "Curves", "effects": "Axis effects",
         "scaling": "Scaling & leverage", "experts": "Experts", "parallel": "Parallel coordinates"}
STATUSES = [*Q.STATUSES]
GROUP_SEEDS = "seeds"  # URL token for Q.ALL_BUT_SEED
_HIDDEN = {"display": "none"}
_SHOWN = {"display": "block"}
_ROW = {"display": "flex", "gap": "18px", "flexWrap": "wrap", "alignItems": "flex-end", "marginBottom": "8px"}

# URL parameter -> (component id, property). The order is the order of the sync callback's arguments.
CONTROLS = {
    "view": ("view", "value"), "sweep": ("sweep", "value"), "status": ("status", "value"),
    "family": ("family", "value"), "metric": ("curves-metric", "value"), "x": ("curves-x", "value"),
    "log": ("curves-log", "value"), "smooth": ("curves-smooth", "value"), "group": ("curves-group", "value"),
    "axis": ("effects-axis", "value"), "baseline": ("effects-baseline", "value"),
    "split": ("effects-split", "value"), "emetric": ("effects-metric", "value"),
    "color": ("scaling-color", "value"), "trial": ("experts-trial", "value"), "step": ("experts-step", "value"),
    "layer": ("experts-layer", "value"), "pmetric": ("parallel-metric", "value"),
    "differ": ("runs-differ", "value"), "refresh": ("refresh", "value"),
}
OPTIONS = [("sweep", "options"), ("family", "options"), ("curves-group", "options"), ("effects-axis", "options"),
           ("effects-baseline", "options"), ("effects-split", "options"), ("effects-metric", "options"),
           ("scaling-color", "options"), ("experts-trial", "options"), ("parallel-metric", "options"),
           ("experts-step", "max"), ("experts-step", "marks")]


# ----------------------------------------------------------------------------------------------------------
# URL state


def _first(params: dict[str, list[str]], key: str) -> str | None:
    v = params.get(key)
    return v[0] if v else None


def _list(params: dict[str, list[str]], key: str) -> list[str] | None:
    v = _first(params, key)
    return None if v is None else [s for s in v.split(",") if s]


def _float(text: str | None, default: float, lo: float, hi: float) -> float:
    try:
        v = float(text) if text is not None else default
    except ValueError:
        return default
    return min(max(v, lo), hi) if math.isfinite(v) else default


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except (ValueError, OverflowError):
        return None


def parse_state(search: str | None) -> dict[str, Any]:
    """The raw state in a URL query string. Unknown keys are ignored; values are checked later against
    what the store holds (`_normalise`)."""
    params = urllib.parse.parse_qs((search or "").lstrip("?"), keep_blank_values=True, max_num_fields=100)
    group = _list(params, "group")
    return {
        "view": _first(params, "view"), "sweep": _first(params, "sweep"), "status": _list(params, "status"),
        "family": _list(params, "family"), "metric": _first(params, "metric"), "x": _first(params, "x"),
        "log": _list(params, "log") or [], "smooth": _float(_first(params, "smooth"), 0.0, 0.0, 0.99),
        "group": None if group is None else ([] if group == ["none"] else group),
        "axis": _first(params, "axis"), "baseline": _first(params, "baseline"), "split": _first(params, "split"),
        "emetric": _first(params, "emetric"), "color": _first(params, "color"), "trial": _first(params, "trial"),
        "step": _int(_first(params, "step")), "layer": _int(_first(params, "layer")),
        "pmetric": _first(params, "pmetric"),
        "differ": _first(params, "differ") != "0", "refresh": _first(params, "refresh") != "0",
    }


def encode_state(state: dict[str, Any]) -> str:
    """The query string of a normalised state (defaults left out, lists comma-joined). `state["_defaults"]`
    (set by the app) holds the store-dependent defaults (first axis, all families, ...)."""
    dflt = state.get("_defaults", {})
    out: dict[str, str] = {"view": state["view"]}
    if state.get("sweep"):
        out["sweep"] = state["sweep"]
    for key in ("status", "family"):
        v = state.get(key)
        if v is not None and (key not in dflt or set(v) != set(dflt[key])):
            out[key] = ",".join(v) or "none"
    defaults = {"metric": "loss", "x": "step", "emetric": "final_loss", "pmetric": "final_loss"}
    for key in ("metric", "x", "axis", "baseline", "split", "emetric", "color", "trial", "pmetric"):
        v = state.get(key)
        if v not in (None, "") and v != defaults.get(key) and v != dflt.get(key):
            out[key] = str(v)
    if state.get("log"):
        out["log"] = ",".join(state["log"])
    if state.get("smooth"):
        out["smooth"] = f"{state['smooth']:g}"
    g = state.get("group")
    if g is not None and g != [GROUP_SEEDS]:
        out["group"] = ",".join(g) or "none"
    for key in ("step", "layer"):
        if state.get(key) is not None and state[key] != dflt.get(key, 0 if key == "layer" else None):
            out[key] = str(int(state[key]))
    if not state.get("differ", True):
        out["differ"] = "0"
    if not state.get("refresh", True):
        out["refresh"] = "0"
    return "?" + urllib.parse.urlencode(out, safe=",")


def _controls_state(values: list[Any]) -> dict[str, Any]:
    s = dict(zip(CONTROLS, values))
    s["log"] = s.get("log") or []
    s["differ"] = bool(s.get("differ"))
    s["refresh"] = bool(s.get("refresh"))
    s["smooth"] = float(s["smooth"] or 0.0)
    if s.get("group") is not None:
        s["group"] = [GROUP_SEEDS if g == Q.ALL_BUT_SEED else g for g in s["group"]]
    return s


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _opts(values: list[Any], labels: dict[Any, str] | None = None) -> list[dict[str, Any]]:
    return [{"label": (labels or {}).get(v, str(v)), "value": v} for v in values]


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows: NaN / NaT -> None, numpy scalars -> Python."""
    if not len(df):
        return []
    out = df.astype(object).where(df.notna(), None)
    return out.to_dict("records")


def _column_defs(df: pd.DataFrame, pinned: tuple[str, ...] = ("trial_id",)) -> list[dict[str, Any]]:
    defs = []
    for c in df.columns:
        d: dict[str, Any] = {"field": c, "headerName": c, "headerTooltip": c}
        if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]):
            d["filter"] = "agNumberColumnFilter"
            if pd.api.types.is_float_dtype(df[c]):
                d["valueFormatter"] = {"function": "params.value == null ? '' : d3.format('.5~g')(params.value)"}
        else:
            d["filter"] = "agTextColumnFilter"
        if c in pinned:
            d["pinned"] = "left"
        if c == "status":
            d["cellStyle"] = {"styleConditions": [
                {"condition": f"params.value == '{s}'", "style": {"color": col, "fontWeight": "bold"}}
                for s, col in F.STATUS_COLORS.items()]}
        if c == "error":
            d["tooltipField"] = "error"
            d["minWidth"] = 220
        if c == "trial_id":
            d["minWidth"] = 300
        defs.append(d)
    return defs


def _grid(id_: str, page_size: int = 50) -> dag.AgGrid:
    return dag.AgGrid(
        id=id_, rowData=[], columnDefs=[],
        defaultColDef={"sortable": True, "filter": True, "resizable": True, "floatingFilter": True,
                       "minWidth": 90},
        dashGridOptions={"pagination": True, "paginationPageSize": page_size, "domLayout": "autoHeight",
                         "suppressFieldDotNotation": True, "enableCellTextSelection": True,
                         "tooltipShowDelay": 300, "animateRows": False},
        columnSize="autoSize", style={"width": "100%"})


def _csv_button(id_: str, label: str = "CSV") -> html.Span:
    return html.Span([html.Button(f"Download {label}", id=f"{id_}-csv", n_clicks=0),
                      dcc.Download(id=f"{id_}-download")])


def _note(id_: str) -> html.Div:
    return html.Div(id=id_, className="note", style={"color": "#8a5300", "margin": "6px 0"})


def _labelled(label: str, component: Any, width: str | None = None) -> html.Div:
    return html.Div([html.Label(label, style={"fontSize": "12px", "color": "#555", "display": "block"}), component],
                    style={"minWidth": width} if width else {})


def _metric_labels(has_leverage: bool) -> list[dict[str, Any]]:
    opts = [{"label": "final loss", "value": "final_loss"}, {"label": "final eval loss", "value": "final_eval_loss"}]
    if has_leverage:
        opts.append({"label": "leverage (compute, vs dense law)", "value": "leverage"})
    return opts


# ----------------------------------------------------------------------------------------------------------
# What the views show

class Views:
    """What each view shows, computed from the store: figures and the frames behind them (the CSV buttons
    download those frames). The app's callbacks call these; so does bench/dashboard_bench.py."""

    def __init__(self, reader: Q.Reader, memo_size: int = 16):
        self.reader = reader
        self._memo: OrderedDict[tuple, Q.CurveData] = OrderedDict()
        self._memo_size = memo_size
        self._lock = threading.Lock()

    def _curve_data(self, sweep: str, trials: pd.DataFrame, *args: Any, **kw: Any) -> Q.CurveData:
        """Q.curve_data, remembered for the last few (sweep files, trials, arguments): switching views, log y
        or back to an earlier grouping costs nothing until the sweep's files change."""
        key = (sweep, self.reader.version(sweep), tuple(trials["trial_id"]), args, tuple(sorted(kw.items())))
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        cd = Q.curve_data(self.reader, sweep, trials, *args, **kw)
        with self._lock:
            self._memo[key] = cd
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return cd

    def trials(self, sweep: str | None, status: list[str] | None = None,
               family: list[str] | None = None) -> pd.DataFrame:
        t = self.reader.trials()
        return t.iloc[0:0] if sweep is None else Q.filter_trials(t, sweep, status, family)

    def dense_law(self, sweep: str) -> Q.DenseLaw | None:
        """The sweep's dense compute law: from its `fits` table when that has one, else fitted on all of the
        sweep's finished dense runs (whatever the status / family filter)."""
        law = Q.fits_law(self.reader.fits(sweep))
        return law if law is not None else Q.dense_law(self.trials(sweep))

    def with_leverage(self, sweep: str, trials: pd.DataFrame) -> tuple[pd.DataFrame, Q.DenseLaw | None]:
        law = self.dense_law(sweep)
        return Q.with_leverage(trials, law), law

    def overview(self) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
        trials = self.reader.trials()
        ov = Q.sweeps_overview(trials, self.reader.sweeps())
        fails = Q.recent_failures(trials)
        if "updated_at" in fails:
            fails["updated_at"] = fails["updated_at"].astype(str)
        return F.overview_figure(ov), ov, fails

    def runs(self, trials: pd.DataFrame, only_differing: bool = True) -> pd.DataFrame:
        return Q.runs_table(trials, only_differing=only_differing)

    def curve_data(self, sweep: str, trials: pd.DataFrame, metric: str = "loss", x: str = "step",
                   log: list[str] | None = None, smooth: float = 0.0, group: Any = (Q.ALL_BUT_SEED,)) -> Q.CurveData:
        grp = Q.ALL_BUT_SEED if group and Q.ALL_BUT_SEED in group else (tuple(group) if group else None)
        return self._curve_data(sweep, trials, metric, x, group=grp, smoothing=float(smooth or 0),
                                log_x="x" in (log or []))

    def curves(self, sweep: str, trials: pd.DataFrame, metric: str = "loss", x: str = "step",
               log: list[str] | None = None, smooth: float = 0.0, group: Any = (Q.ALL_BUT_SEED,)):
        cd = self.curve_data(sweep, trials, metric, x, log, smooth, group)
        rev = f"{sweep}|{metric}|{x}|{','.join(log or [])}"
        return F.curves_figure(cd, log_x="x" in (log or []), log_y="y" in (log or []), uirevision=rev), cd

    def effects_frame(self, sweep: str, trials: pd.DataFrame, axis: str, metric: str = "final_loss",
                      baseline: Any = None, split: str | None = None) -> pd.DataFrame:
        if metric == "leverage":
            trials, law = self.with_leverage(sweep, trials)
            if law is None:
                raise ValueError("leverage needs a dense law: the sweep has fewer than 2 dense compute budgets "
                                 "finished and no `fits` table")
        return Q.axis_effects(trials, axis, metric, baseline=baseline, split=split)

    def effects(self, sweep: str, trials: pd.DataFrame, axis: str, metric: str = "final_loss",
                baseline: Any = None, split: str | None = None):
        eff = self.effects_frame(sweep, trials, axis, metric, baseline, split)
        return F.effects_figure(eff, axis, metric), eff

    def scaling(self, sweep: str, trials: pd.DataFrame, color: str | None = None):
        """(figure, per-label leverage summary, points, law, trials with leverage)."""
        law = self.dense_law(sweep)
        tl = Q.with_leverage(trials, law)
        pts = Q.scaling_points(tl, color)
        done = tl[tl["status"] == "finished"]
        curves = None
        if len(done):
            cd = self._curve_data(sweep, done, "loss", "flops", group=("family",), log_x=True, point_budget=30_000,
                                  aggregate=False)
            if len(cd.runs):
                fam = dict(zip(done["trial_id"], done["family"] if "family" in done else "moe"))
                curves = cd.runs.assign(group=cd.runs["run"].map(fam))
        moe = pts[pts["family"] == "moe"]
        summary = moe.groupby("label").agg(
            n=("trial_id", "size"), mean_loss=("L", "mean"), mean_compute=("C", "mean"),
            mean_leverage=("leverage", "mean"), min_leverage=("leverage", "min"),
            max_leverage=("leverage", "max")).reset_index() if len(moe) else pd.DataFrame()
        return F.scaling_figure(pts, law, curves), summary, pts, law, tl

    def experts_data(self, sweep: str, trial: str, step: int | None = None, layer: int = 0):
        e = self.reader.experts(sweep, trial)
        used, mat = Q.expert_load_at(e, step)
        over = Q.expert_load_over_time(e, int(layer or 0))
        imb = Q.expert_imbalance(e) if len(e) else pd.DataFrame(columns=["step", "layer", "imbalance", "cv"])
        m = self.reader.metrics(sweep, [trial], ["imbalance", "drop_frac"])
        return e, used, mat, over, imb, m

    def routing_data(self, sweep: str, trial: str, step: int | None = None, layer: int = 0):
        """(routing rows, step used, domain x expert share at `layer`, specialisation per step and layer)."""
        r = self.reader.routing(sweep, trial)
        used, share = Q.domain_share_at(r, int(layer or 0), step)
        return r, used, share, Q.specialisation(r)

    @staticmethod
    def _no_routing(row: pd.Series | None) -> str:
        """Why a trial has no `routing` rows, for the page."""
        source = row.get("data.source") if row is not None else None
        if isinstance(source, str) and source != "synthetic":  # NaN: a store without the config column
            return (f"No expert-vs-domain routing: it needs data with known domains (data.source synthetic); "
                    f"this run's source is {source!r}.")
        return ("No expert-vs-domain routing for this trial: the `routing` table has no rows for it (it is "
                "written for MoE runs on the synthetic source; this run has not logged any yet, or predates it).")

    def experts(self, sweep: str, trials: pd.DataFrame, trial: str, step: int | None = None, layer: int = 0):
        """(load heatmap, load-over-time heatmap, domain routing heatmap, specialisation figure, imbalance
        figure, notes, expert rows)."""
        e, used, mat, over, imb, m = self.experts_data(sweep, trial, step, layer)
        r, r_used, share, spec = self.routing_data(sweep, trial, step, layer)
        notes = []
        if not len(e):
            notes.append("This trial has no rows in the `experts` table (not recorded yet, or a dense run).")
        layers = sorted(e["layer"].unique()) if len(e) else []
        if len(e) and int(layer or 0) not in layers:
            notes.append(f"Layer {layer} is not recorded; layers: {layers[0]}..{layers[-1]}.")
        rows = trials[trials["trial_id"] == trial]
        if len(r):
            domain_fig = F.domain_heatmap(share, r_used, int(layer or 0), trial)
            spec_fig = F.specialisation_figure(spec)
        else:
            msg = self._no_routing(rows.iloc[0] if len(rows) else None)
            notes.append(msg)
            domain_fig, spec_fig = F.message_figure(msg), F.message_figure("")
        return (F.expert_heatmap(mat, used, trial), F.expert_time_heatmap(over, int(layer or 0)), domain_fig,
                spec_fig, F.imbalance_figure(imb, m), " ".join(notes), e)

    def parallel(self, sweep: str, trials: pd.DataFrame, metric: str = "final_loss"):
        if metric == "leverage":
            trials, _ = self.with_leverage(sweep, trials)
        frame = Q.parallel_frame(trials, metric)
        return F.parallel_figure(frame, Q.axis_keys(trials), metric), frame


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(root: str | os.PathLike, *, refresh_s: float = 10.0, prewarm: bool = True,
               title: str = "moelab results") -> dash.Dash:
    """A Dash app showing the store under `root` (a directory or a pyarrow.fs URI). The root need not exist
    yet: the page says so and picks it up on a later refresh. `prewarm` reads the trials and the newest
    sweep's loss curves in a background thread so the first page load is fast."""
    reader = Q.Reader(root)
    app = dash.Dash(__name__, title=title, update_title=None, suppress_callback_exceptions=False)
    app.reader = reader  # for tests and notebooks

    views = Views(reader)
    app.views = views

    def _trials() -> pd.DataFrame:
        return reader.trials()

    # -- layout -------------------------------------------------------------------------------------------------
    header = html.Div([
        html.H2(title, style={"margin": "4px 0"}),
        html.Div(f"store: {reader.uri}", style={"color": "#666", "fontSize": "13px"}),
        html.Div(id="banner", style={"margin": "6px 0"}),
        html.Div([
            _labelled("sweep", dcc.Dropdown(id="sweep", options=[], value=None, clearable=False), "260px"),
            _labelled("status", dcc.Checklist(id="status", options=_opts(STATUSES), value=STATUSES, inline=True,
                                              inputStyle={"marginRight": "3px"},
                                              labelStyle={"marginRight": "10px"})),
            _labelled("family", dcc.Checklist(id="family", options=[], value=[], inline=True,
                                              inputStyle={"marginRight": "3px"},
                                              labelStyle={"marginRight": "10px"})),
            dcc.Checklist(id="refresh", options=[{"label": f" auto-refresh ({refresh_s:g} s)" if refresh_s > 0
                                                  else " auto-refresh (off)", "value": "on",
                                                  "disabled": refresh_s <= 0}], value=["on"]),
        ], style=_ROW),
        dcc.Tabs(id="view", value="overview", children=[dcc.Tab(label=v, value=k) for k, v in VIEWS.items()]),
    ])

    sections = {
        "overview": [
            dcc.Graph(id="overview-graph", config={"displaylogo": False}),
            html.Div(id="overview-table"),
            html.Div(_csv_button("overview", "sweeps CSV"), style={"margin": "6px 0"}),
            html.H4("Failed and diverged runs"),
            _grid("failures-grid", 20),
        ],
        "runs": [
            html.Div([
                dcc.Checklist(id="runs-differ", options=[{"label": " only columns that differ", "value": "on"}],
                              value=["on"]),
                dcc.Input(id="runs-quick", type="search", placeholder="quick filter (any column)", debounce=True,
                          style={"width": "260px"}),
                html.Span(id="runs-count", style={"fontWeight": "bold"}),
                _csv_button("runs", "runs CSV"),
            ], style=_ROW),
            _note("runs-note"),
            _grid("runs-grid", 50),
        ],
        "curves": [
            html.Div([
                _labelled("metric", dcc.Dropdown(id="curves-metric", options=_opts(list(Q.METRICS)), value="loss",
                                                 clearable=False), "170px"),
                _labelled("x axis", dcc.RadioItems(id="curves-x", options=_opts(list(Q.X_AXES)), value="step",
                                                   inline=True, labelStyle={"marginRight": "8px"})),
                _labelled("log axes", dcc.Checklist(id="curves-log", options=[{"label": " log x", "value": "x"},
                                                                              {"label": " log y", "value": "y"}],
                                                    value=[], inline=True, labelStyle={"marginRight": "8px"})),
                _labelled("smoothing (EMA weight; raw stays visible)",
                          dcc.Slider(id="curves-smooth", min=0, max=0.99, step=0.01, value=0,
                                     marks={0: "0", 0.5: "0.5", 0.9: "0.9", 0.99: "0.99"},
                                     tooltip={"always_visible": False}), "260px"),
                _labelled("group by (mean ± stderr over the rest)",
                          dcc.Dropdown(id="curves-group", options=[], value=[], multi=True,
                                       placeholder="none: every run its own line"), "360px"),
                _csv_button("curves", "curve data CSV"),
            ], style=_ROW),
            _note("curves-note"),
            dcc.Loading(dcc.Graph(id="curves-graph", config={"displaylogo": False}), type="dot", delay_show=400),
        ],
        "effects": [
            html.Div([
                _labelled("axis", dcc.Dropdown(id="effects-axis", options=[], value=None, clearable=False), "240px"),
                _labelled("metric", dcc.Dropdown(id="effects-metric", options=_metric_labels(True),
                                                 value="final_loss", clearable=False), "240px"),
                _labelled("baseline value", dcc.Dropdown(id="effects-baseline", options=[], value=None), "160px"),
                _labelled("split by", dcc.Dropdown(id="effects-split", options=[], value=None,
                                                   placeholder="(none)"), "240px"),
                _csv_button("effects", "effects CSV"),
            ], style=_ROW),
            _note("effects-note"),
            dcc.Graph(id="effects-graph", config={"displaylogo": False}),
            _grid("effects-grid", 50),
        ],
        "scaling": [
            html.Div([
                _labelled("colour MoE points by", dcc.Dropdown(id="scaling-color", options=[], value=None),
                          "260px"),
                _csv_button("scaling", "points + leverage CSV"),
            ], style=_ROW),
            _note("scaling-note"),
            dcc.Loading(dcc.Graph(id="scaling-graph", config={"displaylogo": False}), type="dot", delay_show=400),
            _grid("scaling-grid", 50),
        ],
        "experts": [
            html.Div([
                _labelled("trial", dcc.Dropdown(id="experts-trial", options=[], value=None, clearable=False),
                          "380px"),
                _labelled("step (nearest logged)", dcc.Slider(id="experts-step", min=0, max=1, value=None,
                                                              step=1, marks=None, allow_direct_input=True,
                                                              tooltip={"always_visible": False}), "340px"),
                _labelled("layer (over time, domains)",
                          dcc.Input(id="experts-layer", type="number", min=0, step=1, value=0, debounce=True,
                                    style={"width": "80px"})),
                _csv_button("experts", "expert load CSV"),
                _csv_button("routing", "domain routing CSV"),
            ], style=_ROW),
            _note("experts-note"),
            dcc.Graph(id="experts-heatmap", config={"displaylogo": False}),
            dcc.Graph(id="experts-time", config={"displaylogo": False}),
            dcc.Graph(id="experts-domain", config={"displaylogo": False}),
            dcc.Graph(id="experts-special", config={"displaylogo": False}),
            dcc.Graph(id="experts-imbalance", config={"displaylogo": False}),
        ],
        "parallel": [
            html.Div([
                _labelled("metric", dcc.Dropdown(id="parallel-metric", options=_metric_labels(True),
                                                 value="final_loss", clearable=False), "240px"),
                _csv_button("parallel", "CSV"),
            ], style=_ROW),
            _note("parallel-note"),
            dcc.Graph(id="parallel-graph", config={"displaylogo": False}),
        ],
    }
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", interval=max(int(refresh_s * 1000), 500), disabled=True),
        *[dcc.Store(id=f"{v}-version") for v in VIEWS],
        header,
        *[html.Div(children, id=f"section-{k}", style=_HIDDEN, className="view") for k, children in sections.items()],
    ], style={"fontFamily": "system-ui, sans-serif", "margin": "10px 18px"})

    # -- state <-> URL ------------------------------------------------------------------------------------------
    def normalise(state: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], Any], Any]:
        """Check `state` against the store: invalid values become defaults. Returns (state, options, banner)."""
        opts: dict[tuple[str, str], Any] = {k: [] for k in OPTIONS}
        opts[("experts-step", "max")] = 1
        opts[("experts-step", "marks")] = None
        s = dict(state)
        if s.get("view") not in VIEWS:
            s["view"] = "overview"
        try:
            trials = _trials()
            sweeps = reader.sweeps()
        except Q.StoreUnavailable as e:
            for k in ("sweep", "axis", "baseline", "split", "color", "trial", "family"):
                s[k] = None
            return s, opts, html.Div(str(e), id="store-message", className="store-message",
                                     style={"color": "#b00020", "fontWeight": "bold"})
        n_warn = len(reader.warnings)
        warn = [] if not n_warn else [html.Div(
            f"{n_warn} unreadable file(s) skipped (partly written or foreign): "
            + "; ".join(f"{os.path.basename(p)}: {w}" for p, w in list(reader.warnings.items())[:3]),
            style={"color": "#8a5300"})]
        if not sweeps:
            for k in ("sweep", "axis", "baseline", "split", "color", "trial", "family"):
                s[k] = None
            return s, opts, html.Div([html.Div(
                f"The store at {reader.uri!r} holds no sweeps yet. Results appear here as a sweep writes them.",
                id="store-message", style={"color": "#b00020", "fontWeight": "bold"}), *warn])
        opts[("sweep", "options")] = _opts(sweeps)
        if s.get("sweep") not in sweeps:
            latest = trials.sort_values("updated_at").iloc[-1]["sweep"] if "updated_at" in trials and len(trials) \
                else sweeps[0]
            s["sweep"] = latest if latest in sweeps else sweeps[0]
        t = Q.filter_trials(trials, s["sweep"])
        dflt = s["_defaults"] = {"status": STATUSES}
        s["status"] = STATUSES if s.get("status") is None else [x for x in s["status"] if x in STATUSES]
        fams = sorted(t["family"].dropna().unique().tolist()) if "family" in t else []
        opts[("family", "options")] = _opts(fams)
        s["family"] = fams if s.get("family") is None else [f for f in s["family"] if f in fams]
        dflt["family"] = fams
        if s.get("metric") not in Q.METRICS:
            s["metric"] = "loss"
        if s.get("x") not in Q.X_AXES:
            s["x"] = "step"
        s["log"] = [v for v in s.get("log") or [] if v in ("x", "y")]
        keys = Q.group_keys(t)
        opts[("curves-group", "options")] = [{"label": "all but seed (mean over seeds)", "value": Q.ALL_BUT_SEED},
                                             *_opts(keys)]
        g = s.get("group")
        if g is None:
            g = [GROUP_SEEDS]
        g = [x for x in g if x == GROUP_SEEDS or x in keys]
        s["group"] = [GROUP_SEEDS] if GROUP_SEEDS in g else g
        axes = Q.axis_keys(t)
        opts[("effects-axis", "options")] = _opts(axes)
        opts[("scaling-color", "options")] = _opts(axes + [k for k in ("family", "name") if k in t])
        dflt["axis"] = axes[0] if axes else None
        if s.get("axis") not in axes:
            s["axis"] = dflt["axis"]
        if s.get("split") not in axes or s.get("split") == s.get("axis"):
            s["split"] = None
        opts[("effects-split", "options")] = _opts([a for a in axes if a != s["axis"]])
        values = []
        if s["axis"]:
            col = Q.axis_frame(t)[s["axis"]].dropna()
            try:
                values = [F._fmt(v) for v in sorted(col.unique())]
            except TypeError:
                values = [F._fmt(v) for v in col.unique()]
        opts[("effects-baseline", "options")] = _opts(values)
        dflt["baseline"] = values[0] if values else None
        if s.get("baseline") not in values:
            s["baseline"] = dflt["baseline"]
        metric_opts = _metric_labels(True)
        opts[("effects-metric", "options")] = metric_opts
        opts[("parallel-metric", "options")] = metric_opts
        valid = [o["value"] for o in metric_opts]
        for key in ("emetric", "pmetric"):
            if s.get(key) not in valid:
                s[key] = "final_loss"
        dflt["color"] = axes[0] if axes else None
        if s.get("color") not in axes + ["family", "name"]:
            s["color"] = dflt["color"]
        moe = t[t["family"] == "moe"] if "family" in t else t.iloc[0:0]
        opts[("experts-trial", "options")] = [
            {"label": f"{r.trial_id} ({r.status})", "value": r.trial_id} for r in moe.itertuples()]
        done = moe[moe["status"] == "finished"]
        dflt["trial"] = (done if len(done) else moe)["trial_id"].iloc[0] if len(moe) else None
        if s.get("trial") not in set(moe["trial_id"]):
            s["trial"] = dflt["trial"]
        last = None
        if s["trial"] is not None:
            row = t[t["trial_id"] == s["trial"]].iloc[0]
            for c in ("final_step", "train.steps", "steps"):
                if c in row and pd.notna(row[c]):
                    last = int(row[c])
                    break
        opts[("experts-step", "max")] = last or 1
        opts[("experts-step", "marks")] = {0: "0", last: str(last)} if last else None
        dflt["step"] = last
        if last is not None:  # the slider shows the last step unless the URL names another
            s["step"] = last if s.get("step") is None else int(min(max(int(s["step"]), 0), last))
        if s.get("layer") is None or s["layer"] < 0:
            s["layer"] = 0
        return s, opts, html.Div(
            [html.Span(f"{len(sweeps)} sweep(s), {len(trials)} trial(s). Showing sweep {s['sweep']!r}: "
                       f"{len(t)} trial(s).", id="store-summary"), *warn])

    sync_inputs = [Input("url", "search"), Input("tick", "n_intervals")] + [Input(c, p) for c, p in CONTROLS.values()]
    sync_outputs = [Output("url", "search"), Output("banner", "children"), Output("tick", "disabled")] + \
        [Output(c, p) for c, p in CONTROLS.values()] + [Output(c, p) for c, p in OPTIONS] + \
        [Output(f"section-{k}", "style") for k in VIEWS]

    @app.callback(*sync_outputs, *sync_inputs)
    def sync(search: str | None, _tick: int | None, *values: Any) -> tuple:
        trig = ctx.triggered_id
        if search is None:  # dcc.Location has not read the address bar yet: wait for it, never overwrite it
            raise PreventUpdate
        # The address bar is the state; a control that changed overrides its own key only (another control's
        # value may be stale here: its update from an earlier call can still be on the way).
        state = parse_state(search)
        if trig not in (None, "url", "tick"):
            controls = _controls_state(list(values))
            by_id = {f"{c}.{p}": k for k, (c, p) in CONTROLS.items()}
            for prop_id in ctx.triggered_prop_ids:
                if prop_id in by_id:
                    state[by_id[prop_id]] = controls[by_id[prop_id]]
        try:
            s, opts, banner = normalise(state)
        except Exception as e:  # noqa: BLE001 - the page says what went wrong; the log has the traceback
            log.exception("dashboard: reading the store failed")
            s, opts = dict(state), {k: dash.no_update for k in OPTIONS}
            s["view"] = s.get("view") if s.get("view") in VIEWS else "overview"
            banner = html.Div(f"Could not read the store: {type(e).__name__}: {e}", id="store-message",
                              style={"color": "#b00020", "fontWeight": "bold"})
        current = _controls_state(list(values))
        out_values = []
        for key, (cid, prop) in CONTROLS.items():
            v = s.get(key)
            if key == "group":
                v = [Q.ALL_BUT_SEED if g == GROUP_SEEDS else g for g in (v or [])]
                cur = [Q.ALL_BUT_SEED if g == GROUP_SEEDS else g for g in (current.get("group") or [])]
            else:
                cur = values[list(CONTROLS).index(key)]
            if key in ("differ", "refresh"):
                v = ["on"] if v else []
            out_values.append(dash.no_update if v == cur else v)
        new_search = encode_state(s)
        return (new_search if new_search != (search or "") else dash.no_update, banner,
                refresh_s <= 0 or not s.get("refresh", True),
                *out_values, *[opts[k] for k in OPTIONS],
                *[_SHOWN if k == s["view"] else _HIDDEN for k in VIEWS])

    # -- view callbacks -----------------------------------------------------------------------------------------
    def guarded(view: str, fallback: Callable[[str], tuple]) -> Callable:
        """Compute only while `view` is shown; skip a timer refresh when the sweep's files did not change;
        turn errors into a message (StoreUnavailable: its text; others: the type and message, traceback
        logged). The wrapped function gets (sweep, trials, *own inputs) and returns its outputs; the version
        store is appended."""
        def deco(fn: Callable) -> Callable:
            def run(current_view: str, sweep: str | None, status: list[str], family: list[str], _tick: Any,
                    *args: Any) -> tuple:
                *own, version = args
                if current_view != view:
                    raise PreventUpdate
                try:
                    if sweep is None:
                        reader.trials()  # raises StoreUnavailable with the reason, if that is the reason
                        return (*fallback("No sweep to show yet."), None)
                    now = reader.version(sweep)
                    if ctx.triggered_id == "tick" and version == now:
                        raise PreventUpdate
                    trials = views.trials(sweep, status, family)
                    if not len(trials):
                        msg = ("No runs match the status / family filter." if len(views.trials(sweep)) else
                               f"Sweep {sweep!r} has no trial rows yet (its `trials` files are not written, or "
                               f"not readable); metrics without a trial row are not shown.")
                        return (*fallback(msg), now)
                    return (*fn(sweep, trials, *own), now)
                except PreventUpdate:
                    raise
                except Q.StoreUnavailable as e:
                    return (*fallback(str(e)), None)
                except Exception as e:  # noqa: BLE001
                    log.exception("dashboard view %s failed", view)
                    return (*fallback(f"Could not draw this view: {type(e).__name__}: {e}"), None)
            run.__name__ = f"{view}_view"
            return run
        return deco

    common = [Input("view", "value"), Input("sweep", "value"), Input("status", "value"), Input("family", "value"),
              Input("tick", "n_intervals")]

    # Overview: every sweep (ignores the sweep picker), failures of all sweeps.
    @app.callback(Output("overview-graph", "figure"), Output("overview-table", "children"),
                  Output("failures-grid", "rowData"), Output("failures-grid", "columnDefs"),
                  Output("overview-version", "data"), *common, State("overview-version", "data"))
    def overview(current_view, sweep, status, family, _tick, version):
        if current_view != "overview":
            raise PreventUpdate
        try:
            now = reader.version()
            if ctx.triggered_id == "tick" and version == now:
                raise PreventUpdate
            fig, ov, fails = views.overview()
            return fig, _overview_table(ov), _records(fails), _column_defs(fails), now
        except PreventUpdate:
            raise
        except Q.StoreUnavailable as e:
            return F.message_figure(str(e)), html.Div(str(e), className="store-message"), [], [], None
        except Exception as e:  # noqa: BLE001
            log.exception("dashboard overview failed")
            msg = f"Could not read the sweeps: {type(e).__name__}: {e}"
            return F.message_figure(msg), html.Div(msg), [], [], None

    @app.callback(Output("runs-grid", "rowData"), Output("runs-grid", "columnDefs"), Output("runs-count", "children"),
                  Output("runs-note", "children"), Output("runs-version", "data"), *common,
                  Input("runs-differ", "value"), State("runs-version", "data"))
    @guarded("runs", lambda msg: ([], [], "0 runs", msg))
    def runs(sweep, trials, differ):
        df = views.runs(trials, bool(differ))
        bad = int(trials["status"].isin(["failed", "diverged"]).sum())
        return (_records(df), _column_defs(df), f"{len(df)} runs" + (f" ({bad} failed or diverged)" if bad else ""),
                "" if len(df) else "No runs match the status / family filter.")

    @app.callback(Output("runs-grid", "dashGridOptions", allow_duplicate=True), Input("runs-quick", "value"),
                  prevent_initial_call=True)
    def runs_quick(text):
        p = Patch()
        p["quickFilterText"] = text or ""
        return p

    @app.callback(Output("curves-graph", "figure"), Output("curves-note", "children"),
                  Output("curves-version", "data"), *common,
                  Input("curves-metric", "value"), Input("curves-x", "value"), Input("curves-log", "value"),
                  Input("curves-smooth", "value"), Input("curves-group", "value"), State("curves-version", "data"))
    @guarded("curves", lambda msg: (F.message_figure(msg), msg))
    def curves(sweep, trials, metric, x, log_, smooth, group):
        fig, cd = views.curves(sweep, trials, metric, x, log_, smooth, group)
        return fig, cd.note

    @app.callback(Output("effects-graph", "figure"), Output("effects-grid", "rowData"),
                  Output("effects-grid", "columnDefs"), Output("effects-note", "children"),
                  Output("effects-version", "data"), *common,
                  Input("effects-axis", "value"), Input("effects-metric", "value"), Input("effects-baseline", "value"),
                  Input("effects-split", "value"), State("effects-version", "data"))
    @guarded("effects", lambda msg: (F.message_figure(msg), [], [], msg))
    def effects(sweep, trials, axis, metric, baseline, split):
        if not axis:
            msg = "This sweep has no axes (no trial carries axis values)."
            return F.message_figure(msg), [], [], msg
        try:
            fig, eff = views.effects(sweep, trials, axis, metric, baseline, split)
        except ValueError as e:
            return F.message_figure(str(e)), [], [], str(e)
        table = eff.assign(value=eff["value"].map(F._fmt))
        if "split" in table:
            table["split"] = table["split"].map(F._fmt)
        return fig, _records(table), _column_defs(table, ("value",)), ""

    @app.callback(Output("scaling-graph", "figure"), Output("scaling-grid", "rowData"),
                  Output("scaling-grid", "columnDefs"), Output("scaling-note", "children"),
                  Output("scaling-version", "data"), *common, Input("scaling-color", "value"),
                  State("scaling-version", "data"))
    @guarded("scaling", lambda msg: (F.message_figure(msg), [], [], msg))
    def scaling(sweep, trials, color):
        fig, summary, _, law, tl = views.scaling(sweep, trials, color)
        if law is None:
            note = ("No dense law: the sweep needs finished dense runs at 2 or more compute budgets (or a "
                    "`fits` table), so leverage is not computed.")
        else:
            src = "the sweep's fits table" if law.source == "fits table" else "a fit of the dense runs here"
            note = (f"Dense law from {src} (L = A·C^-alpha per family, Tian et al. 2025; {law.n_points or '?'} "
                    f"dense points). Leverage EL = C_dense(L) / C_moe at the MoE run's final loss.")
            n_extra = int(tl["leverage_extrapolated"].sum()) if "leverage_extrapolated" in tl else 0
            if n_extra:
                note += f" {n_extra} MoE run(s) need the law outside its fitted compute range (extrapolated)."
        return fig, _records(summary), _column_defs(summary, ("label",)), note

    @app.callback(Output("experts-heatmap", "figure"), Output("experts-time", "figure"),
                  Output("experts-domain", "figure"), Output("experts-special", "figure"),
                  Output("experts-imbalance", "figure"), Output("experts-note", "children"),
                  Output("experts-version", "data"), *common, Input("experts-trial", "value"),
                  Input("experts-step", "value"), Input("experts-layer", "value"), State("experts-version", "data"))
    @guarded("experts", lambda msg: (F.message_figure(msg), *[F.message_figure("")] * 4, msg))
    def experts(sweep, trials, trial, step, layer):
        if not trial:
            msg = "No MoE trials in this sweep (with the current status / family filter)."
            return F.message_figure(msg), *[F.message_figure("")] * 4, msg
        return views.experts(sweep, trials, trial, step, layer)[:6]

    @app.callback(Output("parallel-graph", "figure"), Output("parallel-note", "children"),
                  Output("parallel-version", "data"), *common, Input("parallel-metric", "value"),
                  State("parallel-version", "data"))
    @guarded("parallel", lambda msg: (F.message_figure(msg), msg))
    def parallel(sweep, trials, metric):
        fig, frame = views.parallel(sweep, trials, metric)
        return fig, "" if len(frame) else f"No trials on the sweep grid with a finite {metric}."

    # -- CSV downloads: the frames behind each view -------------------------------------------------------------
    def csv(name: str, make: Callable[..., pd.DataFrame], *states: State) -> None:
        @app.callback(Output(f"{name}-download", "data"), Input(f"{name}-csv", "n_clicks"),
                      State("sweep", "value"), State("status", "value"), State("family", "value"), *states,
                      prevent_initial_call=True)
        def download(n, sweep, status, family, *args):
            if not n:
                raise PreventUpdate
            try:
                df = make(sweep, views.trials(sweep, status, family), *args)
            except Exception:  # noqa: BLE001
                log.exception("dashboard: CSV %s failed", name)
                raise PreventUpdate from None
            return dcc.send_data_frame(df.to_csv, f"{sweep or 'store'}-{name}.csv", index=False)

    def curves_csv(sweep, trials, metric, x, log_, smooth, group):
        cd = views.curve_data(sweep, trials, metric, x, log_, smooth, group)
        if cd.grouped and len(cd.agg):
            return cd.agg.rename(columns={"x": x, "mean": f"{metric}_mean"})
        return cd.runs.rename(columns={"x": x, "y": metric})

    csv("overview", lambda sweep, trials: views.overview()[1])
    csv("runs", lambda sweep, trials, differ: views.runs(trials, bool(differ)), State("runs-differ", "value"))
    csv("curves", curves_csv, State("curves-metric", "value"), State("curves-x", "value"),
        State("curves-log", "value"), State("curves-smooth", "value"), State("curves-group", "value"))
    csv("effects", lambda sweep, trials, *a: views.effects_frame(sweep, trials, *a),
        State("effects-axis", "value"), State("effects-metric", "value"), State("effects-baseline", "value"),
        State("effects-split", "value"))
    csv("scaling", lambda sweep, trials, color: views.scaling(sweep, trials, color)[2], State("scaling-color", "value"))
    csv("experts", lambda sweep, trials, trial, step: views.experts_data(sweep, trial, step)[0],
        State("experts-trial", "value"), State("experts-step", "value"))
    csv("routing", lambda sweep, trials, trial: views.routing_data(sweep, trial)[0],
        State("experts-trial", "value"))
    csv("parallel", lambda sweep, trials, metric: views.parallel(sweep, trials, metric)[1],
        State("parallel-metric", "value"))

    if prewarm:
        threading.Thread(target=_prewarm, args=(reader,), daemon=True, name="dashboard-prewarm").start()
    return app


def _overview_table(ov: pd.DataFrame) -> html.Table:
    head = html.Tr([html.Th(c, style={"textAlign": "left", "padding": "2px 10px"}) for c in ov.columns])
    rows = []
    for r in ov.itertuples(index=False):
        cells = []
        for c, v in zip(ov.columns, r):
            if c == "sweep":
                q = urllib.parse.urlencode({"view": "runs", "sweep": v})
                cells.append(html.Td(dcc.Link(str(v), href=f"?{q}")))
            else:
                style = {"padding": "2px 10px"}
                if c in F.STATUS_COLORS and v:
                    style.update(color=F.STATUS_COLORS[c], fontWeight="bold")
                cells.append(html.Td("" if v is None else str(v), style=style))
        rows.append(html.Tr(cells, className="sweep-row"))
    return html.Table([html.Thead(head), html.Tbody(rows)], id="sweeps-table",
                      style={"borderCollapse": "collapse", "margin": "8px 0"})


def _prewarm(reader: Q.Reader) -> None:
    """Read the trials and the newest sweep's losses and x axes once, so the first page views are fast."""
    try:
        trials = reader.trials()
        if not len(trials):
            return
        newest = trials.sort_values("updated_at").iloc[-1]["sweep"] if "updated_at" in trials else trials["sweep"].iloc[0]
        ids = list(trials.loc[trials["sweep"] == newest, "trial_id"])
        reader.metrics(newest, ids, ["loss", "eval_loss", "tokens", "flops", "wall_s"])
    except Exception:  # noqa: BLE001 - best effort; the page reports problems itself
        log.debug("dashboard prewarm failed", exc_info=True)


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8050, *, refresh_s: float = 10.0,
          debug: bool = False) -> None:
    """Serve the dashboard of the store under `root` until interrupted (Ctrl-C). Binds `host`:`port`
    (loopback by default: pass host="0.0.0.0" to expose it; there is no authentication)."""
    app = create_app(root, refresh_s=refresh_s)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("dashboard: serving on %s:%s without authentication; anyone who can reach it can read the "
                    "results", host, port)
    print(f"moelab dashboard: {os.fspath(root)} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    app.run(host=host, port=port, debug=debug)
