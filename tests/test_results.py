"""moelab.results over a synthetic store (moelab.platform.fixtures): what notebooks and the dashboard read."""

import json

import numpy as np
import pandas as pd
import pytest

import moelab.results as mr
from moelab.platform.fixtures import LAW, synthetic_store


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("results"))
    info = synthetic_store(root, n_steps=30, batch_steps=12)
    other = synthetic_store(root, sweep="second", n_trials=4, n_steps=5, restarts=0, diverged=0, experts=False)
    return info, other, mr.open(root)


def test_trials_table(syn):
    info, other, r = syn
    assert r.sweeps() == ["second", "synthetic"]
    t = r.trials(sweep="synthetic")
    assert sorted(t.trial_id) == sorted(info.trial_ids) and len(t) == 18
    assert t.groupby("family").size().to_dict() == {"dense": 6, "moe": 12}
    status = t.set_index("trial_id").status
    assert status[info.diverged].eq("diverged").all() and (status == "finished").sum() == 17
    assert t.set_index("trial_id").attempt[info.restarted].eq(1).all()
    # axis columns, flattened config, counts; `axis_values` as JSON
    moe = t[t.family == "moe"]
    assert sorted(moe["model.moe.n_experts"].unique()) == [8, 16]
    assert sorted(moe["upcycle.noise_std"].unique()) == [0.0, 1e-3, 1e-2]
    assert set(json.loads(moe.axis_values.iloc[0])) == {"model.moe.n_experts", "upcycle.noise_std"}
    assert (moe.depends_on.str.startswith("ladder-2-")).all() and t[t.family == "dense"].depends_on.isna().all()
    assert (t.params_active > 0).all() and (t.flops_per_token > 6 * t.params_active * 0.5).all()
    assert len(r.trials()) == 22 and len(r.trials(sweep=["second"])) == 4


def test_metrics_deduplicated_and_sorted(syn):
    info, _, r = syn
    m = r.metrics(sweep="synthetic")
    got = {tid: g.step.tolist() for tid, g in m.groupby("trial_id")}
    assert got == info.logged
    assert not m.duplicated(["trial_id", "step"]).any()
    assert m.equals(m.sort_values(["sweep", "trial_id", "step"]).reset_index(drop=True))
    (restarted,) = info.restarted
    att = m[m.trial_id == restarted].attempt.to_numpy()
    assert att[0] == 0 and att[-1] == 1 and np.all(np.diff(att) >= 0)
    (div,) = info.diverged
    assert np.isnan(m[m.trial_id == div].loss.iloc[-1])


def test_metric_selection(syn):
    info, _, r = syn
    m = r.metrics(sweep="synthetic", trials=info.trial_ids[:2], columns=["loss", "eval_loss"])
    assert list(m.columns) == ["sweep", "trial_id", "step", "attempt", "loss", "eval_loss"]
    assert set(m.trial_id) == set(info.trial_ids[:2]) and len(m) == 60
    assert r.metrics(trials="nope").empty


def test_losses_follow_the_known_law(syn):
    """The synthetic curves are what the fits will be checked against: the final dense loss ranks by size."""
    info, _, r = syn
    t = r.trials(sweep="synthetic")
    dense = t[(t.family == "dense")].groupby("preset").final_loss.mean()
    assert dense["ladder-2"] > dense["ladder-3"] > dense["ladder-4"] > LAW["E"]
    moe = t[(t.family == "moe") & (t.status == "finished")].groupby("model.moe.n_experts").final_loss.mean()
    assert moe[16] < moe[8] < dense["ladder-2"]


def test_experts(syn):
    info, other, r = syn
    e = r.experts(sweep="synthetic")
    assert set(e.trial_id) == set(info.moe)
    per = e.groupby(["trial_id", "step", "layer"]).load.sum()
    assert np.allclose(per.to_numpy(), 1.0, atol=1e-5)
    ntr = e[e.trial_id == info.moe[-1]]
    assert ntr.expert.nunique() in (8, 16) and ntr.layer.nunique() == 2
    assert r.experts(sweep="second").empty


