"""moelab.dashboards.figures: the traces each builder draws (counts, names, axes), on the synthetic store and
on hand-made frames; and the dashboard's URL state (parse / encode), which needs no browser."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moelab.dashboards import figures as F
from moelab.dashboards import query as Q
from moelab.dashboards.app import encode_state, parse_state


@pytest.fixture(scope="module")
def views(dash_store):
    r = Q.Reader(dash_store.root)
    t = r.trials()
    law = Q.dense_law(t)
    return r, t, law, Q.with_leverage(t, law)


def test_curves_grouped_traces(dash_store, views):
    r, t, *_ = views
    cd = Q.curve_data(r, dash_store.sweep, t, "loss", "tokens")
    fig = F.curves_figure(cd, log_x=True, log_y=True, uirevision="k")
    assert len(fig.data) == 9 * 3 + 1  # band, mean, runs per group + the diverged run's stop marker
    means = [tr.name for tr in fig.data if tr.name and tr.name.endswith(")") and "(N=" in tr.name]
    assert len(means) == 9 and all(m.endswith("(N=2)") for m in means)
    assert "ladder-2 (N=2)" in means
    bands = [tr for tr in fig.data if tr.fill == "toself"]
    assert len(bands) == 9 and all(len(b.x) > 0 for b in bands)
    runs = [tr for tr in fig.data if tr.name and tr.name.endswith(" runs")]
    assert len(runs) == 9 and all(tr.opacity < 0.5 for tr in runs)
    assert int(np.isnan(np.asarray(runs[0].x, float)).sum()) == 2  # two runs joined, a gap after each
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log" and fig.layout.uirevision == "k"
    stop = fig.data[-1]
    assert stop.mode == "markers" and list(stop.text) == dash_store.diverged


def test_curves_ungrouped_and_smoothed(dash_store, views):
    r, t, *_ = views
    dense = t[t.family == "dense"]
    plain = F.curves_figure(Q.curve_data(r, dash_store.sweep, dense, "loss", "step", group=None))
    assert len(plain.data) == 6 and {tr.name for tr in plain.data} == set(dense.trial_id)
    smooth = F.curves_figure(Q.curve_data(r, dash_store.sweep, dense, "loss", "step", group=None, smoothing=0.8))
    assert len(smooth.data) == 12  # raw (faint) + smoothed per run
    faint = smooth.data[0]
    assert faint.opacity < 1 and not faint.showlegend and smooth.data[1].line.width == 2
    empty = F.curves_figure(Q.curve_data(r, dash_store.sweep, dense, "aux_loss", "step"))
    assert len(empty.data) == 0 and "No finite values" in empty.layout.annotations[0].text


def test_effects_figure(views):
    _, t, _, tl = views
    eff = Q.axis_effects(tl, "upcycle.noise_std", "final_loss")
    fig = F.effects_figure(eff, "upcycle.noise_std", "final_loss")
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == ["0", "0.001", "0.01"]
    assert list(fig.data[0].marker.symbol) == ["star", "circle", "circle"]  # the baseline is marked
    split = Q.axis_effects(tl, "upcycle.noise_std", "leverage", split="model.moe.n_experts")
    fig2 = F.effects_figure(split, "upcycle.noise_std", "leverage")
    assert len(fig2.data) == 4 and {tr.name for tr in fig2.data if tr.showlegend is not False} == {"8", "16"}
    assert "No trials" in F.effects_figure(eff.iloc[0:0], "a", "m").layout.annotations[0].text


def test_scaling_figure(dash_store, views):
    r, t, law, tl = views
    pts = Q.scaling_points(tl, "model.moe.n_experts")
    fig = F.scaling_figure(pts, law)
    names = [tr.name for tr in fig.data]
    assert names[0].startswith("dense law") and "band" in names[0]
    assert names[1].startswith("dense law L = ") and "fitted here" in names[1]
    assert names[2:] == ["dense runs", "n_experts=16", "n_experts=8"]
    assert len(fig.layout.annotations) == 2 and all(a.text.startswith("EL ") for a in fig.layout.annotations)
    assert fig.layout.xaxis.type == "log"
    no_law = F.scaling_figure(pts, None)
    assert [tr.name for tr in no_law.data] == ["dense runs", "n_experts=16", "n_experts=8"]


def test_expert_figures(dash_store, views):
    r, t, *_ = views
    e = r.experts(dash_store.sweep, dash_store.moe[0])
    step, mat = Q.expert_load_at(e, None)
    heat = F.expert_heatmap(mat, step, dash_store.moe[0])
    z = np.asarray(heat.data[0].z)
    assert z.shape == (2, mat.shape[1]) and np.allclose(z.sum(axis=1), 1.0, atol=1e-5)
    assert heat.data[0].zmin == 0 and f"step {dash_store.steps[-1]}" in heat.layout.title.text
    over = F.expert_time_heatmap(Q.expert_load_over_time(e, 1, n_buckets=10), 1)
    assert np.asarray(over.data[0].z).shape == (mat.shape[1], 10)
    m = r.metrics(dash_store.sweep, [dash_store.moe[0]], ["imbalance", "drop_frac"])
    imb = F.imbalance_figure(Q.expert_imbalance(e), m)
    assert [tr.name for tr in imb.data] == ["layer 0", "layer 1", "imbalance (logged)", "drop_frac (logged)"]
    assert "No expert load" in F.expert_heatmap(pd.DataFrame(), None).layout.annotations[0].text


def test_domain_routing_figures(dash_store, views):
    r, t, *_ = views
    g = r.routing(dash_store.sweep, dash_store.moe[0])
    step, share = Q.domain_share_at(g, 1, None)
    heat = F.domain_heatmap(share, step, 1, dash_store.moe[0])
    z = np.asarray(heat.data[0].z)
    assert len(heat.data) == 1 and heat.data[0].type == "heatmap"
    assert z.shape == (4, share.shape[1]) and np.allclose(z.sum(axis=1), 1.0)  # rows: a domain's tokens
    assert f"Layer 1 at step {dash_store.steps[-1]}" in heat.layout.title.text
    spec = F.specialisation_figure(Q.specialisation(g))
    assert [tr.name for tr in spec.data] == ["layer 0", "layer 1"] and len(spec.data[0].x) == len(dash_store.steps)
    assert "No domain routing" in F.domain_heatmap(pd.DataFrame(), None, 0).layout.annotations[0].text
    assert "No domain routing" in F.specialisation_figure(pd.DataFrame()).layout.annotations[0].text


def test_parallel_and_overview_figures(views):
    _, t, _, tl = views
    pf = Q.parallel_frame(tl, "final_loss")
    fig = F.parallel_figure(pf, Q.axis_keys(tl), "final_loss")
    dims = fig.data[0].dimensions
    assert [d.label for d in dims] == ["model.moe.n_experts", "upcycle.noise_std", "final_loss"]
    assert list(dims[0].ticktext) == ["8", "16"] and len(dims[2].values) == 11
    mixed = pd.DataFrame({"a": [1, "auto", 2], "final_loss": [1.0, 2.0, 3.0]})
    d = F.parallel_figure(mixed, ["a"], "final_loss").data[0].dimensions[0]
    assert list(d.ticktext) == ["1", "auto", "2"]  # mixed types become categories
    ov = F.overview_figure(Q.sweeps_overview(t))
    assert [tr.name for tr in ov.data] == ["finished", "diverged"] and ov.data[0].x[0] == 17


def test_url_state_parse_and_encode():
    s = parse_state("?view=curves&metric=eval_loss&x=tokens&log=x,y&smooth=0.5&group=family,name&junk=1&step=300")
    assert s["view"] == "curves" and s["metric"] == "eval_loss" and s["log"] == ["x", "y"]
    assert s["group"] == ["family", "name"] and s["smooth"] == 0.5 and s["step"] == 300
    assert "junk" not in s
    bad = parse_state("?smooth=abc&step=x&layer=-&group=none&differ=0&view=%3Cscript%3E")
    assert bad["smooth"] == 0.0 and bad["step"] is None and bad["layer"] is None and bad["group"] == []
    assert bad["differ"] is False and bad["view"] == "<script>"  # checked against VIEWS later
    assert parse_state("?smooth=5")["smooth"] == 0.99 and parse_state(None)["group"] is None
    state = {**parse_state(""), "view": "curves", "sweep": "noise", "status": ["failed"], "group": ["seeds"],
             "metric": "loss", "x": "flops", "log": ["y"], "smooth": 0.25, "differ": True, "refresh": True,
             "_defaults": {"status": ["finished"]}}
    q = encode_state(state)
    assert q.startswith("?view=curves&sweep=noise&status=failed") and "x=flops" in q and "log=y" in q
    assert "group" not in q and "metric" not in q and "smooth=0.25" in q
    back = parse_state(q)
    assert back["x"] == "flops" and back["status"] == ["failed"] and back["smooth"] == 0.25
    assert "group=none" in encode_state({**state, "group": []})
