"""The dashboard's page: the header (store, sweep, status and family pickers, tabs), one section per view with
its controls, graphs and grids, and the small builders that fill them (grid rows and columns, the sweeps
table, the options each control offers, the banner's warning line).

Component ids are the contract with `moelab.dashboards.callbacks`: `CONTROLS` maps each URL parameter to the
control that shows it, `OPTIONS` lists the properties the URL sync callback sets from the store.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import dash_ag_grid as dag
import pandas as pd
from dash import dcc, html

from moelab.dashboards.figures import STATUS_COLORS
from moelab.dashboards.inputs import ALL_BUT_SEED, METRICS, VIEWS, X_AXES, Checked
from moelab.platform.store import STATUSES

__all__ = ["CONTROLS", "OPTIONS", "HIDDEN", "SHOWN", "page", "control_options", "empty_options", "records",
           "column_defs", "overview_table", "skipped_files", "ALERT"]

HIDDEN = {"display": "none"}
SHOWN = {"display": "block"}
_ROW = {"display": "flex", "gap": "18px", "flexWrap": "wrap", "alignItems": "flex-end", "marginBottom": "8px"}
ALERT = {"color": "#b00020", "fontWeight": "bold"}  # the banner of a store that cannot be shown

# URL parameter -> (component id, property). The order is the order of the sync callback's arguments.
CONTROLS = {
    "view": ("view", "value"), "sweep": ("sweep", "value"), "status": ("status", "value"),
    "family": ("family", "value"), "metric": ("curves-metric", "value"), "x": ("curves-x", "value"),
    "log": ("curves-log", "value"), "smooth": ("curves-smooth", "value"), "group": ("curves-group", "value"),
    "axis": ("effects-axis", "value"), "baseline": ("effects-baseline", "value"),
    "split": ("effects-split", "value"), "emetric": ("effects-metric", "value"),
    "color": ("scaling-color", "value"), "trial": ("experts-trial", "value"), "step": ("experts-step", "value"),
    "layer": ("experts-layer", "value"), "pmetric": ("parallel-metric", "value"),
    "differ": ("runs-differ", "value"), "refresh": ("refresh", "value"), "budget": ("scaling-budget", "value"),
}
OPTIONS = [("sweep", "options"), ("family", "options"), ("curves-group", "options"), ("effects-axis", "options"),
           ("effects-baseline", "options"), ("effects-split", "options"), ("effects-metric", "options"),
           ("scaling-color", "options"), ("experts-trial", "options"), ("parallel-metric", "options"),
           ("experts-step", "max"), ("experts-step", "marks")]


def _opts(values: list[Any], labels: dict[Any, str] | None = None) -> list[dict[str, Any]]:
    return [{"label": (labels or {}).get(v, str(v)), "value": v} for v in values]


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows: NaN / NaT -> None, numpy scalars -> Python."""
    if not len(df):
        return []
    out = df.astype(object).where(df.notna(), None)
    return out.to_dict("records")


def column_defs(df: pd.DataFrame, pinned: tuple[str, ...] = ("trial_id",)) -> list[dict[str, Any]]:
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
                for s, col in STATUS_COLORS.items()]}
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


def page(title: str, display_uri: str, refresh_s: float) -> html.Div:
    """The whole page: header, one hidden section per view (the URL sync callback shows one), the URL, the
    refresh timer and one version store per view (a view skips a refresh when its sweep did not change)."""
    header = html.Div([
        html.H2(title, style={"margin": "4px 0"}),
        html.Div(f"store: {display_uri}", style={"color": "#666", "fontSize": "13px"}),
        html.Div(id="banner", style={"margin": "6px 0"}),
        html.Div([
            _labelled("sweep", dcc.Dropdown(id="sweep", options=[], value=None, clearable=False), "260px"),
            _labelled("status", dcc.Checklist(id="status", options=_opts(list(STATUSES)), value=list(STATUSES),
                                              inline=True, inputStyle={"marginRight": "3px"},
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
                _labelled("metric", dcc.Dropdown(id="curves-metric", options=_opts(list(METRICS)), value="loss",
                                                 clearable=False), "170px"),
                _labelled("x axis", dcc.RadioItems(id="curves-x", options=_opts(list(X_AXES)), value="step",
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
            html.H4("Efficiency leverage over activation ratio and granularity (Tian et al. 2025, Eq. 13)"),
            html.Div([
                _labelled("compute budget (training FLOPs; empty: the middle of the fitted range)",
                          dcc.Input(id="scaling-budget", type="number", min=0, value=None, debounce=True,
                                    placeholder="e.g. 1e21", style={"width": "160px"})),
            ], style=_ROW),
            _note("scaling-el-note"),
            dcc.Graph(id="scaling-el-graph", config={"displaylogo": False}),
            # the EL surface redraws on its own (a budget change need not redraw the loss-vs-compute figure
            # and its training curves), so it keeps its own record of the sweep files it was drawn from
            dcc.Store(id="scaling-el-version"),
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
    return html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", interval=max(int(refresh_s * 1000), 500), disabled=True),
        *[dcc.Store(id=f"{v}-version") for v in VIEWS],
        header,
        *[html.Div(children, id=f"section-{k}", style=HIDDEN, className="view") for k, children in sections.items()],
    ], style={"fontFamily": "system-ui, sans-serif", "margin": "10px 18px"})


def overview_table(ov: pd.DataFrame) -> html.Table:
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
                if c in STATUS_COLORS and v:
                    style.update(color=STATUS_COLORS[c], fontWeight="bold")
                cells.append(html.Td("" if v is None else str(v), style=style))
        rows.append(html.Tr(cells, className="sweep-row"))
    return html.Table([html.Thead(head), html.Tbody(rows)], id="sweeps-table",
                      style={"borderCollapse": "collapse", "margin": "8px 0"})


def empty_options() -> dict[tuple[str, str], Any]:
    """What the store-dependent controls offer when there is no store to read: nothing."""
    opts: dict[tuple[str, str], Any] = {k: [] for k in OPTIONS}
    opts[("experts-step", "max")] = 1
    opts[("experts-step", "marks")] = None
    return opts


def control_options(sweeps: list[str], c: Checked) -> dict[tuple[str, str], Any]:
    """Each OPTIONS property for the sweeps of the store and what the checked state's sweep offers."""
    metric_opts = _metric_labels(True)
    last = c.last_step
    return {
        ("sweep", "options"): _opts(sweeps), ("family", "options"): _opts(c.families),
        ("curves-group", "options"): [{"label": "all but seed (mean over seeds)", "value": ALL_BUT_SEED},
                                      *_opts(c.group_keys)],
        ("effects-axis", "options"): _opts(c.axes), ("effects-baseline", "options"): _opts(c.baselines),
        ("effects-split", "options"): _opts(c.split_axes), ("effects-metric", "options"): metric_opts,
        ("scaling-color", "options"): _opts(c.colors),
        ("experts-trial", "options"): [{"label": f"{t} ({status})", "value": t} for t, status in c.trials],
        ("parallel-metric", "options"): metric_opts,
        ("experts-step", "max"): last or 1, ("experts-step", "marks"): {0: "0", last: str(last)} if last else None,
    }


def skipped_files(warnings: dict[str, str]) -> list[html.Div]:
    """The banner's line about files the reader skipped (none: no line)."""
    if not warnings:
        return []
    return [html.Div(f"{len(warnings)} unreadable file(s) skipped (partly written or foreign): "
                     + "; ".join(f"{os.path.basename(p)}: {w}" for p, w in list(warnings.items())[:3]),
                     style={"color": "#8a5300"})]
