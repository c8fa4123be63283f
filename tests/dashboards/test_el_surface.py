"""The Scaling & leverage view's efficiency-leverage surface: `scaling.el_surface` against Tian et al. 2025's
Eq. 13 evaluated directly (moelab.ablations.el_law, Table 2's constants), its figure, the budget's checks, and
the callback that draws it, called through Flask's test client (no browser)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pandas as pd
import pytest

from moelab.ablations.el_law import PAPER_EL_PARAMS, ELFit, efficiency_leverage, el_law_rows, optimal_granularity
from moelab.dashboards import figures as F
from moelab.dashboards.app import create_app, encode_state, parse_state
from moelab.dashboards.inputs import VIEWS, check_budget
from moelab.dashboards.layout import CONTROLS, OPTIONS
from moelab.dashboards.scaling import EL_FALLBACK_BUDGET, el_surface
from moelab.dashboards.views import Views
from moelab.platform.fitstable import fits_table, write_fits_table

P = PAPER_EL_PARAMS
# A fitted range around the paper's worked example: A = 3.1% and G = 12 are grid corners.
RANGE = {"C": [1e18, 1e20], "A": [0.031, 0.5], "G": [2.0, 12.0], "EL": [1.0, 5.0]}
LOCAL = {"Host": "127.0.0.1:8050"}


def _fits(params=P, fit_range=RANGE, extra_rows=()) -> pd.DataFrame:
    """A fits table as `moelab fit` writes it (parameters as JSON text), with one efficiency_leverage row."""
    fit = ELFit(params=dict(params), objective=0.0, n_points=24, n_groups=8, fit_range=fit_range)
    return fits_table([*extra_rows, *el_law_rows(fit)]).to_pandas()


def _other_row(**kw) -> dict:
    row = {"family": "dense", "law": "power_law", "scope": "law", "status": "ok",
           "parameters": {"E": 0.0, "A": 10.0, "alpha": 0.05}}
    return {**row, **kw}


def test_the_surface_is_eq13_on_its_grid():
    s = el_surface(_fits(), 1e19, n_A=17, n_G=13)
    assert s.A.shape == (17,) and s.G.shape == (13,) and s.EL.shape == (13, 17)
    assert (s.A[0], s.A[-1]) == pytest.approx((0.031, 0.5)) and (s.G[0], s.G[-1]) == pytest.approx((2.0, 12.0))
    assert np.diff(np.log(s.A)) == pytest.approx(np.full(16, math.log(0.5 / 0.031) / 16))
    assert np.diff(np.log2(s.G)) == pytest.approx(np.full(12, math.log2(6.0) / 12))
    # cell by cell: rows follow G, columns follow A
    for i in range(13):
        for j in range(17):
            assert s.EL[i, j] == pytest.approx(float(efficiency_leverage(s.A[j], s.G[i], 1e19, P)), rel=1e-12)
    assert s.budget == 1e19 and s.extrapolated is False and s.n_points == 24
    # the paper's worked example, EL 7.24 at A = 3.1%, G = 12, C = 1e22: the top-left cell
    ex = el_surface(_fits(), 1e22)
    assert ex.EL[-1, 0] == pytest.approx(7.24, abs=0.01)
    assert ex.extrapolated is True


def test_the_optimal_granularity_is_the_laws():
    s = el_surface(_fits(fit_range={**RANGE, "G": [1.0, 64.0]}), 1e19, n_A=9, n_G=241)
    assert s.G_opt == pytest.approx(float(optimal_granularity(P)), rel=1e-12)
    assert math.log2(s.G_opt) == pytest.approx(3.5, abs=0.02)  # Table 2: "about 2^3.5"
    # at every A the surface peaks at the grid point nearest the optimum
    nearest = np.argmin(np.abs(np.log2(s.G) - math.log2(s.G_opt)))
    assert (np.argmax(s.EL, axis=0) == nearest).all()


def test_the_budget_default_and_the_extrapolated_flag():
    fits = _fits()
    s = el_surface(fits)
    assert s.budget == s.default_budget == pytest.approx(1e19) and s.extrapolated is False
    for inside in (1e18, 3e18, 1e20):
        assert el_surface(fits, inside).extrapolated is False, inside
    for outside in (9.9e17, 1.01e20, 1e22, 1e6):
        assert el_surface(fits, outside).extrapolated is True, outside
    # a single fitted budget: only that budget is inside, and the grid still has an extent
    one = _fits(fit_range={"C": [1e19, 1e19], "A": [0.25, 0.25], "G": [8.0, 8.0]})
    assert el_surface(one, 1e19).extrapolated is False and el_surface(one, 1.1e19).extrapolated is True
    s = el_surface(one)
    assert s.A[0] < 0.25 < s.A[-1] <= 1.0 and s.G[0] < 8.0 < s.G[-1]


@pytest.mark.parametrize("bad", [0, 0.0, -1e20, float("nan"), float("inf"), -float("inf"), True, "1e20", [1e20]])
def test_a_bad_budget_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="budget"):
        el_surface(_fits(), bad)
    with pytest.raises(ValueError, match="budget"):
        el_surface(None, bad)  # refused before the law is looked up
    with pytest.raises(ValueError, match="budget"):
        check_budget(bad)


def test_no_efficiency_leverage_row_means_no_surface():
    assert el_surface(None) is None
    assert el_surface(fits_table([]).to_pandas()) is None
    assert el_surface(fits_table([_other_row()]).to_pandas(), 1e20) is None
    skipped = _fits().assign(status="skipped")
    assert el_surface(skipped) is None
    assert el_surface(_fits().assign(scope="family")) is None
    # the law row found among others
    assert el_surface(_fits(extra_rows=[_other_row()])) is not None


def test_a_row_without_fit_range_or_optimum():
    s = el_surface(_fits(fit_range={}))
    assert s.budget == EL_FALLBACK_BUDGET and s.extrapolated is None
    assert (s.A[0], s.A[-1]) == pytest.approx((2.0 ** -7, 1.0)) and (s.G[0], s.G[-1]) == pytest.approx((1.0, 64.0))
    flat = el_surface(_fits(params={**P, "gamma": -0.01}))
    assert flat.G_opt is None
    fig = F.el_surface_figure(flat)
    assert [t.type for t in fig.data] == ["heatmap"]
    with pytest.raises(ValueError, match="lacks"):
        el_surface(_fits().assign(parameters=json.dumps({"a": 1.0})))


def test_the_figure():
    s = el_surface(_fits(), 3e19)
    fig = F.el_surface_figure(s)
    heat, line = fig.data
    assert heat.type == "heatmap" and np.asarray(heat.z) == pytest.approx(s.EL)
    assert np.asarray(heat.x) == pytest.approx(s.A) and np.asarray(heat.y) == pytest.approx(s.G)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(line.y) == pytest.approx([s.G_opt] * 2) and "optimal G" in line.name
    assert "3e+19 FLOPs" in fig.layout.title.text and "extrapolated" not in fig.layout.title.text
    far = F.el_surface_figure(el_surface(_fits(), 1e23)).layout.title.text
    assert "1e+23 FLOPs" in far and "extrapolated" in far


# ----------------------------------------------------------------------------------------------------------
# The view and its callbacks


@pytest.fixture
def el_app(tmp_path, make_dash_store):
    """A small store whose sweep has a fits table with the law, and one without (sweep "bare")."""
    info = make_dash_store(str(tmp_path / "store"), n_trials=5, n_steps=4)
    write_fits_table(info.root, info.sweep, fits_table([_other_row(), *el_law_rows(
        ELFit(params=dict(P), objective=0.0, n_points=24, n_groups=8, fit_range=RANGE))]))
    bare = make_dash_store(str(tmp_path / "store"), n_trials=5, n_steps=4, sweep="bare")
    app = create_app(info.root, refresh_s=0, prewarm=False)
    return info, bare, app, app.server.test_client()


def _el_callback(client, sweep, budget, view="scaling"):
    """The EL surface callback, as the Dash renderer would call it after a budget change."""
    outs = ["scaling-el-graph.figure", "scaling-el-note.children", "scaling-el-version.data"]
    ins = [("view", "value", view), ("sweep", "value", sweep), ("status", "value", ["finished", "failed"]),
           ("family", "value", ["dense", "moe"]), ("tick", "n_intervals", 0), ("scaling-budget", "value", budget)]
    body = {"output": ".." + "...".join(outs) + "..",
            "outputs": [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in outs],
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in ins],
            "state": [{"id": "scaling-el-version", "property": "data", "value": None}],
            "changedPropIds": ["scaling-budget.value"]}
    r = client.post("/_dash-update-component", data=json.dumps(body),
                    headers={**LOCAL, "Content-Type": "application/json"})
    if r.status_code != 200:
        return r.status_code, None, None
    resp = r.get_json()["response"]
    return 200, resp["scaling-el-graph"]["figure"], resp["scaling-el-note"]["children"]


def _array(value) -> np.ndarray:
    """A figure array from a JSON response: a plain list, or plotly's typed array ({dtype, bdata, shape})."""
    if isinstance(value, dict) and "bdata" in value:
        shape = [int(n) for n in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape).astype(float)
    return np.asarray(value, dtype=float)


