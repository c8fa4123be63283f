"""Tests for moelab.ablations.fits: recovery of known laws, the Epoch replication, leverage, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moelab.ablations import fits

DATA = Path(__file__).resolve().parents[1] / "data" / "chinchilla_epoch.csv"

# Small grid for synthetic tests (the real-data test uses the full 4,500-start grid).
SMALL_GRID = fits.chinchilla_grid(alphas=(0.0, 1.0), betas=(0.0, 1.0), es=(-1.0, 1.0),
                                  as_=(0.0, 10.0, 20.0), bs=(0.0, 10.0, 20.0))

TRUE = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def synthetic_dense(noise=0.002, seed=1):
    """8 x 8 grid of (N, D) with multiplicative noise; arrays of shape (64,)."""
    rng = np.random.default_rng(seed)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
    L = chinchilla_loss(N, D) * np.exp(rng.normal(0.0, noise, N.shape))
    return N, D, L


@pytest.fixture(scope="module")
def dense_fit():
    N, D, L = synthetic_dense()
    return fits.fit_chinchilla(N, D, L, grid=SMALL_GRID, n_boot=40, seed=3)


# ------------------------------------------------------------------------------------------ Chinchilla


def test_chinchilla_recovers_known_parameters(dense_fit):
    f = dense_fit
    assert f.E == pytest.approx(TRUE["E"], rel=0.02)
    assert f.alpha == pytest.approx(TRUE["alpha"], rel=0.03)
    assert f.beta == pytest.approx(TRUE["beta"], rel=0.03)
    assert f.A == pytest.approx(TRUE["A"], rel=0.15)
    assert f.B == pytest.approx(TRUE["B"], rel=0.15)
    assert f.n_points == 64
    assert f.n_range == (pytest.approx(1e7), pytest.approx(1e10))
    for name in fits.CHINCHILLA_PARAMS:
        lo, hi = f.intervals[name]
        assert lo < getattr(f, name) < hi
    assert f.boot_params.shape == (40, 5)


def test_chinchilla_predict_and_compute_optimal(dense_fit):
    f = dense_fit
    assert f.predict(1e9, 2e10) == pytest.approx(f.E + f.A / 1e9**f.alpha + f.B / 2e10**f.beta)
    C = np.array([1e20, 1e22])
    n_opt, d_opt = f.n_opt(C), f.d_opt(C)
    np.testing.assert_allclose(6 * n_opt * d_opt, C, rtol=1e-12)
    # N_opt minimises the loss along the iso-FLOP curve D = C / (6 N)
    for scale in (0.8, 1.25):
        n = n_opt * scale
        assert np.all(f.predict(n, C / (6 * n)) > f.predict(n_opt, d_opt))
    # refs.md closed form
    G = (f.alpha * f.A / (f.beta * f.B)) ** (1 / (f.alpha + f.beta))
    assert f.n_opt(6e21) == pytest.approx(G * 1e21 ** (f.beta / (f.alpha + f.beta)))


def test_chinchilla_to_dict_is_json(dense_fit):
    d = json.loads(json.dumps(dense_fit.to_dict()))
    assert d["law"] == "chinchilla" and d["n_boot"] == 40
    assert d["E"] == pytest.approx(dense_fit.E)
    assert d["intervals"]["alpha"][0] < d["alpha"] < d["intervals"]["alpha"][1]


def test_bootstrap_shortcut_matches_full_grid_bootstrap():
    """Starting resamples from the best distinct full-data minima gives the same refits as the whole grid."""
    N, D, L = synthetic_dense(noise=0.01, seed=5)
    grid = SMALL_GRID[::2]
    quick = fits.fit_chinchilla(N, D, L, grid=grid, n_boot=15, seed=7)
    brute = fits.fit_chinchilla(N, D, L, grid=grid, n_boot=15, seed=7, boot_starts="grid")
    np.testing.assert_allclose(quick.boot_params, brute.boot_params, rtol=1e-4)


def test_drop_outliers_removes_corrupted_points():
    N, D, L = synthetic_dense()
    bad = np.array([3, 30, 50])
    L = L.copy()
    L[bad] *= 1.3
    f = fits.fit_chinchilla(N, D, L, grid=SMALL_GRID, drop_outliers=True)
    assert np.array_equal(np.flatnonzero(~f.kept), bad)
    assert f.n_points == 61
    assert f.alpha == pytest.approx(TRUE["alpha"], rel=0.03)
    assert f.E == pytest.approx(TRUE["E"], rel=0.02)


def test_real_data_reproduces_epoch_replication():
    """refs.md: drop the 5 highest losses (240 left), D = C / (6N), 4,500-start grid -> Epoch's values."""
    df = pd.read_csv(DATA)
    assert len(df) == 245
    df = df.sort_values("loss").iloc[:-5]
    N = df["Model Size"].to_numpy()
    D = df["Training FLOP"].to_numpy() / (6 * N)
    f = fits.fit_chinchilla(N, D, df["loss"].to_numpy())
    assert f.n_points == 240
    assert f.E == pytest.approx(1.817, rel=0.01)
    assert f.alpha == pytest.approx(0.347, rel=0.01)
    assert f.beta == pytest.approx(0.367, rel=0.01)
    assert f.A == pytest.approx(477.8, rel=0.05)
    assert f.B == pytest.approx(2143, rel=0.05)