def test_routing(syn):
    info, other, r = syn
    g = r.routing(sweep="synthetic")
    keys = ["trial_id", "step", "layer", "domain", "expert"]
    assert set(g.trial_id) == set(info.moe) and g.tokens.dtype == np.int64 and (g.tokens >= 0).all()
    assert not g.duplicated(keys).any() and g.equals(g.sort_values(["sweep", *keys]).reset_index(drop=True))
    steps = {t: sorted(x.step.unique().tolist()) for t, x in g.groupby("trial_id")}
    assert steps == {t: info.logged[t] for t in info.moe}
    (restarted,) = info.restarted
    att = g[g.trial_id == restarted].groupby("step").attempt.agg(["min", "max"])
    assert (att["min"] == att["max"]).all() and att["max"].iloc[0] == 0 and att["max"].iloc[-1] == 1
    # summed over domains, the routed tokens are the experts table's load
    per = g.groupby(["trial_id", "step", "layer", "expert"]).tokens.sum()
    frac = per / per.groupby(level=[0, 1, 2]).transform("sum")
    load = r.experts(sweep="synthetic").set_index(["trial_id", "step", "layer", "expert"]).load
    assert np.allclose(frac.to_numpy(), load.reindex(frac.index).to_numpy(), atol=2e-3)
    # the fixture's experts specialise: domains send their tokens to the experts in ever more different shares
    one = g[(g.trial_id == info.moe[0]) & (g.layer == 0)]

    def spread(step):  # mean over experts of (max - min over domains) of the share of a domain's tokens
        m = one[one.step == step].pivot(index="domain", columns="expert", values="tokens").to_numpy(float)
        share = m / m.sum(1, keepdims=True)
        return (share.max(0) - share.min(0)).mean()

    assert spread(info.steps[0]) < 0.05 and spread(info.steps[-1]) > 0.15
    assert r.routing(sweep="second").empty
    some = r.routing(trials=info.moe[1], steps=info.steps[:2])
    assert set(some.trial_id) == {info.moe[1]} and sorted(some.step.unique()) == info.steps[:2]
    # the DuckDB view holds the same deduplicated rows
    q = r.sql("SELECT trial_id, count(*) AS n, sum(tokens) AS s, max(attempt) AS a FROM routing "
              "GROUP BY 1 ORDER BY 1")
    want = g.groupby("trial_id").agg(n=("tokens", "size"), s=("tokens", "sum"), a=("attempt", "max"))
    assert q.trial_id.tolist() == want.index.tolist()
    assert q.n.tolist() == want.n.tolist() and q.s.tolist() == want.s.tolist() and q.a.tolist() == want.a.tolist()


def test_sql(syn):
    info, _, r = syn
    q = r.sql("""
        SELECT t.family, count(DISTINCT m.trial_id) AS trials, count(*) AS rows
        FROM metrics m JOIN trials t USING (sweep, trial_id)
        WHERE m.sweep = 'synthetic' GROUP BY 1 ORDER BY 1""")
    assert q.trials.tolist() == [6, 12]
    assert q.rows.sum() == sum(len(v) for v in info.logged.values())
    last = r.sql("SELECT trial_id, max(step) AS s FROM metrics WHERE sweep = 'synthetic' GROUP BY 1")
    assert dict(zip(last.trial_id, last.s)) == {k: v[-1] for k, v in info.logged.items()}
    with r.connect() as con:
        assert con.execute("SELECT count(*) FROM experts").fetchone()[0] == len(r.experts())


def test_pandas_frames_are_plain(syn):
    _, _, r = syn
    m = r.metrics(sweep="second")
    assert isinstance(m, pd.DataFrame) and m.step.dtype == np.int64 and m.loss.dtype == np.float64
