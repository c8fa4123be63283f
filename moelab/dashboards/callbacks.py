"""The dashboard's callbacks: what happens when the URL, a control or the refresh timer changes.

* `register_sync`: the address bar is the state. Every change is parsed and checked against the store
  (`moelab.dashboards.inputs`), written back to the URL without defaults, and pushed to the controls, their
  options and the banner; it also shows the chosen view's section.
* `register_views`: one callback per view (two for Scaling & leverage: its efficiency-leverage surface
  redraws alone when the budget changes), each wrapped by `guarded`: it runs only while its view is shown,
  passes the sweep through `inputs.checked` before anything is read, skips a timer refresh when the sweep's
  files did not change, and turns any error into a one-line message in the view (traceback to the log).
* `register_downloads`: the CSV buttons, each the frame behind its view, through the same check.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import dash
import pandas as pd
from dash import Input, Output, Patch, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from moelab.dashboards import figures as F
from moelab.dashboards import inputs
from moelab.dashboards.layout import (ALERT, CONTROLS, HIDDEN, OPTIONS, SHOWN, column_defs, control_options,
                                      empty_options, overview_table, records, skipped_files)
from moelab.dashboards.reader import Reader, StoreUnavailable
from moelab.dashboards.trials import filter_trials, fmt_value, latest_sweep, offer
from moelab.dashboards.views import Views

__all__ = ["register", "register_sync", "register_views", "register_downloads"]

log = logging.getLogger("moelab.dashboards")


def register(app: dash.Dash, reader: Reader, views: Views, refresh_s: float,
             timeout_s: float = inputs.REQUEST_TIMEOUT_S) -> None:
    """All of the app's callbacks; a view answers within `timeout_s` seconds (else with a message)."""
    register_sync(app, reader, refresh_s)
    register_views(app, reader, views, timeout_s)
    register_downloads(app, reader, views)


# ----------------------------------------------------------------------------------------------------------
# State <-> URL


def check_against_store(reader: Reader, state: dict[str, Any]) -> tuple[dict[str, Any], dict, html.Div]:
    """Check `state` against the store: invalid values become defaults. Returns (state, the OPTIONS
    properties' values, banner)."""
    try:
        trials = reader.trials()
        sweeps = reader.sweeps()
    except StoreUnavailable as e:
        banner = html.Div(str(e), id="store-message", className="store-message", style=ALERT)
        return inputs.without_store(state), empty_options(), banner
    warn = skipped_files(reader.warnings)
    if not sweeps:
        return inputs.without_store(state), empty_options(), html.Div([html.Div(
            f"The store at {reader.display_uri!r} holds no sweeps yet. Results appear here as a sweep writes them.",
            id="store-message", style=ALERT), *warn])
    sweep = inputs.check_sweep(state.get("sweep"), sweeps, latest_sweep(trials))
    t = filter_trials(trials, sweep)
    c = inputs.check_state(state, sweep, offer(t))
    return c.state, control_options(sweeps, c), html.Div(
        [html.Span(f"{len(sweeps)} sweep(s), {len(trials)} trial(s). Showing sweep {sweep!r}: "
                   f"{len(t)} trial(s).", id="store-summary"), *warn])


