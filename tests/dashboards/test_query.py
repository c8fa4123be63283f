"""moelab.dashboards.query: aggregates against hand-computed values, the cached reader against the public
read API (moelab.results), and the store's bad cases (missing, empty, unreadable files)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

import moelab.results as mr
from moelab.dashboards import query as Q
from moelab.platform.store import Store


# ---------------------------------------------------------------------------------------------------------------
# Pure functions, hand-computed


def test_aggregate_seeds_hand_computed():
    # group a: two runs at x = 10, 20, 30 -> mean (2, 3, 4), sample std sqrt(2), stderr 1; group b: one run.
    frame = pd.DataFrame({
        "group": ["a"] * 6 + ["b"] * 3,
        "run": ["r1"] * 3 + ["r2"] * 3 + ["r3"] * 3,
        "x": [10, 20, 30, 10, 20, 30, 10, 20, 30],
        "y": [1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0],
    })
    out = Q.aggregate_seeds(frame, n_buckets=100)
    a = out[out.group == "a"]
    assert a.x.tolist() == [10, 20, 30]
    assert np.allclose(a["mean"], [2, 3, 4])
    assert np.allclose(a["std"], math.sqrt(2)) and np.allclose(a["stderr"], 1.0)
    assert a.n.tolist() == [2, 2, 2]
    b = out[out.group == "b"]
    assert np.allclose(b["mean"], [7, 8, 9]) and b.n.tolist() == [1, 1, 1] and b["std"].isna().all()


def test_aggregate_seeds_uneven_runs_and_nonfinite():
    # r2 stopped after x=20 and logged a NaN there: the last buckets have one run, the NaN is ignored.
    frame = pd.DataFrame({"group": ["g"] * 6, "run": ["r1"] * 3 + ["r2"] * 3,
                          "x": [1, 2, 3, 1, 2, 3], "y": [1.0, 1.0, 1.0, 3.0, np.nan, np.inf]})
    out = Q.aggregate_seeds(frame, n_buckets=10)
    assert out.n.tolist() == [2, 1, 1]
    assert np.allclose(out["mean"], [2.0, 1.0, 1.0])
    # Several points of one run in one bucket count once (their mean), so N stays the number of runs.
    dense = pd.DataFrame({"group": ["g"] * 4, "run": ["r1", "r1", "r2", "r2"], "x": [1, 2, 1, 2],
                          "y": [0.0, 2.0, 4.0, 6.0]})
    one = Q.aggregate_seeds(dense, n_buckets=1)
    assert one.n.tolist() == [2] and np.allclose(one["mean"], [3.0]) and np.allclose(one.x, [1.5])


def test_m4_keeps_spikes_and_ends():
    n = 20_000
    x = np.arange(n, dtype=float)
    y = np.sin(x / 500.0)
    y[12_345] = 100.0  # a one-step spike
    y[777] = -50.0  # and a dip
    frame = pd.DataFrame({"run": ["a"] * n + ["b"] * n, "x": np.r_[x, x], "y": np.r_[y, -y]})
    out = Q.m4_downsample(frame, n_buckets=50)
    for run, sign in (("a", 1), ("b", -1)):
        d = out[out.run == run]
        assert len(d) <= 4 * 50
        assert d.x.iloc[0] == 0 and d.x.iloc[-1] == n - 1  # first and last point kept
        assert np.all(np.diff(d.x) > 0)
        spike = d[d.x == 12_345]
        assert len(spike) == 1 and spike.y.iloc[0] == sign * 100.0
        assert (d.x == 777).any()
        assert d.y.max() == max(sign * 100.0, sign * -50.0) or d.y.min() == min(sign * 100.0, sign * -50.0)


def test_m4_small_runs_whole_and_log_x():
    frame = pd.DataFrame({"run": [1, 1, 1, 2], "x": [0.0, 1.0, 2.0, 5.0], "y": [3.0, 2.0, 1.0, 4.0]})
    out = Q.m4_downsample(frame, n_buckets=10)
    assert out.run.tolist() == [1, 1, 1, 2] and out.y.tolist() == [3.0, 2.0, 1.0, 4.0]
    logged = Q.m4_downsample(frame, n_buckets=10, log_x=True)
    assert 0.0 not in logged.x.tolist() and len(logged) == 3
    with pytest.raises(ValueError):
        Q.m4_downsample(frame, n_buckets=0)


def test_ema_hand_computed():
    y = np.array([1.0, 2.0, 10.0, 20.0])
    assert np.array_equal(Q.ema(y, np.array([0]), 0.0), y)
    out = Q.ema(y, np.array([0, 2]), 0.5)  # two runs: the average restarts at index 2
    # s1 = 0.5 * 1 -> 0.5 / 0.5 = 1; s2 = 0.5 * 0.5 + 0.5 * 2 = 1.25 -> 1.25 / 0.75
    assert np.allclose(out, [1.0, 1.25 / 0.75, 10.0, (0.5 * 5 + 10) / 0.75])
    with pytest.raises(ValueError):
        Q.ema(y, np.array([0]), 1.0)


def _trials(**cols):
    return pd.DataFrame(cols)


def test_runs_table_only_differing_and_mixed_types():
    t = _trials(sweep=["s"] * 3, trial_id=["a", "b", "c"], status=["finished", "failed", "running"],
                family=["moe"] * 3, error=[None, "CUDA OOM", None], seed=[0, 1, 0],
                axis_values=[json.dumps({"k": 1}), json.dumps({"k": "auto"}), json.dumps({"k": 1})],
                **{"model.d": [64, 64, 64], "k": [1, "auto", 1], "opt.lr": [1e-3, 1e-3, np.nan]})
    full = Q.runs_table(t)
    assert {"model.d", "k", "opt.lr", "axis:k", "error"} <= set(full.columns)
    assert "axis_values" not in full and "config" not in full
    diff = Q.runs_table(t, only_differing=True)
    assert "model.d" not in diff.columns  # constant
    assert {"k", "opt.lr", "axis:k"} <= set(diff.columns)  # differs (mixed types; NaN counts as a value)
    assert diff.loc[diff.trial_id == "b", "error"].iloc[0] == "CUDA OOM"
    assert list(diff.columns[:3]) == ["trial_id", "status", "family"]


def test_axis_frame_and_filters():
    t = _trials(sweep=["s", "s", "s", "o"], trial_id=["d", "m1", "m2", "x"], status=["finished"] * 3 + ["failed"],
                family=["dense", "moe", "moe", "moe"],
                axis_values=["{}", '{"a": 1, "b": "x"}', '{"a": 2}', "not json"])
    assert Q.axis_keys(t) == ["a", "b"]
    ax = Q.axis_frame(t)
    assert ax["a"].tolist()[1:3] == [1, 2] and math.isnan(ax["a"].iloc[0]) and math.isnan(ax["b"].iloc[2])
    assert Q.filter_trials(t, "s", ["finished"], ["moe"]).trial_id.tolist() == ["m1", "m2"]
    assert Q.filter_trials(t, "s", [], None).empty


def test_assign_groups():
    t = _trials(trial_id=["a0", "a1", "b0", "d0", "d1"], family=["moe", "moe", "moe", "dense", "dense"],
                name=[None, None, None, "ladder-2", "ladder-2"], seed=[0, 1, 0, 0, 1],
                **{"train.seed": [0, 1, 0, 0, 1], "model.moe.n_experts": [8, 8, 16, 0, 0]},
                axis_values=['{"model.moe.n_experts": 8}'] * 2 + ['{"model.moe.n_experts": 16}', "{}", "{}"])
    g = Q.assign_groups(t, Q.ALL_BUT_SEED)
    assert g.tolist() == ["n_experts=8", "n_experts=8", "n_experts=16", "ladder-2", "ladder-2"]
    assert Q.assign_groups(t, ["family"]).tolist() == ["family=moe"] * 3 + ["family=dense"] * 2
    assert Q.assign_groups(t, None).tolist() == t.trial_id.tolist()
    assert Q.assign_groups(t, ["no.such.key"]).nunique() == 1  # unknown keys are ignored, not an error
    assert Q.assign_groups(t, ["seed"]).tolist() == ["seed=0", "seed=1", "seed=0", "seed=0", "seed=1"]


def test_effects_intervals_and_split():
    rows = []
    for a, base in ((1, 3.0), (2, 2.5)):
        for b in ("x", "y"):
            for seed, noise in ((0, -0.1), (1, 0.0), (2, 0.1)):
                rows.append({"trial_id": f"{a}{b}{seed}", "seed": seed, "final_loss": base + noise + (b == "y"),
                             "axis_values": json.dumps({"a": a, "b": b})})
    t = pd.DataFrame(rows)
    e = Q.axis_effects(t, "a", "final_loss")  # pooled over b: per (a, seed) the mean of x and y
    assert e.value.tolist() == [1, 2] and e.n.tolist() == [3, 3]
    assert np.allclose(e["mean"], [3.5, 3.0]) and e.is_baseline.tolist() == [True, False]
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # std of (-0.1, 0, 0.1) is 0.1
    assert np.allclose(e.ci_hi - e["mean"], half)
    assert np.isclose(e["diff"].iloc[1], -0.5)
    s = Q.axis_effects(t, "a", "final_loss", baseline="2", split="b")  # URL baselines come as text
    assert len(s) == 4 and set(s.split) == {"x", "y"}
    assert s[s.is_baseline].value.tolist() == [2, 2]
    with pytest.raises(ValueError):
        Q.axis_effects(t, "nope", "final_loss")


def test_expert_summaries_hand_computed():
    e = pd.DataFrame({"step": [10] * 6 + [20] * 6, "layer": [0, 0, 0, 1, 1, 1] * 2, "expert": [0, 1, 2] * 4,
                      "load": [0.5, 0.25, 0.25, 1 / 3, 1 / 3, 1 / 3, 0.2, 0.3, 0.5, 0.6, 0.2, 0.2]})
    used, mat = Q.expert_load_at(e, 14)
    assert used == 10 and mat.shape == (2, 3) and mat.loc[0, 0] == 0.5
    assert Q.expert_load_at(e, None)[0] == 20
    imb = Q.expert_imbalance(e)
    l0 = imb[imb.layer == 0].set_index("step")
    assert np.isclose(l0.loc[10, "imbalance"], 1.5) and np.isclose(l0.loc[20, "imbalance"], 1.5)
    assert np.isclose(imb[(imb.layer == 1) & (imb.step == 10)].imbalance.iloc[0], 1.0)
    over = Q.expert_load_over_time(e, 0, n_buckets=1)  # both steps in one bucket: the mean load
    assert over.shape == (3, 1) and np.allclose(over.iloc[:, 0], [0.35, 0.275, 0.375])
    assert Q.expert_load_over_time(e, 5).empty


def _routing(counts, step=10, layer=0):
    """Routing rows of one (step, layer) from a [domains, experts] count matrix."""
    c = np.asarray(counts)
    d, e = np.indices(c.shape)
    return pd.DataFrame({"step": step, "layer": layer, "domain": d.ravel(), "expert": e.ravel(),
                         "tokens": c.ravel()})


def test_specialisation_hand_computed():
    r = pd.concat([
        _routing([[5, 0, 0, 0], [0, 3, 4, 0], [0, 0, 0, 9]], step=10),  # every expert sees one domain
        _routing([[2, 2, 4, 0], [1, 1, 2, 0], [3, 3, 6, 0]], step=20),  # same proportions in every domain
        _routing([[3, 1], [1, 3]], step=10, layer=1),  # I / H = 1 - H_b(1/4) / log 2
        _routing([[3, 0], [0, 0]], step=10, layer=2),  # one domain: nothing to tell apart
    ])
    spec = Q.specialisation(r).set_index(["layer", "step"]).specialisation
    assert spec[(0, 10)] == pytest.approx(1.0) and spec[(0, 20)] == pytest.approx(0.0, abs=1e-12)
    hb = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert spec[(1, 10)] == pytest.approx(1 - hb / math.log(2))
    # the same from the definition, p(d, e) log(p(d, e) / (p(d) p(e))) summed, over H(D)
    p = np.array([[3, 1], [1, 3]]) / 8
    mi = (p * np.log(p / np.outer(p.sum(1), p.sum(0)))).sum()
    assert spec[(1, 10)] == pytest.approx(mi / math.log(2))
    assert math.isnan(spec[(2, 10)])
    assert list(Q.specialisation(r.iloc[0:0]).columns) == ["step", "layer", "specialisation"]


def test_domain_share_at():
    r = pd.concat([_routing([[5, 0, 0], [0, 3, 4]], step=10), _routing([[1, 1, 2], [0, 0, 0]], step=20),
                   _routing([[9, 9, 9], [9, 9, 9]], step=10, layer=1)])
    used, share = Q.domain_share_at(r, 0, 12)
    assert used == 10 and share.shape == (2, 3)
    assert np.allclose(share.to_numpy(), [[1, 0, 0], [0, 3 / 7, 4 / 7]])
    used, share = Q.domain_share_at(r, 0)  # the last step; a domain without tokens is NaN, not 0
    assert used == 20 and np.allclose(share.loc[0], [0.25, 0.25, 0.5]) and share.loc[1].isna().all()
    used, share = Q.domain_share_at(r, 5)  # a layer without rows
    assert used is None and share.empty


def test_sweeps_overview_counts():
    t = _trials(sweep=["a", "a", "a", "b"], trial_id=["1", "2", "3", "4"],
                status=["finished", "failed", None, "running"],
                updated_at=pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"], utc=True))
    ov = Q.sweeps_overview(t, ["a", "b", "c"]).set_index("sweep")
    assert ov.loc["a", ["trials", "finished", "failed", "other"]].tolist() == [3, 1, 1, 1]
    assert ov.loc["b", "running"] == 1 and ov.loc["c", "trials"] == 0
    assert ov.loc["a", "last_update"].startswith("2026-01-03")
    assert Q.recent_failures(t).trial_id.tolist() == ["2"]


# ---------------------------------------------------------------------------------------------------------------
# The reader against the store


def test_reader_matches_results_api(dash_store, reader):
    ids = dash_store.trial_ids
    got = reader.metrics(dash_store.sweep, ids, ["loss", "tokens"])
    ref = mr.open(dash_store.root).metrics(dash_store.sweep, columns=["loss", "tokens"])
    assert len(got) == len(ref) == sum(len(v) for v in dash_store.logged.values())
    got = got.assign(trial_id=got.trial_id.astype(str)).sort_values(["trial_id", "step"]).reset_index(drop=True)
    assert got.trial_id.tolist() == ref.trial_id.tolist() and got.step.tolist() == ref.step.tolist()
    assert np.allclose(got.loss, ref.loss, equal_nan=True) and np.array_equal(got.tokens, ref.tokens)
    (restarted,) = dash_store.restarted  # rows of the second attempt won
    want = ref[ref.trial_id == restarted].loss.to_numpy()
    assert np.allclose(got[got.trial_id == restarted].loss.to_numpy(), want)
    t = reader.trials()
    assert len(t) == len(ids) and set(t.trial_id) == set(ids) and (t.sweep == dash_store.sweep).all()
    assert t.loc[t.trial_id.isin(dash_store.diverged), "status"].tolist() == ["diverged"]


def test_reader_routing(dash_store, reader):
    tid = dash_store.restarted[0]
    got = reader.routing(dash_store.sweep, tid)
    ref = mr.open(dash_store.root).routing(dash_store.sweep, tid)
    assert list(got.columns) == ["step", "layer", "domain", "expert", "tokens"] and len(got) == len(ref) > 0
    assert got.tokens.tolist() == ref.tokens.tolist()
    dense = [t for t in dash_store.trial_ids if t not in dash_store.moe][0]
    assert reader.routing(dash_store.sweep, dense).empty
    spec = Q.specialisation(got)  # the fixture's experts specialise over training
    first, last = spec.groupby("layer").specialisation.first(), spec.groupby("layer").specialisation.last()
    assert (first < 0.1).all() and (last > 0.3).all()


def test_reader_order_and_missing_trials(dash_store, reader):
    ids = [dash_store.trial_ids[3], "no-such-trial", dash_store.trial_ids[0]]
    m = reader.metrics(dash_store.sweep, ids, ["loss"])
    assert list(m.trial_id.cat.categories) == [ids[0], ids[2]]
    assert m.trial_id.astype(str).iloc[0] == ids[0]
    with pytest.raises(KeyError):
        reader.metrics(dash_store.sweep, ids, ["no_such_metric"])
    assert reader.metrics("no-such-sweep", ids, ["loss"]).empty


def test_reader_rereads_only_changed_files(tmp_path, make_dash_store, monkeypatch):
    info = make_dash_store(str(tmp_path / "s"), n_trials=9, n_steps=20)
    r = Q.Reader(info.root)
    scans = []
    real = Q.Reader._scan

    def counting(self, res, files, cols):
        scans.append((len(files), tuple(cols)))
        return real(self, res, files, cols)

    monkeypatch.setattr(Q.Reader, "_scan", counting)
    r.metrics(info.sweep, info.trial_ids, ["loss"])
    assert len(scans) == 1
    r.metrics(info.sweep, info.trial_ids, ["loss"])
    assert len(scans) == 1  # cached
    r.metrics(info.sweep, info.trial_ids, ["loss", "lr"])
    assert scans[-1][1] == ("lr",)  # only the missing column
    v0 = r.version(info.sweep)
    tid = info.trial_ids[0]
    with Store(info.root) as st:  # a running trial logs more steps
        st.append_metrics(info.sweep, tid, 0, [{"step": 10_000, "loss": 1.5, "lr": 1e-4}])
    assert r.version(info.sweep) != v0
    m = r.metrics(info.sweep, info.trial_ids, ["loss", "lr"])
    assert scans[-1][0] == 2  # that trial's two files, both columns
    last = m[m.trial_id == tid].iloc[-1]
    assert last.step == 10_000 and last.loss == 1.5 and last.lr == 1e-4


def test_reader_missing_empty_and_unreadable(tmp_path, make_dash_store):
    with pytest.raises(Q.StoreUnavailable, match="No results store"):
        Q.Reader(str(tmp_path / "nothing")).trials()
    (tmp_path / "empty").mkdir()
    empty = Q.Reader(str(tmp_path / "empty"))
    assert empty.trials().empty and empty.sweeps() == []
    info = make_dash_store(str(tmp_path / "s"), n_trials=9, n_steps=10)
    part = os.path.join(info.root, "trials", f"sweep={info.sweep}")
    with open(os.path.join(part, "broken.parquet"), "wb") as f:  # a truncated upload
        f.write(b"PAR1 not really")
    with open(os.path.join(part, ".tmp-123-x.parquet"), "wb") as f:  # being written: never read
        f.write(b"")
    mpart = os.path.join(info.root, "metrics", f"sweep={info.sweep}")
    bad = f"{info.trial_ids[0]}.a000.s000000999-000000999.parquet"
    with open(os.path.join(mpart, bad), "wb") as f:
        f.write(b"garbage")
    r = Q.Reader(info.root)
    t = r.trials()
    assert len(t) == 9
    m = r.metrics(info.sweep, info.trial_ids, ["loss"])
    assert m.trial_id.nunique() == 9 and m.step.max() == 100  # the bad batch is skipped, the rest read
    assert any(p.endswith("broken.parquet") for p in r.warnings)
    assert any(p.endswith(bad) for p in r.warnings)
    assert not any(".tmp-" in p for p in r.warnings)


def test_reader_mixed_type_trial_columns(tmp_path):
    root = str(tmp_path / "s")
    with Store(root) as st:
        st.write_trial({"sweep": "s", "trial_id": "a", "status": "finished", "k": 8})
        st.write_trial({"sweep": "s", "trial_id": "b", "status": "finished", "k": "auto"})
        st.write_trial({"sweep": "t", "trial_id": "a", "status": "running"})
    t = Q.Reader(root).trials()
    assert t[["sweep", "trial_id"]].values.tolist() == [["s", "a"], ["s", "b"], ["t", "a"]]
    assert sorted(map(str, t.k.dropna())) == ["8", "auto"]


# ---------------------------------------------------------------------------------------------------------------
# Views over the synthetic store


def test_curve_data_grouped_matches_hand_mean(dash_store, reader):
    t = reader.trials()
    cd = Q.curve_data(reader, dash_store.sweep, t, "loss", "step")
    assert cd.grouped and len(cd.group_n) == 9 and sum(cd.group_n.values()) == 18
    assert set(cd.group_n.values()) == {2}
    ref = mr.open(dash_store.root).metrics(dash_store.sweep, columns=["loss"])
    pair = t[t.name == "ladder-3"].trial_id.tolist()
    want = ref[ref.trial_id.isin(pair)].groupby("step").loss.agg(["mean", "std", "count"])
    got = cd.agg[cd.agg.group == "ladder-3"].set_index("x")
    assert np.allclose(got["mean"].to_numpy(), want["mean"].to_numpy())
    assert np.allclose(got["stderr"].to_numpy(), (want["std"] / np.sqrt(want["count"])).to_numpy())
    (div,) = dash_store.diverged
    assert cd.ended.run.tolist() == [div] and cd.ended.status.tolist() == ["diverged"]
    # the diverged run's group has N=1 after the NaN step
    g = t.loc[t.trial_id == div].index
    lab = Q.assign_groups(t, Q.ALL_BUT_SEED)[g[0]]
    assert cd.agg[cd.agg.group == lab].n.iloc[-1] == 1
    assert set(cd.runs.run) == set(t.trial_id)


def test_curve_data_variants(dash_store, reader):
    t = reader.trials()
    fam = Q.curve_data(reader, dash_store.sweep, t, "loss", "tokens", group=["family"], smoothing=0.9, log_x=True)
    assert fam.group_n == {"family=dense": 6, "family=moe": 12}
    raw = Q.curve_data(reader, dash_store.sweep, t, "loss", "tokens", group=["family"], log_x=True)
    assert not np.allclose(fam.agg["mean"], raw.agg["mean"])  # smoothing reaches the mean...
    assert fam.runs.equals(raw.runs)  # ...while the runs under it stay raw
    runs_only = Q.curve_data(reader, dash_store.sweep, t, "loss", "tokens", group=["family"], aggregate=False)
    assert runs_only.agg.empty and runs_only.runs.equals(Q.curve_data(reader, dash_store.sweep, t, "loss", "tokens",
                                                                      group=["family"]).runs)
    single = Q.curve_data(reader, dash_store.sweep, t, "loss", "step", group=None, smoothing=0.5, max_single=5)
    assert not single.grouped and single.runs.run.nunique() == 5 and single.smooth.run.nunique() == 5
    assert "first 5 of 18" in single.note
    sparse = Q.curve_data(reader, dash_store.sweep, t, "aux_loss", "step", group=["family"])
    assert set(sparse.group_n) == {"family=moe"}  # dense runs have no aux loss
    none = Q.curve_data(reader, dash_store.sweep, t[t.family == "dense"], "aux_loss", "step")
    assert none.note and none.runs.empty
    with pytest.raises(KeyError):
        Q.curve_data(reader, dash_store.sweep, t, "loss", "nope")


def test_dense_law_leverage_and_fits_table(tmp_path, make_dash_store):
    info = make_dash_store(str(tmp_path / "s"), n_steps=20)
    r = Q.Reader(info.root)
    t = r.trials()
    law = Q.dense_law(t)
    assert law is not None and law.source == "fitted here" and law.n_points == 6 and law.boot is not None
    tl = Q.with_leverage(t, law)
    moe = tl[(tl.family == "moe") & (tl.status == "finished")]
    # The fixture's MoE runs are better than dense at their compute (N_eff grows with (E/k)^0.3): EL > 1,
    # and 16 experts more than 8.
    assert (moe.leverage > 1).all()
    by = moe.groupby("model.moe.n_experts").leverage.mean()
    assert by[16] > by[8]
    assert tl.loc[tl.trial_id.isin(info.diverged), "leverage"].isna().all()
    assert tl.loc[tl.family == "dense", "leverage"].isna().all()
    # by hand: C_dense(L) = (A / L)^(1/alpha)
    row = moe.iloc[0]
    assert np.isclose(row.leverage, (law.A / row.final_loss) ** (1 / law.alpha) / row.final_flops)
    assert r.fits(info.sweep) is None
    fits_dir = os.path.join(info.root, "fits", f"sweep={info.sweep}")
    os.makedirs(fits_dir)
    pq.write_table(pa.table({"family": ["dense", "moe"], "law": ["power_law"] * 2,
                             "parameters": [json.dumps({"E": 0.0, "A": 10.0, "alpha": 0.05}), "{}"]}),
                   os.path.join(fits_dir, "fits.parquet"))
    fl = Q.fits_law(r.fits(info.sweep))
    assert fl is not None and fl.source == "fits table" and (fl.A, fl.alpha) == (10.0, 0.05)
    assert Q.fits_law(pd.DataFrame({"family": ["dense"], "parameters": ["{}"]})) is None
    only_one = t[(t.family == "moe") | (t.name == "ladder-2")]
    assert Q.dense_law(only_one) is None  # one dense size: no law


def test_scaling_and_parallel_frames(dash_store, reader):
    t = reader.trials()
    tl = Q.with_leverage(t, Q.dense_law(t))
    pts = Q.scaling_points(tl, "model.moe.n_experts")
    assert (pts.family == "dense").sum() == 6 and (pts.family == "moe").sum() == 11  # diverged left out
    assert set(pts[pts.family == "moe"].label) == {"n_experts=8", "n_experts=16"}
    assert set(pts[pts.family == "dense"].label) == {"dense ladder-2", "dense ladder-3", "dense ladder-4"}
    pf = Q.parallel_frame(tl, "final_loss")
    assert len(pf) == 11 and list(pf.columns) == ["trial_id", "model.moe.n_experts", "upcycle.noise_std",
                                                  "final_loss"]
    assert len(Q.parallel_frame(tl, "leverage")) == 11
