"""Tests for moelab.ablations.effects: paired-by-seed contrasts, Welch fallback, Holm, infinities, few seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moelab.ablations.effects import effects, holm


def _paired_frame(rng: np.random.Generator, n_seeds: int, effect: float, shared_sd: float = 0.05,
                  own_sd: float = 0.005, values=(0.0, 1e-2)) -> pd.DataFrame:
    shared = rng.normal(0, shared_sd, n_seeds)
    rows = []
    for v, eff in zip(values, (0.0, effect)):
        for s in range(n_seeds):
            rows.append({"noise": v, "seed": s, "loss": 2.0 + eff + shared[s] + rng.normal(0, own_sd)})
    return pd.DataFrame(rows)


def test_paired_difference_matches_a_paired_t_test():
    rng = np.random.default_rng(0)
    df = _paired_frame(rng, 5, 0.02)
    out = effects(df, "noise", "loss")
    a = df[df["noise"] == 1e-2].sort_values("seed")["loss"].to_numpy()
    b = df[df["noise"] == 0.0].sort_values("seed")["loss"].to_numpy()
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    row = out.loc[1e-2]
    assert row["method"] == "paired t" and row["n"] == 5 and row["dof"] == 4
    assert row["diff"] == pytest.approx(float(np.mean(a - b)))
    assert row["p_value"] == pytest.approx(ref.pvalue)
    assert (row["diff_lo"], row["diff_hi"]) == pytest.approx((ci.low, ci.high))
    assert out.loc[0.0, "is_baseline"] and out.loc[0.0, "diff"] == 0.0


def test_pairing_removes_shared_seed_noise():
    """Seed noise shared by both arms (same data order) cancels within a seed: the paired interval is much
    narrower than a Welch interval on the same numbers, and still covers the truth."""
    rng = np.random.default_rng(1)
    df = _paired_frame(rng, 4, 0.01, shared_sd=0.05, own_sd=0.002)
    paired = effects(df, "noise", "loss").loc[1e-2]
    unpaired = effects(df.drop(columns="seed"), "noise", "loss").loc[1e-2]
    assert unpaired["method"] == "Welch"
    assert (paired["diff_hi"] - paired["diff_lo"]) < 0.2 * (unpaired["diff_hi"] - unpaired["diff_lo"])
    assert paired["diff_lo"] <= 0.01 <= paired["diff_hi"]


def test_welch_when_the_arms_share_no_seeds():
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"lr": [1e-3] * 4 + [3e-3] * 3, "seed": [0, 1, 2, 3, 10, 11, 12],
                       "loss": rng.normal(1.0, 0.1, 7)})
    row = effects(df, "lr", "loss").loc[3e-3]
    a, b = df.loc[df["lr"] == 3e-3, "loss"], df.loc[df["lr"] == 1e-3, "loss"]
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert row["method"] == "Welch"
    assert row["p_value"] == pytest.approx(ref.pvalue)


def test_blocks_pair_within_matching_other_axes():
    """Two sizes per seed: the size effect (large) cancels inside each block, the axis effect remains."""
    rows = []
    for s in range(3):
        for size, base in ((1, 3.0), (2, 2.0)):
            for v, eff in ((0, 0.0), (1, 0.01 * (s + 1))):
                rows.append({"x": v, "seed": s, "size": size, "loss": base + eff})
    out = effects(pd.DataFrame(rows), "x", "loss", blocks=["size"]).loc[1]
    assert out["diff"] == pytest.approx(0.02)
    assert out["diff_stderr"] == pytest.approx(np.std([0.01, 0.02, 0.03], ddof=1) / math.sqrt(3))


def test_fewer_than_three_seeds_give_no_p_value():
    rng = np.random.default_rng(3)
    out = effects(_paired_frame(rng, 2, 0.05), "noise", "loss").loc[1e-2]
    assert math.isnan(out["p_value"]) and "no p-value" in out["note"]
    assert np.isfinite(out["diff"])


def test_equal_values_give_no_zero_width_interval_and_no_zero_p():
    df = pd.DataFrame({"x": [0, 0, 0, 1, 1, 1], "seed": [0, 1, 2] * 2, "loss": [1.0, 1.0, 1.0, 1.5, 1.5, 1.5]})
    row = effects(df, "x", "loss").loc[1]
    assert row["diff"] == pytest.approx(0.5)
    assert math.isnan(row["p_value"]) and math.isnan(row["diff_lo"]) and "no spread" in row["note"]
    one = effects(df[df["seed"] == 0], "x", "loss").loc[1]
    assert math.isnan(one["p_value"]) and math.isnan(one["diff_lo"])


def test_infinite_values_are_kept_counted_and_ranked():
    """A leverage of +inf (a loss below the dense floor) beats any finite value: a sign test, not a drop."""
    df = pd.DataFrame({"x": [0] * 6 + [1] * 6, "seed": list(range(6)) * 2,
                       "lev": [2.0, 2.1, 1.9, 2.2, 2.0, 2.05, np.inf, np.inf, 3.0, np.inf, 2.9, np.inf]})
    row = effects(df, "x", "lev").loc[1]
    assert row["n"] == 6 and row["n_inf"] == 4
    assert row["method"] == "sign test"
    assert row["p_value"] == pytest.approx(stats.binomtest(6, 6).pvalue)
    assert row["diff"] == np.inf  # median per-seed difference
    unpaired = effects(df.drop(columns="seed"), "x", "lev").loc[1]
    assert unpaired["method"] == "Mann-Whitney" and unpaired["n_inf"] == 4
    assert unpaired["p_value"] == pytest.approx(stats.mannwhitneyu(df["lev"][6:], df["lev"][:6]).pvalue)


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, np.nan, 0.005]
    adj = holm(p)
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 0.02, 0.03, 0.06, max(0.06, 0.04) = 0.06
    assert adj[4] == pytest.approx(0.02) and adj[0] == pytest.approx(0.03)
    assert adj[2] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06) and math.isnan(adj[3])


def test_holm_controls_the_family_wise_error_rate():
    """Five null contrasts at 3 seeds: uncorrected p < 0.05 somewhere in ~20% of reports, Holm in <= 5%."""
    rng = np.random.default_rng(4)
    reps, any_raw, any_holm = 250, 0, 0
    for _ in range(reps):
        rows = [{"x": v, "seed": s, "loss": 2.0 + rng.normal(0, 0.01)} for v in range(6) for s in range(3)]
        out = effects(pd.DataFrame(rows), "x", "loss")
        p = out["p_value"].to_numpy(float)[1:]
        any_raw += bool(np.any(p < 0.05))
        any_holm += bool(np.any(holm(p) < 0.05))
    assert any_raw / reps > 0.12
    assert any_holm / reps <= 0.08


def test_bad_arguments_raise():
    df = pd.DataFrame({"x": [0, 1], "seed": [0, 0], "loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not in trials"):
        effects(df, "y", "loss")
    with pytest.raises(ValueError, match="block column"):
        effects(df, "x", "loss", blocks=["size"])
    with pytest.raises(ValueError, match="baseline"):
        effects(df, "x", "loss", baseline=5)
    with pytest.raises(ValueError, match="confidence"):
        effects(df, "x", "loss", confidence=1.5)
    with pytest.raises(ValueError, match="no trials"):
        effects(df.assign(loss=np.nan), "x", "loss")
