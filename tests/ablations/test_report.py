"""Tests for moelab.ablations.report: fits over a store, the fits table, the HTML report, degenerate stores."""

from __future__ import annotations

import json
import re

import importlib.util

import duckdb
import numpy as np
import pytest

from moelab.ablations.analysis import analyse
from moelab.ablations.report import read_fits, run_fit, summary_text, write_fits
from moelab.platform.fixtures import LAW, synthetic_store
from moelab.platform.store import Store

HAS_PLOTLY = importlib.util.find_spec("plotly") is not None  # figures need it; text and tables do not
N_BOOT = 30  # small: the bootstrap only has to exist here


def _text(path) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


# ----------------------------------------------------------------------------------------------------------
# The synthetic store (dense ladder-2/3/4 + MoE n_experts x noise_std, 2 seeds, one diverged MoE trial)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    info = synthetic_store(root)
    # The fixture's law is in params_active (embeddings included), so fit in those units to check the truth.
    analysis, report = run_fit(root, report_path=root / "out" / "report.html", n_boot=N_BOOT,
                               n_column="params_active")
    return root, info, analysis, report


def _true_leverage(n_experts: int, top_k: int, noise_std: float, active: float) -> float:
    """The fixture's parameter leverage: N_eff = active (E/k)^0.3, +0.02 loss for noise >= 1e-2, so the dense
    equivalent solves A/N^alpha = A/N_eff^alpha + penalty."""
    n_eff = active * (n_experts / top_k) ** LAW["leverage_exp"]
    penalty = 0.02 if noise_std >= 1e-2 else 0.0
    n_eq = (n_eff ** -LAW["alpha"] + penalty / LAW["A"]) ** (-1.0 / LAW["alpha"])
    return n_eq / active


def test_upcycled_trials_count_their_sources_tokens_and_flops(fitted):
    _, _, a, _ = fitted
    t = a.trials.set_index("trial_id")
    up = t[t["depends_on"].notna() & t["usable"]]
    assert len(up) > 0
    for tid, row in up.iterrows():
        src = t.loc[row["depends_on"]]
        assert row["D0"] == src["final_tokens"] and row["C0"] == pytest.approx(src["final_flops"])
        assert row["D"] == row["final_tokens"] + src["final_tokens"]
        assert row["C"] == pytest.approx(row["final_flops"] + src["final_flops"])
    dense = t[t["family"] == "dense"]
    assert (dense["D0"] == 0).all() and (dense["D"] == dense["final_tokens"]).all()
    # the curve points of an upcycled trial are shifted by the same amount
    cp = a.curve_points
    tid = up.index[0]
    assert cp.loc[cp["trial_id"] == tid, "D"].min() > up.loc[tid, "D0"]
    assert any("include their dense source's training" in n for n in a.notes)


def test_dense_law_recovered(fitted):
    _, _, a, _ = fitted
    assert a.points == "curve"  # every dense baseline trains for the same tokens: final points have one D
    fit = a.dense_fit
    assert fit is not None
    assert fit.alpha == pytest.approx(LAW["alpha"], abs=0.05)
    assert fit.beta == pytest.approx(LAW["beta"], abs=0.05)
    assert fit.E == pytest.approx(LAW["E"] + 0.02, abs=0.15)  # eval loss = law + 0.02 in the fixture