def register_sync(app: dash.Dash, reader: Reader, refresh_s: float) -> None:
    """The callback that keeps the URL, the controls, their options and the banner in step."""
    sync_inputs = [Input("url", "search"), Input("tick", "n_intervals")] + [Input(c, p) for c, p in CONTROLS.values()]
    sync_outputs = [Output("url", "search"), Output("banner", "children"), Output("tick", "disabled")] + \
        [Output(c, p) for c, p in CONTROLS.values()] + [Output(c, p) for c, p in OPTIONS] + \
        [Output(f"section-{k}", "style") for k in inputs.VIEWS]

    @app.callback(*sync_outputs, *sync_inputs)
    def sync(search: str | None, _tick: int | None, *values: Any) -> tuple:
        trig = ctx.triggered_id
        if search is None:  # dcc.Location has not read the address bar yet: wait for it, never overwrite it
            raise PreventUpdate
        # The address bar is the state; a control that changed overrides its own key only (another control's
        # value may be stale here: its update from an earlier call can still be on the way).
        state = inputs.parse_state(search)
        if trig not in (None, "url", "tick"):
            controls = inputs.controls_state(dict(zip(CONTROLS, values)))
            by_id = {f"{c}.{p}": k for k, (c, p) in CONTROLS.items()}
            for prop_id in ctx.triggered_prop_ids:
                if prop_id in by_id:
                    state[by_id[prop_id]] = controls[by_id[prop_id]]
        try:
            s, opts, banner = check_against_store(reader, state)
        except Exception as e:  # noqa: BLE001 - the page says what went wrong; the log has the traceback
            log.exception("dashboard: reading the store failed")
            s, opts = dict(state), {k: dash.no_update for k in OPTIONS}
            s["view"] = s.get("view") if s.get("view") in inputs.VIEWS else "overview"
            banner = html.Div(f"Could not read the store: {type(e).__name__}: {e}", id="store-message",
                              style=ALERT)
        current = inputs.controls_state(dict(zip(CONTROLS, values)))
        out_values = []
        for key, (cid, prop) in CONTROLS.items():
            v = s.get(key)
            if key == "group":
                v = inputs.group_control(v)
                cur = inputs.group_control(current.get("group"))
            else:
                cur = values[list(CONTROLS).index(key)]
            if key in ("differ", "refresh"):
                v = ["on"] if v else []
            out_values.append(dash.no_update if v == cur else v)
        new_search = inputs.encode_state(s)
        return (new_search if new_search != (search or "") else dash.no_update, banner,
                refresh_s <= 0 or not s.get("refresh", True),
                *out_values, *[opts[k] for k in OPTIONS],
                *[SHOWN if k == s["view"] else HIDDEN for k in inputs.VIEWS])


# ----------------------------------------------------------------------------------------------------------
# The views