# ------------------------------------------------------------------------------------------ power law


def synthetic_power_law(E, A=50.0, alpha=0.09, noise=0.002, seed=2):
    rng = np.random.default_rng(seed)
    C = np.geomspace(1e17, 1e22, 30)
    return C, (E + A * C**-alpha) * np.exp(rng.normal(0.0, noise, C.shape))


def test_power_law_with_offset_recovers_parameters():
    C, L = synthetic_power_law(E=1.7)
    f = fits.fit_power_law(C, L, n_boot=50)
    assert f.with_offset
    assert f.E == pytest.approx(1.7, rel=0.03)
    assert f.alpha == pytest.approx(0.09, rel=0.05)
    assert f.A == pytest.approx(50.0, rel=0.2)
    for name in ("E", "A", "alpha"):
        lo, hi = f.intervals[name]
        assert lo < getattr(f, name) < hi
    assert f.inverse(f.predict(3e19)) == pytest.approx(3e19, rel=1e-9)
    assert np.isnan(f.inverse(f.E)) and np.isnan(f.inverse(f.E * 0.9))


def test_power_law_without_offset_recovers_parameters():
    C, L = synthetic_power_law(E=0.0)
    f = fits.fit_power_law(C, L, with_offset=False, n_boot=50)
    assert f.E == 0.0 and not f.with_offset
    assert f.alpha == pytest.approx(0.09, rel=0.01)
    assert f.A == pytest.approx(50.0, rel=0.05)
    assert set(f.intervals) == {"A", "alpha"}
    np.testing.assert_allclose(f.inverse(f.predict(np.array([1e18, 1e21]))), [1e18, 1e21], rtol=1e-9)


# ------------------------------------------------------------------------------------------ leverage


def test_parameter_leverage_of_three(dense_fit):
    """MoE with N_active params reaches the dense loss of 3 x N_active params -> leverage 3."""
    n_active = np.array([2e7, 1e8, 5e8, 2e9])
    tokens = np.array([5e9, 2e10, 1e11, 5e11])
    moe_loss = chinchilla_loss(3 * n_active, tokens)
    out = fits.parameter_leverage(dense_fit, moe_loss, tokens, n_active)
    np.testing.assert_allclose(out["leverage"], 3.0, rtol=0.05)
    np.testing.assert_array_equal(out["extrapolated"], [False, False, False, False])
    assert np.all(out["reachable"])
    lo, hi = out["leverage_interval"]
    assert np.all(lo < out["leverage"]) and np.all(out["leverage"] < hi)
    assert np.all(lo < 3.0) and np.all(3.0 < hi)