def test_leverage_recovers_fixture_truth(fitted):
    _, _, a, _ = fitted
    t = a.trials.set_index("trial_id")
    fam = a.size_leverage.set_index("group")  # each family ran at one size and budget: one cell each
    assert len(fam) == 6 and set(fam["seeds"]) == {1, 2}  # one trial of the fixture diverged
    assert a.family_leverage.empty  # a family's own law needs >= 2 sizes and budgets; said, not faked
    assert any("its own law needs >= 2" in why for _, why in a.skipped)
    for group, row in fam.iterrows():
        members = t[(t["group"] == group) & t["usable"]]
        first = members.iloc[0]
        truth = _true_leverage(int(first["model.moe.n_experts"]), int(first["model.moe.top_k"]),
                               float(first["upcycle.noise_std"]), float(first["params_active"]))
        # upcycled trials count their source's tokens: beyond every dense trial's D, so flagged, and the dense
        # law's fitted B/D^beta term is extrapolated there, hence the wider tolerance
        beyond = members["D"].max() > t.loc[t["family"] == "dense", "D"].max()
        assert bool(row["parameter_extrapolated"]) == bool(beyond)
        assert row["parameter_leverage"] == pytest.approx(truth, rel=0.08 if beyond else 0.05), group
        assert row["parameter_leverage_lo"] <= row["parameter_leverage"] <= row["parameter_leverage_hi"]
        assert 0.3 < row["compute_leverage"] < 3.0 and np.isfinite(row["compute_leverage_lo"])
        # an upcycled trial pays for its source's tokens too: where that puts compute leverage below 1 while
        # parameter leverage is above, the trial says why
        split = members[(members["parameter_leverage"] > 1) != (members["compute_leverage"] > 1)]
        assert split["leverage_note"].str.contains("tokens per active parameter").all()
    # more experts -> more leverage, both kinds
    e8, e16 = fam.loc["moe[n_experts=8, noise_std=0]"], fam.loc["moe[n_experts=16, noise_std=0]"]
    assert e16["parameter_leverage"] > e8["parameter_leverage"]
    assert e16["compute_leverage"] > e8["compute_leverage"]


def test_fits_table_written_and_readable(fitted):
    root, info, a, _ = fitted
    fits = read_fits(root)
    assert set(fits["sweep"]) == {"synthetic"}
    assert {"chinchilla", "power_law", "parameter_leverage", "compute_leverage"} <= set(fits["law"])
    skipped = fits[fits["status"] == "skipped"]
    own = skipped[skipped["law"] == "chinchilla"]
    assert len(own) and own["message"].str.contains("its own law").all()
    # the families vary A (8 vs 16 experts) but not G: Eq. 13 is skipped, saying what is missing
    el = skipped[skipped["law"] == "efficiency_leverage"]
    assert set(skipped["law"]) == {"chinchilla", "efficiency_leverage"} and len(el) == 1
    assert el["message"].str.contains("G has 1 distinct value").all()
    dense = fits[(fits["family"] == "dense") & (fits["law"] == "chinchilla")].iloc[0]
    params = json.loads(dense["parameters"])
    assert params["alpha"] == pytest.approx(a.dense_fit.alpha)
    intervals = json.loads(dense["intervals"])
    assert intervals["alpha"][0] <= params["alpha"] <= intervals["alpha"][1]
    # the dense compute law comes first (the dashboard reads the first dense row with A and alpha)
    assert fits.iloc[0]["law"] == "power_law" and fits.iloc[0]["family"] == "dense"
    assert "c_range" in json.loads(fits.iloc[0]["parameters"])
    # one per-trial row of each leverage per usable MoE trial; the diverged trial has none
    per_trial = fits[fits["law"] == "parameter_leverage"].dropna(subset=["trial_id"])
    usable_moe = set(info.moe) - set(info.diverged)
    assert set(per_trial["trial_id"]) == usable_moe
    assert not set(info.diverged) & set(fits["trial_id"].dropna())
    # every fixture MoE trial is upcycled: its D includes its source's tokens, beyond every dense trial's D
    assert per_trial["leverage"].notna().all() and (per_trial["extrapolated"] == True).all()  # noqa: E712
    # plain SQL over the Parquet files (what results.open(root).sql sees once it registers the view)
    con = duckdb.connect()
    try:
        n, laws = con.execute(
            f"SELECT count(*), count(DISTINCT law) FROM read_parquet('{root}/fits/*/*.parquet', "
            f"hive_partitioning = true) WHERE sweep = 'synthetic'").fetchone()
        alpha = con.execute(
            f"SELECT CAST(parameters ->> 'alpha' AS DOUBLE) FROM read_parquet('{root}/fits/*/*.parquet') "
            f"WHERE law = 'chinchilla'").fetchone()[0]
    finally:
        con.close()
    assert n == len(fits) and laws == 5  # chinchilla, power_law, two leverages, the skipped efficiency_leverage
    assert alpha == pytest.approx(a.dense_fit.alpha)


