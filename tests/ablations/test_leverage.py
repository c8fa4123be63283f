"""Tests for the leverage machinery: the closed-form frontier, efficiency leverage, whole-trial bootstrap,
seed noise in intervals, +inf kept, and G from the config (moelab.ablations.fits / leverage / analysis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moelab.ablations.analysis import granularity
from moelab.ablations.fits import (FlopsPerToken, efficiency_leverage_at, fit_chinchilla, frontier_compute,
                                   frontier_loss)
from moelab.ablations.leverage import NO_NOISE, SeedNoise, cell_leverage, interval, seed_noise, trial_leverage

LAW = np.array([1.8, 400.0, 2000.0, 0.34, 0.37])


@pytest.mark.parametrize("fpt", [FlopsPerToken(), FlopsPerToken(np.log(9.0), 0.9)])
def test_frontier_matches_a_brute_force_search(fpt):
    rng = np.random.default_rng(0)
    C = 10 ** rng.uniform(14, 20, 6)
    N = np.geomspace(1e2, 1e13, 400_001)
    brute = np.array([np.min(1.8 + 400 / N**0.34 + 2000 / (c / fpt(N)) ** 0.37) for c in C])
    L = frontier_loss(LAW, C, fpt)
    assert L == pytest.approx(brute, rel=1e-9)
    assert frontier_compute(LAW, L, fpt) == pytest.approx(C, rel=1e-9)
    assert frontier_compute(LAW, [1.8, 1.7], fpt).tolist() == [np.inf, np.inf]  # at or below E: never reached


def test_efficiency_leverage_of_a_k_times_larger_dense_model_is_k():
    """An MoE whose active N behaves as a dense k N has EL = k at every compute (and in a batch of laws)."""
    moe = LAW.copy()
    moe[1] = LAW[1] * 3.0 ** -LAW[3]
    C = np.geomspace(1e15, 1e21, 7)
    assert efficiency_leverage_at(LAW, FlopsPerToken(), moe, FlopsPerToken(), C) == pytest.approx(np.full(7, 3.0))
    batch = efficiency_leverage_at(np.stack([LAW, LAW]), FlopsPerToken(), np.stack([moe, moe]), FlopsPerToken(), C)
    assert batch.shape == (2, 7) and batch == pytest.approx(np.full((2, 7), 3.0))
    below = LAW.copy()
    below[0] = 1.5  # a family whose floor lies below the dense one: at large C the dense law never gets there
    assert np.isinf(efficiency_leverage_at(LAW, FlopsPerToken(), below, FlopsPerToken(), [1e30])[0])


def test_flops_per_token_fit():
    N = np.array([1e6, 4e6, 1.6e7])
    fpt = FlopsPerToken.fit(N, [1e8] * 3, 7.0 * N**0.95 * 1e8)
    assert fpt.slope == pytest.approx(0.95) and np.exp(fpt.log_coef) == pytest.approx(7.0)
    one = FlopsPerToken.fit([1e6], [1e8], [6.6e14])
    assert one.slope == 1.0 and one(1e6) == pytest.approx(6.6e6)


def test_bootstrap_resamples_whole_trials():
    """Curve points of one trial share its seed offset: resampling them as independent points understates the
    error. Resampling trials (groups) gives intervals several times wider on the same data."""
    rng = np.random.default_rng(1)
    N, D, L, trial = [], [], [], []
    for i, n in enumerate(np.repeat(np.geomspace(1e6, 3e7, 4), 3)):
        offset = rng.normal(0, 0.01)
        for d in n * np.geomspace(2, 60, 12):
            N.append(n), D.append(d), trial.append(i)
            L.append((1.8 + 400 / n**0.34 + 2000 / d**0.37) * np.exp(offset + rng.normal(0, 0.001)))
    kw = dict(n_boot=60, refine_top=64, boot_starts=2)
    points = fit_chinchilla(N, D, L, **kw)
    trials = fit_chinchilla(N, D, L, groups=trial, **kw)
    width = {k: (lambda f: f.intervals["alpha"][1] - f.intervals["alpha"][0])(f) for k, f in
             (("points", points), ("trials", trials))}
    assert width["trials"] > 2.0 * width["points"]
    with pytest.raises(ValueError, match="one label per point"):
        fit_chinchilla(N, D, L, groups=trial[:-1], n_boot=2, refine_top=8)


def _dense_fit(n_boot=80):
    rng = np.random.default_rng(2)
    N = np.repeat(np.geomspace(1e6, 3e7, 4), 6)
    D = N * np.tile(np.repeat([8.0, 40.0], 3), 4)
    L = (LAW[0] + LAW[1] / N ** LAW[3] + LAW[2] / D ** LAW[4]) * np.exp(rng.normal(0, 0.004, len(N)))
    return fit_chinchilla(N, D, L, n_boot=n_boot, refine_top=64, boot_starts=2, groups=np.arange(len(N)))


def test_seed_noise_widens_trial_intervals_and_inf_is_kept():
    fit = _dense_fit()
    fpt = FlopsPerToken()
    L = np.array([6.0, 6.0, 1.0])  # dense at this N, D: 6.5; the last is below the dense floor: +inf, kept
    D, N, C = np.array([1e8] * 3), np.array([3e6] * 3), 6.0 * 3e6 * 1e8 * np.ones(3)
    quiet = trial_leverage(fit, fpt, L, D, N, C, NO_NOISE)
    noisy = trial_leverage(fit, fpt, L, D, N, C, SeedNoise(0.01, 20, "test"))
    lo_q, hi_q = interval(quiet["parameter_draws"], 0.95)
    lo_n, hi_n = interval(noisy["parameter_draws"], 0.95)
    assert (hi_n[0] - lo_n[0]) > 1.5 * (hi_q[0] - lo_q[0])
    assert np.isinf(noisy["parameter"][2]) and np.isinf(noisy["compute"][2]) and np.isinf(hi_n[2])
    cell = cell_leverage(noisy["parameter"], noisy["parameter_draws"], 0.95)
    assert cell["n_inf"] == 1 and np.isinf(cell["leverage"])


def test_seed_noise_pools_within_cells():
    df = pd.DataFrame({"N": [1, 1, 1, 2, 2], "L": np.exp([0.0, 0.02, -0.02, 0.5, 0.52])})
    noise = seed_noise(df, ["N"])
    ss = 0.02**2 * 2 + 2 * 0.01**2
    assert noise.dof == 3 and noise.sd == pytest.approx(np.sqrt(ss / 3))
    assert seed_noise(df.iloc[[0, 3]], ["N"]) is NO_NOISE


def test_granularity_from_the_config_not_the_knob():
    t = pd.DataFrame({"family": ["moe", "moe", "dense"], "model.d_ff": [5504, 1024, 1024],
                      "model.moe.d_expert": [1024, 0, 0], "model.moe.granularity": [1, 4, 1]})
    G = granularity(t)
    assert G.iloc[0] == pytest.approx(5504 / 1024) and G.iloc[1] == 4.0 and np.isnan(G.iloc[2])