def test_parameter_leverage_flags_extrapolation_and_unreachable(dense_fit):
    # 3 x 5e9 = 1.5e10 dense params: beyond the fitted 1e10
    out = fits.parameter_leverage(dense_fit, chinchilla_loss(1.5e10, 1e11), 1e11, 5e9)
    assert out["extrapolated"] is True
    assert out["leverage"] == pytest.approx(3.0, rel=0.05)
    # a narrower trusted range flags a point inside the data range
    inner = fits.parameter_leverage(dense_fit, chinchilla_loss(3e8, 1e11), 1e11, 1e8, n_range=(1e7, 1e8))
    assert inner["extrapolated"] is True
    # a loss below the dense law's floor at these tokens: no dense model reaches it
    low = fits.parameter_leverage(dense_fit, dense_fit.E * 0.99, 1e11, 1e8)
    assert low["reachable"] is False and low["extrapolated"] is True
    assert np.isinf(low["leverage"])


def two_families(ratio, with_offset, seed=0):
    """Dense L = E + A C^-a and MoE L_moe(C) = L_dense(ratio * C): the MoE needs 1/ratio of the compute."""
    E = 1.6 if with_offset else 0.0
    C = np.geomspace(1e18, 1e22, 20)
    rng = np.random.default_rng(seed)
    noise = lambda: np.exp(rng.normal(0.0, 0.001, C.shape))  # noqa: E731
    dense = (E + 40.0 * C**-0.08) * noise()
    moe = (E + 40.0 * (ratio * C) ** -0.08) * noise()
    return C, dense, moe


@pytest.mark.parametrize("with_offset", [False, True])
def test_compute_leverage_recovers_known_ratio(with_offset):
    C, dense_L, moe_L = two_families(4.0, with_offset)
    dense = fits.fit_power_law(C, dense_L, with_offset=with_offset, n_boot=30, seed=1)
    moe = fits.fit_power_law(C, moe_L, with_offset=with_offset, n_boot=30, seed=2)
    out = fits.compute_leverage(dense, moe, compute=np.array([1e19, 1e20]))
    np.testing.assert_allclose(out["leverage"], 4.0, rtol=0.05)
    np.testing.assert_array_equal(out["extrapolated"], [False, False])
    at_loss = fits.compute_leverage(dense, moe, loss=dense.predict(1e21))
    assert at_loss["leverage"] == pytest.approx(4.0, rel=0.05)
    assert at_loss["extrapolated"] is False
    lo, hi = at_loss["leverage_interval"]
    assert lo < at_loss["leverage"] < hi


def test_compute_leverage_flags_extrapolation():
    C, dense_L, moe_L = two_families(4.0, with_offset=False)
    dense = fits.fit_power_law(C, dense_L, with_offset=False)
    moe = fits.fit_power_law(C, moe_L, with_offset=False)
    # MoE at the top of its range: the dense model would need 4x more compute than it was fitted on
    out = fits.compute_leverage(dense, moe, compute=1e22)
    assert out["extrapolated"] is True
    assert out["leverage"] == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="exactly one"):
        fits.compute_leverage(dense, moe)
    with pytest.raises(ValueError, match="exactly one"):
        fits.compute_leverage(dense, moe, loss=2.0, compute=1e20)


def test_compute_leverage_unreachable_loss_is_nan_and_flagged():
    C, dense_L, moe_L = two_families(4.0, with_offset=True)
    dense = fits.fit_power_law(C, dense_L)
    moe = fits.fit_power_law(C, moe_L)
    out = fits.compute_leverage(dense, moe, loss=min(dense.E, moe.E) * 0.99)
    assert np.isnan(out["leverage"]) and out["extrapolated"] is True


# ------------------------------------------------------------------------------------------ granularity


def test_granularity_law_recovers_krajewski_parameters():
    """Data from Krajewski et al.'s fitted MoE law (refs.md) is fitted back."""
    rng = np.random.default_rng(4)
    N, D, G = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 4), np.geomspace(1e9, 1e11, 3),
                                              [1.0, 2.0, 4.0, 8.0, 16.0]))
    L = 0.47 + (2.1 / G**0.58 + 18.1) / N**0.115 + 30.8 / D**0.147
    f = fits.fit_granularity(N, D, G, L * np.exp(rng.normal(0.0, 1e-4, L.shape)), refine_top=64)
    assert f.gamma == pytest.approx(0.58, rel=0.05)
    assert f.alpha == pytest.approx(0.115, rel=0.05)
    assert f.beta == pytest.approx(0.147, rel=0.05)
    np.testing.assert_allclose(f.predict(N, D, G), L, rtol=1e-3)