def test_fits_rewritten_not_appended(fitted):
    root, _, a, _ = fitted
    before = len(read_fits(root))
    write_fits(root, a)
    assert len(read_fits(root)) == before
    assert not list((root / "fits" / "sweep=synthetic").glob(".tmp-*"))


def test_report_is_self_contained_with_figures(fitted):
    pytest.importorskip("plotly")
    _, _, a, report = fitted
    text = _text(report)
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", text, flags=re.I)
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']?(https?:)?//", text, flags=re.I)
    assert len(text) > 1_000_000  # plotly.js is inlined
    for name in ("Loss vs compute", "Dense scaling law", "Leverage per MoE family", "Per-axis effects"):
        assert f'data-figure="{name}"' in text
    assert text.count("Plotly.newPlot") == 4
    assert "moe[n_experts=16, noise_std=0]" in text


def test_effects_and_summary(fitted):
    _, info, a, _ = fitted
    assert set(a.effects) == {"model.moe.n_experts", "upcycle.noise_std"}
    eff = a.effects["model.moe.n_experts"]["final eval_loss"]
    assert list(eff.index) == [8, 16]
    assert eff.loc[16, "diff"] < 0 and eff.loc[16, "diff_hi"] < 0  # 16 experts: clearly lower loss
    noise = a.effects["upcycle.noise_std"]["final eval_loss"]
    assert noise.loc[0.01, "diff"] > 0  # the fixture's +0.02 penalty
    text = summary_text(a)
    assert info.diverged[0] in text and "status diverged" in text
    assert "points='curve'" in text
    assert "all MoE trials have G = d_ff / d_expert = 2" in text
    assert "parameter 1.5" in text  # moe[n_experts=8, noise_std=0]: 4^0.3 = 1.516
    assert "paired by seed" in text and "2 seeds: no p-value" in text


def test_final_points_on_single_budget_skip_with_reasons(fitted):
    root, _, _, _ = fitted
    a = analyse(root, points="final", n_boot=0)  # default N: active non-embedding parameters
    t = a.trials
    dense = t[t["family"] == "dense"]
    assert (dense["N"] == dense["params_non_embedding"]).all()
    moe = t[t["family"] == "moe"]
    emb = moe["params_total"] - moe["params_non_embedding"]
    assert (moe["N"] == moe["params_active"] - emb).all()
    assert a.dense_fit is None
    reasons = dict(a.skipped)
    assert "D (tokens) has 1 distinct value" in reasons["dense Chinchilla L(N, D)"]
    # no dense law, no leverage: the lower envelope of runs at one budget is not a compute-optimal frontier
    assert "no dense Chinchilla fit" in reasons["leverage"]
    assert a.size_leverage is None and a.family_leverage is None
    fits = a.fits
    skipped = fits[fits["status"] == "skipped"]
    assert {"chinchilla", "parameter_leverage"} <= set(skipped["law"])
    assert skipped["message"].str.len().gt(0).all()


# ----------------------------------------------------------------------------------------------------------
# Hand-made stores


def _write(root, rows, sweep="toy"):
    with Store(root) as store:
        for i, row in enumerate(rows):
            full = {"sweep": sweep, "trial_id": f"t{i:02d}", "status": "finished", "seed": 0, **row}
            if isinstance(full.get("axis_values"), dict):
                full["axis_values"] = json.dumps(full["axis_values"])
            store.write_trial(full)


def _dense(N, D, L, seed=0, status="finished", eval_loss=None):
    return {"family": "dense", "params_total": int(N), "params_active": int(N), "params_non_embedding": int(N),
            "final_tokens": int(D), "final_flops": 6.0 * N * D, "final_loss": L, "status": status,
            "final_eval_loss": L if eval_loss is None else eval_loss, "seed": seed}