def register_views(app: dash.Dash, reader: Reader, views: Views,
                   timeout_s: float = inputs.REQUEST_TIMEOUT_S) -> None:
    """One callback per view (and the runs table's quick filter, and the Scaling view's EL surface)."""
    # Views compute on a small pool so that a request can stop waiting: Python cannot stop a thread, but the
    # request returns a message after timeout_s and at most `max_workers` views compute at once.
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dashboard-view")

    def guarded(view: str, fallback: Callable[[str], tuple]) -> Callable:
        """Compute only while `view` is shown; skip a timer refresh when the sweep's files did not change;
        turn errors into a message (StoreUnavailable: its text; others: the type and message, traceback
        logged), and a view that takes longer than timeout_s into one too. The wrapped function gets (sweep,
        trials, *own inputs) and returns its outputs; the version store is appended."""
        def deco(fn: Callable) -> Callable:
            def run(current_view: str, sweep: str | None, status: list[str], family: list[str], _tick: Any,
                    *args: Any) -> tuple:
                if current_view != view:
                    raise PreventUpdate
                tick = ctx.triggered_id == "tick"  # Dash's ctx lives in the request's thread: read it here
                future = pool.submit(compute, sweep, status, family, tick, *args)
                try:
                    return future.result(timeout=timeout_s)
                except FutureTimeout:
                    future.cancel()
                    log.warning("dashboard view %s of sweep %r took longer than %g s", view, sweep, timeout_s)
                    return (*fallback(f"This view took longer than {timeout_s:g} s to read (a slow or very "
                                      f"large store); it is still being read: try again in a moment."), None)

            def compute(sweep: str | None, status: list[str], family: list[str], tick: bool, *args: Any) -> tuple:
                *own, version = args
                try:
                    if sweep is None:
                        reader.trials()  # raises StoreUnavailable with the reason, if that is the reason
                        return (*fallback("No sweep to show yet."), None)
                    inputs.checked(reader, sweep=sweep)
                    now = reader.version(sweep)
                    if tick and version == now:
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
                except (StoreUnavailable, inputs.RefusedInput) as e:
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
            return fig, overview_table(ov), records(fails), column_defs(fails), now
        except PreventUpdate:
            raise
        except StoreUnavailable as e:
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
        return (records(df), column_defs(df), f"{len(df)} runs" + (f" ({bad} failed or diverged)" if bad else ""),
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
        table = eff.assign(value=eff["value"].map(fmt_value))
        if "split" in table:
            table["split"] = table["split"].map(fmt_value)
        return fig, records(table), column_defs(table, ("value",)), ""

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
            if law.source == "fits table":
                note = ("Leverage from the sweep's fits table (`moelab fit`: the report's numbers). Dense curve: "
                        "the compute-optimal frontier of the dense Chinchilla fit. Table: each family's efficiency "
                        "leverage at stated compute budgets (scope family) and per size (geometric mean over seeds).")
            else:
                note = (f"No fits table: leverage here is a quick estimate against L = A·C^-alpha fitted to "
                        f"{law.n_points or '?'} dense runs; run `moelab fit` for the report's numbers and intervals.")
            n_extra = int(tl["leverage_extrapolated"].sum()) if "leverage_extrapolated" in tl else 0
            if n_extra:
                note += f" {n_extra} MoE run(s) need the law outside its fitted compute range (extrapolated)."
        return fig, records(summary), column_defs(summary, ("label",)), note

    @app.callback(Output("scaling-el-graph", "figure"), Output("scaling-el-note", "children"),
                  Output("scaling-el-version", "data"), *common, Input("scaling-budget", "value"),
                  State("scaling-el-version", "data"))
    @guarded("scaling", lambda msg: (F.message_figure(msg), msg))
    def scaling_el(sweep, trials, budget):
        try:
            fig, note, _ = views.el_surface(sweep, inputs.check_budget(budget))
        except ValueError as e:
            return F.message_figure(str(e)), str(e)
        return fig, note

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
        inputs.checked(reader, trial=trial)
        return views.experts(sweep, trials, trial, step, layer)[:6]

    @app.callback(Output("parallel-graph", "figure"), Output("parallel-note", "children"),
                  Output("parallel-version", "data"), *common, Input("parallel-metric", "value"),
                  State("parallel-version", "data"))
    @guarded("parallel", lambda msg: (F.message_figure(msg), msg))
    def parallel(sweep, trials, metric):
        fig, frame = views.parallel(sweep, trials, metric)
        return fig, "" if len(frame) else f"No trials on the sweep grid with a finite {metric}."


# ----------------------------------------------------------------------------------------------------------
# CSV downloads: the frames behind each view


def register_downloads(app: dash.Dash, reader: Reader, views: Views) -> None:
    """One download callback per CSV button."""

    def csv(name: str, make: Callable[..., pd.DataFrame], *states: State) -> None:
        @app.callback(Output(f"{name}-download", "data"), Input(f"{name}-csv", "n_clicks"),
                      State("sweep", "value"), State("status", "value"), State("family", "value"), *states,
                      prevent_initial_call=True)
        def download(n, sweep, status, family, *args):
            if not n:
                raise PreventUpdate
            try:
                inputs.checked(reader, sweep=sweep)
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

    def experts_csv(sweep, trials, trial, step):
        inputs.checked(reader, trial=trial)
        return views.experts_data(sweep, trial, step)[0]

    def routing_csv(sweep, trials, trial):
        inputs.checked(reader, trial=trial)
        return views.routing_data(sweep, trial)[0]

    csv("experts", experts_csv, State("experts-trial", "value"), State("experts-step", "value"))
    csv("routing", routing_csv, State("experts-trial", "value"))
    csv("parallel", lambda sweep, trials, metric: views.parallel(sweep, trials, metric)[1],
        State("parallel-metric", "value"))