def _ids(component) -> set[str]:
    out = set()
    if getattr(component, "id", None):
        out.add(component.id)
    kids = getattr(component, "children", None)
    for k in kids if isinstance(kids, (list, tuple)) else [kids]:
        if k is not None and not isinstance(k, (str, int, float)):
            out |= _ids(k)
    return out


def test_the_scaling_view_draws_the_surface(el_app):
    info, bare, app, client = el_app
    assert {"scaling-budget", "scaling-el-graph", "scaling-el-note", "scaling-el-version"} <= _ids(app.layout)
    code, fig, note = _el_callback(client, info.sweep, 1e21)
    assert code == 200 and fig["data"][0]["type"] == "heatmap"
    assert "C = 1e+21 FLOPs" in fig["layout"]["title"]["text"] and "extrapolated" in fig["layout"]["title"]["text"]
    assert "optimal G" in fig["data"][1]["name"] and "outside the fitted compute range" in note
    expected = el_surface(app.reader.fits(info.sweep), 1e21)
    assert _array(fig["data"][0]["z"]) == pytest.approx(expected.EL)
    # an empty field: the middle of the fitted range
    code, fig, note = _el_callback(client, info.sweep, None)
    assert "C = 1e+19 FLOPs (within the fitted compute range)" in fig["layout"]["title"]["text"]
    # the same through Views, as the bench and notebooks call it
    assert Views(app.reader).el_surface(info.sweep, 2e19)[2].budget == 2e19