def _moe(N_active, N_total, D, L, axes=None, seed=0):
    row = {"family": "moe", "params_total": int(N_total), "params_active": int(N_active),
           "params_non_embedding": int(N_total), "final_tokens": int(D), "final_flops": 6.0 * N_active * D,
           "final_loss": L, "final_eval_loss": L, "seed": seed, "axis_values": axes or {}}
    for k, v in (axes or {}).items():
        row[k] = v
    return row


def _chin(N, D):
    return 1.7 + 60.0 / N**0.35 + 30.0 / D**0.3


def test_missing_root_and_unknown_sweep(tmp_path):
    with pytest.raises(FileNotFoundError):
        analyse(tmp_path / "nothing-here")
    _write(tmp_path, [_dense(1e5, 1e6, 3.0)])
    with pytest.raises(ValueError, match="toy"):
        analyse(tmp_path, sweep="other")


def test_empty_store(tmp_path):
    a, report = run_fit(tmp_path, report_path=tmp_path / "r.html", n_boot=0)
    assert "no trials" in summary_text(a)
    assert write_fits(tmp_path, a) is None
    assert "no trials" in _text(report)
    assert read_fits(tmp_path).empty


def test_no_dense_trials(tmp_path):
    rows = [_moe(1e5 * m, 4e5 * m, 1e6 * k, _chin(1.5e5 * m, 1e6 * k), {"model.moe.n_experts": 8}, seed=s)
            for m in (1, 2, 4) for k in (1, 3) for s in (0, 1)]
    _write(tmp_path, rows)
    a, report = run_fit(tmp_path, report_path=tmp_path / "r.html", n_boot=0)
    text = summary_text(a)
    assert "no usable dense trials" in text
    assert "skipped: dense Chinchilla L(N, D): no usable dense points" in text
    assert "skipped: leverage: no dense Chinchilla fit" in text
    assert "moe[n_experts=8]" in a.family_fits  # the MoE family's own law still gets fitted
    fits = read_fits(tmp_path)
    assert set(fits.loc[fits["status"] == "skipped", "law"]) >= {"chinchilla", "parameter_leverage"}
    html_text = _text(report)
    assert "no usable dense points" in html_text
    assert ("Plotly.newPlot" in html_text) == HAS_PLOTLY


def test_single_model_size(tmp_path):
    rows = [_dense(2e5, D, _chin(2e5, D), seed=s) for D in (1e6, 2e6, 4e6, 8e6) for s in (0, 1)]
    _write(tmp_path, rows)
    a = analyse(tmp_path, n_boot=0)
    assert a.points == "curve"  # final points have one N: auto falls back, and there are no metrics
    a = analyse(tmp_path, points="final", n_boot=0)
    why = dict(a.skipped)["dense Chinchilla L(N, D)"]
    assert "N (model size) has 1 distinct value" in why and "single model size" in why
    assert "single model size" in summary_text(a)


def test_fewer_points_than_parameters(tmp_path):
    rows = [_dense(N, D, _chin(N, D)) for N, D in ((1e5, 1e6), (3e5, 3e6), (9e5, 9e6))]
    _write(tmp_path, rows)
    a, report = run_fit(tmp_path, report_path=tmp_path / "r.html", points="final", n_boot=0)
    why = dict(a.skipped)["dense Chinchilla L(N, D)"]
    assert "needs at least 6 points, got 3" in why
    assert "needs at least 6 points, got 3" in _text(report)
    assert a.dense_fit is None and "dense" not in a.family_fits


def test_nan_losses_and_diverged(tmp_path):
    rows = [_dense(N, D, float("nan")) for N in (1e5, 3e5) for D in (1e6, 3e6)]
    rows.append(_dense(1e6, 1e6, 3.0, status="diverged"))
    rows.append(_moe(1e5, 4e5, 1e6, float("nan"), {"model.moe.n_experts": 8}))
    _write(tmp_path, rows)
    a, report = run_fit(tmp_path, report_path=tmp_path / "r.html", n_boot=0)
    text = summary_text(a)
    assert "no trial has a final eval loss" not in text  # the NaN values are there, just not usable
    assert "5 trial(s) left out (final eval_loss is NaN or missing)" in text
    assert "1 trial(s) left out (status diverged)" in text
    assert "skipped: leverage: no usable MoE trials" in text
    assert a.dense_fit is None and not a.family_fits and not a.effects
    assert _text(report).count("Plotly.newPlot") == 0