def test_granularity_needs_three_granularities():
    N, D, G = (a.ravel() for a in np.meshgrid([1e7, 1e8, 1e9], [1e9, 1e10], [1.0, 4.0]))
    L = 0.47 + (2.1 / G**0.58 + 18.1) / N**0.115 + 30.8 / D**0.147
    with pytest.raises(ValueError, match=r"G \(granularity\) has 2 distinct value\(s\); at least 3"):
        fits.fit_granularity(N, D, G, L)
    with pytest.raises(ValueError, match="needs at least 8 points"):
        fits.fit_granularity(N[:7], D[:7], np.array([1.0, 2, 4, 8, 1, 2, 4]), L[:7])


# ------------------------------------------------------------------------------------------ bad inputs


def test_chinchilla_rejects_degenerate_inputs():
    N, D, L = synthetic_dense()
    with pytest.raises(ValueError, match="needs at least 6 points, got 5"):
        fits.fit_chinchilla(N[:5], D[:5], L[:5], grid=SMALL_GRID)
    L_nan = L.copy()
    L_nan[4] = np.nan
    with pytest.raises(ValueError, match="L contains 1 NaN or infinite"):
        fits.fit_chinchilla(N, D, L_nan, grid=SMALL_GRID)
    with pytest.raises(ValueError, match="D contains 1 NaN or infinite"):
        fits.fit_chinchilla(N, np.where(np.arange(64) == 0, np.inf, D), L, grid=SMALL_GRID)
    with pytest.raises(ValueError, match="N contains 1 non-positive"):
        fits.fit_chinchilla(np.where(np.arange(64) == 0, -1.0, N), D, L, grid=SMALL_GRID)
    with pytest.raises(ValueError, match="single model size"):
        fits.fit_chinchilla(np.full(64, 1e8), D, L, grid=SMALL_GRID)
    with pytest.raises(ValueError, match="same length"):
        fits.fit_chinchilla(N, D[:-1], L, grid=SMALL_GRID)
    with pytest.raises(ValueError, match="5 columns"):
        fits.fit_chinchilla(N, D, L, grid=np.zeros((3, 4)))


def test_power_law_and_leverage_reject_bad_inputs(dense_fit):
    C = np.geomspace(1e18, 1e21, 5)
    with pytest.raises(ValueError, match="needs at least 4 points, got 3"):
        fits.fit_power_law(C[:3], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="L contains 1 non-positive"):
        fits.fit_power_law(C, [3.0, 2.9, 0.0, 2.7, 2.6])
    with pytest.raises(ValueError, match="L contains 1 NaN"):
        fits.fit_power_law(C, [3.0, 2.9, np.nan, 2.7, 2.6], with_offset=False)
    with pytest.raises(ValueError, match="moe_loss must be finite and positive"):
        fits.parameter_leverage(dense_fit, np.nan, 1e10, 1e8)


def test_analytic_gradient_matches_finite_differences():
    """The engine's gradient (centred coordinates, weighted) against central differences."""
    N, D, L = synthetic_dense(noise=0.02)
    model = fits._LSEModel(fits._chinchilla_design(N, D), np.log(L), 1e-3)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 3, (2, 64)).astype(float)
    thetas = model.to_opt(np.array([[6.0, 7.5, 0.6, 0.34, 0.28], [3.0, 9.0, 0.2, 0.2, 0.4]]))
    _, grads = model.value_and_grad(thetas, weights)
    eps = 1e-6
    for j in range(5):
        step = np.zeros(5)
        step[j] = eps
        up, _ = model.value_and_grad(thetas + step, weights)
        down, _ = model.value_and_grad(thetas - step, weights)
        np.testing.assert_allclose(grads[:, j], (up - down) / (2 * eps), rtol=1e-4, atol=1e-6)