def test_the_scaling_view_says_why_there_is_no_surface(el_app):
    _, bare, _, client = el_app
    code, fig, note = _el_callback(client, bare.sweep, None)
    assert code == 200 and note == Views.NO_EL_LAW and "moelab fit" in note
    assert not any(t.get("type") == "heatmap" for t in fig["data"])


@pytest.mark.parametrize("forged", [-5, 0, "1e21", {"x": 1}, [1e21], True, 1e41])
def test_a_forged_budget_is_refused(el_app, forged):
    info, _, _, client = el_app
    code, fig, note = _el_callback(client, info.sweep, forged)
    assert code == 200 and note.startswith("budget: got")
    assert not any(t.get("type") == "heatmap" for t in fig["data"])


def test_the_surface_waits_for_its_view(el_app):
    info, _, _, client = el_app
    assert _el_callback(client, info.sweep, 1e21, view="curves")[0] == 204


def test_the_budget_lives_in_the_url(el_app):
    assert parse_state("?view=scaling&budget=1e21")["budget"] == 1e21
    for bad in ("-1", "0", "abc", "nan", "inf", "1e50", ""):
        assert parse_state(f"?budget={bad}")["budget"] is None, bad
    state = {**parse_state("?view=scaling"), "budget": 2.5e20}
    assert parse_state(encode_state(state))["budget"] == 2.5e20
    assert "budget" not in encode_state({**state, "budget": {"x": 1}})
    # the sync callback: the URL's budget reaches the field, the field's reaches the URL
    info, _, _, client = el_app
    outs = [("url", "search"), ("banner", "children"), ("tick", "disabled"), *CONTROLS.values(), *OPTIONS,
            *[(f"section-{k}", "style") for k in VIEWS]]
    ins = [("url", "search"), ("tick", "n_intervals"), *CONTROLS.values()]

    def sync(search, budget, changed):
        values = {("url", "search"): search, ("scaling-budget", "value"): budget}
        body = {"output": ".." + "...".join(f"{i}.{p}" for i, p in outs) + "..",
                "outputs": [{"id": i, "property": p} for i, p in outs],
                "inputs": [{"id": i, "property": p, "value": values.get((i, p))} for i, p in ins],
                "changedPropIds": [changed]}
        r = client.post("/_dash-update-component", data=json.dumps(body),
                        headers={**LOCAL, "Content-Type": "application/json"})
        assert r.status_code == 200
        return r.get_json()["response"]

    resp = sync(f"?view=scaling&sweep={info.sweep}&budget=1e21", None, "url.search")
    assert resp["scaling-budget"]["value"] == 1e21
    resp = sync(f"?view=scaling&sweep={info.sweep}", 3e20, "scaling-budget.value")
    assert parse_state(resp["url"]["search"])["budget"] == 3e20
    # a refused value never reaches the URL, and the field goes back to empty (the default)
    resp = sync(f"?view=scaling&sweep={info.sweep}", -3, "scaling-budget.value")
    assert "url" not in resp and resp["scaling-budget"]["value"] is None


def test_a_slow_view_answers_in_bounded_time(el_app, monkeypatch):
    """A view stuck reading (a slow or hostile store) does not hold the request: after request_timeout_s it
    answers with a message, and the next request is served normally once the read is done."""
    import threading
    import time

    info, _, _, _ = el_app
    release = threading.Event()
    real = Views.el_surface

    def stuck(self, sweep, budget):
        release.wait(10)
        return real(self, sweep, budget)

    monkeypatch.setattr(Views, "el_surface", stuck)
    app = create_app(info.root, refresh_s=0, prewarm=False, request_timeout_s=0.3)
    client = app.server.test_client()
    t0 = time.monotonic()
    code, fig, note = _el_callback(client, info.sweep, 1e21)
    assert code == 200 and time.monotonic() - t0 < 5
    assert "took longer than" in note and "try again" in note
    assert not any(t.get("type") == "heatmap" for t in fig["data"])
    release.set()
    code, fig, note = _el_callback(client, info.sweep, 1e21)
    assert code == 200 and fig["data"][0]["type"] == "heatmap"