def test_granularity_law_fitted_when_the_sweep_varies_it(tmp_path):
    k = dict(c=0.47, g=2.1, gamma=0.58, a=18.1, alpha=0.115, b=30.8, beta=0.147)  # Krajewski et al. MoE fit
    rows = []
    for G in (1, 2, 4, 8):
        for N in (1e6, 4e6, 1.6e7):
            for D in (1e8, 4e8, 1.6e9):
                L = k["c"] + (k["g"] / G ** k["gamma"] + k["a"]) / N ** k["alpha"] + k["b"] / D ** k["beta"]
                rows.append(_moe(N / 8, N, D, L, {"model.moe.granularity": G, "model.d_model": int(N)}))
    _write(tmp_path, rows)
    a = analyse(tmp_path, points="final", n_boot=0)
    g = a.granularity
    assert g is not None
    assert g.gamma == pytest.approx(k["gamma"], rel=0.05) and g.alpha == pytest.approx(k["alpha"], rel=0.05)
    # model.d_model is a scale axis: families are split by granularity only
    assert sorted(a.family_fits) == [f"moe[granularity={G}]" for G in (1, 2, 4, 8)]
    row = a.fits[a.fits["law"] == "granularity"].iloc[0]
    assert row["status"] == "ok" and row["parameters"]["gamma"] == pytest.approx(g.gamma)
    assert "granularity law: c=" in summary_text(a)
    assert set(a.effects) == {"model.d_model", "model.moe.granularity"}


def test_granularity_too_few_values(tmp_path):
    rows = [_moe(N / 8, N, D, _chin(N / 4, D) + 0.1 / G, {"model.moe.granularity": G})
            for G in (1, 2) for N in (1e6, 4e6) for D in (1e8, 4e8)]
    _write(tmp_path, rows)
    a = analyse(tmp_path, points="final", n_boot=0)
    why = dict(a.skipped)["granularity law (Krajewski et al. eq. 9)"]
    assert "G (granularity) has 2 distinct value(s); at least 3 are needed" in why


def test_pooled_sweeps_and_leverage_three(tmp_path):
    """Dense ladder in one sweep, MoE in another: pooled by default. The MoE at N_active reaches the dense
    loss of 3 x N_active at its tokens, so its parameter leverage is 3 (the design's headline)."""
    from moelab.ablations.fits import chinchilla_grid

    _write(tmp_path, [_dense(N, D, _chin(N, D), seed=s) for N in (1e5, 3e5, 9e5) for D in (1e6, 3e6, 9e6)
                      for s in (0, 1)], sweep="ladder")
    _write(tmp_path, [_moe(2e5, 1.6e6, 3e6, _chin(6e5, 3e6), {"model.moe.n_experts": 8}, seed=s) for s in (0, 1)],
           sweep="moe8")
    small_grid = chinchilla_grid(alphas=(0.5,), betas=(0.5,), es=(0.0, 0.5), as_=(5.0, 10.0), bs=(5.0, 10.0))
    a, _ = run_fit(tmp_path, report_path=tmp_path / "r.html", n_boot=10, grid=small_grid)
    assert a.points == "final" and a.sweep == "ladder__moe8"
    assert "2 sweeps pooled" in summary_text(a)
    fam = a.size_leverage.set_index("group").loc["moe[n_experts=8]"]
    assert fam["parameter_leverage"] == pytest.approx(3.0, rel=0.05)
    assert not fam["parameter_extrapolated"]
    fits = read_fits(tmp_path)
    assert set(fits["sweep"]) == {"ladder__moe8"}
    assert read_fits(tmp_path, sweep="ladder").empty
