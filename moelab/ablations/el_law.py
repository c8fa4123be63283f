"""The joint efficiency-leverage law of Tian et al. 2025 ("Towards Greater Leverage", arXiv 2507.17702, Eq. 13):
evaluate it, fit it to measured leverages with bootstrap intervals, and turn a fit into `fits` table rows.

    EL(A, G, C) = A_hat ^ (alpha + gamma (log2 G)^2 + beta log2 G),      alpha = a + d log10 C
    1 / A_hat   = 1 / (A + (1/A_start - 1/A_max)^-1) + 1 / A_max

Conventions (the paper's; refs.md "Efficiency leverage"):
- EL = C_dense / C_moe at equal loss, C = non-embedding training FLOPs (6 N D style), the budget.
- A = activation ratio: activated (top-k routed + shared) experts over all (routed + shared) experts.
  `activation_ratio` counts them in expert-width units, which is the paper's count when every expert has
  the same width.
- G = 2 d_model / d_expert (the paper's granularity). moelab's own granularity elsewhere (model.moe.granularity,
  the catalogue's axes) is d_ff / d_expert; `granularity_moelab` gives it and fits record both.
- log10 for C and log2 for G: with Table 2's constants these bases give the paper's EL of 7.24 at A = 3.1%,
  G = 12, C = 1e22, and its optimal G of about 2^3.5.

Shape of the law: with A_hat < 1 and a negative exponent EL > 1. As A falls to 0, A_hat falls to A_start and EL
saturates; A_max caps A_hat from above (Table 2's 5.28e16 means: no upper saturation seen). In log2 G the
exponent is a parabola, so the G maximising EL is 2^(-beta / (2 gamma)) at every A and C when gamma > 0.

The fit (`fit_efficiency_leverage`) follows the paper's objective: Huber loss on EL residuals, a BFGS-type
optimiser (scipy L-BFGS-B), many starts; intervals come from a bootstrap that resamples whole groups
(families or trials: points that share a design and its noise), never single points of a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "EL_PARAMS", "PAPER_EL_PARAMS", "PAPER_EL_FIT_RANGE", "ELFit", "efficiency_leverage", "optimal_granularity",
    "saturated_leverage", "activation_ratio", "granularity_paper", "granularity_moelab",
    "fit_efficiency_leverage", "el_law_rows", "law_from_row", "advise", "default_active_params", "allowed_gpus",
]

EL_PARAMS = ("a", "d", "gamma", "beta", "A_start", "A_max")

# Tian et al. 2025, Table 2 (refs.md), with log10 C and log2 G.
PAPER_EL_PARAMS: dict[str, float] = {
    "a": 1.23, "d": -7.61e-2, "gamma": 1.67e-2, "beta": -1.17e-1, "A_start": 1.63e-2, "A_max": 5.28e16,
}

# What refs.md says about the range behind Table 2. It gives the points' EL range (fitted on EL < 6) but not
# their compute range, so no budget can be called inside it: "C": None means "not given", not "unbounded".
PAPER_EL_FIT_RANGE: dict[str, Any] = {
    "C": None,
    "EL": [None, 6.0],
    "note": "Tian et al. 2025 fitted Eq. 13 with Huber + BFGS on points with EL < 6, over 300+ models up to "
            "28B parameters; the compute range of that fit is not given in refs.md.",
}


# ----------------------------------------------------------------------------------------------------------
# The law
# ----------------------------------------------------------------------------------------------------------


def _params(params: Mapping[str, Any]) -> tuple:
    """The six constants of ``params`` in EL_PARAMS order, as floats or arrays; ValueError naming missing keys."""
    missing = [k for k in EL_PARAMS if k not in params]
    if missing:
        raise ValueError(f"efficiency_leverage params: missing {missing}; needed: {list(EL_PARAMS)}")
    return tuple(np.asarray(params[k], dtype=float) for k in EL_PARAMS)


def _positive(name: str, x: Any) -> np.ndarray:
    """x as a float array; ValueError naming `name` and its first bad value unless all are finite and > 0."""
    arr = np.asarray(x, dtype=float)
    bad = ~np.isfinite(arr) | ~(arr > 0)
    if np.any(bad):
        raise ValueError(f"{name}: got {float(arr[bad].ravel()[0])}; allowed: finite positive numbers")
    return arr


def _a_hat(A: np.ndarray, A_start: Any, A_max: Any) -> np.ndarray:
    """Eq. 13's saturating activation ratio: A_hat -> A_start as A -> 0 and A_hat -> A_max as A -> inf."""
    return 1.0 / (1.0 / (A + 1.0 / (1.0 / A_start - 1.0 / A_max)) + 1.0 / A_max)


def efficiency_leverage(A: Any, G: Any, C: Any, params: Mapping[str, Any]) -> np.ndarray:
    """EL(A, G, C) of Tian et al. 2025 Eq. 13.

    A: activation ratio in (0, 1]; G: the paper's granularity 2 d_model / d_expert; C: compute in FLOPs.
    A, G, C broadcast against each other (e.g. (m,), scalars, or a (k, 1) x (1, m) grid).
    params: dict with keys a, d, gamma, beta, A_start, A_max (PAPER_EL_PARAMS for Table 2); values are floats
    or arrays that broadcast with A, G, C (bootstrap draws of shape (S, 1) against (m,) points give (S, m)).
    Returns the broadcast shape (a 0-d array for scalar inputs).
    """
    a, d, gamma, beta, A_start, A_max = _params(params)
    A = _positive("A", A)
    if np.any(A > 1):
        raise ValueError(f"A: got {float(A.max())}; allowed: an activation ratio in (0, 1]")
    x = np.log2(_positive("G", G))
    c = np.log10(_positive("C", C))
    exponent = a + d * c + gamma * x * x + beta * x
    return np.power(_a_hat(A, A_start, A_max), exponent)


def optimal_granularity(params: Mapping[str, Any]) -> np.ndarray:
    """The G maximising EL: 2^(-beta / (2 gamma)) (the vertex of Eq. 13's parabola in log2 G), the same at
    every A and C. Needs gamma > 0 (else EL has no interior maximum in G: ValueError). Shape of gamma/beta."""
    _, _, gamma, beta, _, _ = _params(params)
    if np.any(gamma <= 0):
        raise ValueError(f"gamma: got {float(np.min(gamma))}; the law has an optimal granularity only for gamma > 0")
    return np.power(2.0, -beta / (2.0 * gamma))


def saturated_leverage(G: Any, C: Any, params: Mapping[str, Any]) -> np.ndarray:
    """The limit of EL as A -> 0 (A_hat -> A_start): the most any activation ratio can give at (G, C)."""
    a, d, gamma, beta, A_start, _ = _params(params)
    x = np.log2(_positive("G", G))
    exponent = a + d * np.log10(_positive("C", C)) + gamma * x * x + beta * x
    return np.power(A_start, exponent)


def activation_ratio(model: Any) -> float:
    """A of a moelab ModelConfig as the paper defines it: (top_k routed + shared) over (routed + shared) experts,
    counted in expert widths (so a shared expert twice as wide counts twice)."""
    m = model.moe
    if not m.enabled:
        return 1.0
    shared = model.d_shared_total / model.d_expert
    return (m.top_k + shared) / (m.n_experts + shared)


def granularity_paper(model: Any) -> float:
    """The paper's G = 2 d_model / d_expert."""
    return 2.0 * model.d_model / model.d_expert


def granularity_moelab(model: Any) -> float:
    """moelab's G = d_ff / d_expert (the dense FFN split into G experts)."""
    return model.d_ff / model.d_expert


# ----------------------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------------------
# Internal parameters theta (6,) = (a', d, gamma, beta', w, z) with centred inputs c' = log10 C - c0 and
# x' = log2 G - x0:
#     exponent = a' + d c' + gamma x'^2 + beta' x'          (linear in the first four)
#     1/A_hat  = 1 / (A + exp(-w)) + exp(z)                 (exp(-w) = (1/A_start - 1/A_max)^-1, exp(z) = 1/A_max)
# Why: centring removes the strong a/d and gamma/beta coupling (log10 C sits near 20, far from 0), and (w, z)
# keep A_max > A_start > 0 without constraints. The map to the paper's constants is exact and invertible.


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative, both shaped like r (Huber 1964)."""
    small = np.abs(r) <= delta
    return (np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)),
            np.where(small, r, delta * np.sign(r)))


def _percentiles(samples: np.ndarray, confidence: float) -> list[float] | None:
    """Percentile interval [lo, hi] of samples (m,), NaNs dropped; +inf allowed (no interpolation across it)."""
    x = np.asarray(samples, dtype=float)
    x = x[~np.isnan(x)]
    if not x.size:
        return None
    tail = (1.0 - confidence) / 2.0
    method = "linear" if np.all(np.isfinite(x)) else "inverted_cdf"
    return [float(v) for v in np.quantile(x, [tail, 1.0 - tail], method=method)]


@dataclass
class _Data:
    """Fit inputs, shapes (n,): activation ratio, centred log10 C and log2 G, measured EL."""

    A: np.ndarray
    c: np.ndarray
    x: np.ndarray
    el: np.ndarray
    c0: float
    x0: float
    delta: float

    def predict(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta (B, 6) -> (EL_hat (B, n), Jacobian d EL_hat / d theta (B, n, 6))."""
        a, d, gamma, beta, w, z = (theta[:, i:i + 1] for i in range(6))
        q, u = np.exp(-w), np.exp(z)
        r = 1.0 / (self.A + q) + u
        log_ahat = -np.log(r)
        expo = a + d * self.c + gamma * self.x ** 2 + beta * self.x
        # Far from the data a trial step can overflow EL; objectives() turns that into +inf, a rejected step.
        with np.errstate(over="ignore", invalid="ignore"):
            el = np.exp(expo * log_ahat)
            lin = el * log_ahat
            jac = np.stack([lin, lin * self.c, lin * self.x ** 2, lin * self.x,
                            el * expo * (-(q / (self.A + q) ** 2) / r), el * expo * (-u / r)], axis=-1)
        return el, jac

    def objectives(self, theta: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted Huber loss on EL residuals (B,) and its gradient (B, 6) for B problems at once: theta
        (B, 6), weights (B, n). Scaled by 1/delta so that gradient tolerances mean the same whatever delta is
        (the minimiser is unchanged); +inf where the law overflows."""
        el, jac = self.predict(theta)
        with np.errstate(over="ignore", invalid="ignore"):
            h, dh = _huber(el - self.el, self.delta)
            f = np.sum(weights * h, axis=1) / self.delta
            g = np.einsum("bn,bnk->bk", weights * dh, jac) / self.delta
        bad = ~(np.isfinite(f) & np.all(np.isfinite(g), axis=1))
        return np.where(bad, np.inf, f), np.where(bad[:, None], 0.0, g)

    def objective(self, theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        """One problem: theta (6,), weights (n,) -> (value, gradient (6,)), for scipy."""
        f, g = self.objectives(np.asarray(theta, dtype=float)[None], weights[None])
        return float(f[0]), g[0]

    def linear_start(self, w: float, z: float, weights: np.ndarray) -> np.ndarray | None:
        """Given (w, z), log EL = exponent x log A_hat is linear in (a', d, gamma, beta'): a weighted least
        squares on log EL gives the other four parameters, so a grid over (A_start, A_max) alone seeds the fit."""
        log_ahat = -np.log(1.0 / (self.A + math.exp(-w)) + math.exp(z))
        ok = (self.el > 0) & (weights > 0)
        X = log_ahat[:, None] * np.stack([np.ones_like(self.c), self.c, self.x ** 2, self.x], axis=1)
        sw = np.sqrt(weights[ok])[:, None]
        sol, *_ = np.linalg.lstsq(X[ok] * sw, np.log(self.el[ok]) * sw[:, 0], rcond=None)
        return np.array([*sol, w, z]) if np.all(np.isfinite(sol)) else None

    def natural(self, theta: np.ndarray) -> np.ndarray:
        """theta (..., 6) -> the paper's constants (..., 6) in EL_PARAMS order."""
        a1, d, gamma, beta1, w, z = np.moveaxis(np.asarray(theta, dtype=float), -1, 0)
        beta = beta1 - 2.0 * gamma * self.x0
        a = a1 - d * self.c0 - gamma * self.x0 ** 2 - beta * self.x0
        A_start = 1.0 / (np.exp(w) + np.exp(z))
        # Above _A_MAX_UNSEEN the law cannot tell A_max from infinity on any A <= 1 (1/A_max shifts log A_hat
        # by under 1e-6), so the fitted value there is only where the optimiser stopped: report infinity.
        A_max = np.where(np.exp(-z) >= _A_MAX_UNSEEN, np.inf, np.exp(-z))
        return np.stack([a, d, gamma, beta, A_start, A_max], axis=-1)


# (w, z) bounds: exp(-w) ~ A_start in [1e-8, 10], A_max = exp(-z) in [1e-3, 1e20]. The upper end of A_max is
# far beyond any activation ratio (A <= 1): there the law no longer depends on it, so a fit that finds no upper
# saturation lands anywhere near that end (Table 2's 5.28e16 is such a value).
_A_MAX_UNSEEN = 1e6
_BOUNDS = [(None, None)] * 4 + [(-math.log(10.0), math.log(1e8)), (math.log(1e-20), math.log(1e3))]
_START_A_START = np.geomspace(1e-4, 0.3, 12)
_START_A_MAX = (1e16, 1e3, 30.0, 5.0, 2.0)
_LBFGS = {"maxiter": 3000, "ftol": 1e-14, "gtol": 1e-10}


def _minimise(data: _Data, theta0: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    res = minimize(data.objective, theta0, args=(weights,), jac=True, method="L-BFGS-B", bounds=_BOUNDS,
                   options=_LBFGS)
    return np.asarray(res.x, dtype=float), float(res.fun)


_LO = np.array([-np.inf] * 4 + [b[0] for b in _BOUNDS[4:]])
_HI = np.array([np.inf] * 4 + [b[1] for b in _BOUNDS[4:]])


def _batched_bfgs(data: _Data, theta: np.ndarray, weights: np.ndarray, *, max_iter: int = 400,
                  ftol: float = 1e-12, gtol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """BFGS with Armijo backtracking, run for B independent problems at once: theta (B, 6) starts, weights
    (B, n). Returns (ends (B, 6), values (B,)).

    Why not one scipy call per bootstrap resample: on this 6-parameter problem scipy's per-iteration overhead
    dominates (one L-BFGS-B run took 0.2-0.5 s on the 2 shared CPU cores this was written on, so 200 resamples
    from 3 starts took over a minute); here one numpy evaluation serves every unconverged problem (the same
    200 resamples: 1-2 s) and each still follows its own BFGS trajectory. Steps are projected onto the (w, z)
    bounds (_BOUNDS); a problem stops when its relative decrease falls under ftol (scipy's rule), its gradient
    under gtol, or its line search fails."""
    theta = np.clip(np.array(theta, dtype=float), _LO, _HI)
    B = len(theta)
    f, g = data.objectives(theta, weights)
    H = np.broadcast_to(np.eye(6), (B, 6, 6)).copy()
    active = np.isfinite(f)
    eye = np.eye(6)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        th, fi, gi, Hi, wi = theta[idx], f[idx], g[idx], H[idx], weights[idx]
        p = -np.einsum("bij,bj->bi", Hi, gi)
        slope = np.einsum("bi,bi->b", p, gi)
        uphill = slope >= 0  # H lost positive definiteness: restart from steepest descent
        p[uphill], Hi[uphill] = -gi[uphill], eye
        slope = np.einsum("bi,bi->b", p, gi)
        step = np.ones(len(idx))
        new = np.clip(th + p, _LO, _HI)
        fn, gn = data.objectives(new, wi)
        todo = ~(fn <= fi + 1e-4 * step * slope)
        for _ in range(40):
            if not todo.any():
                break
            step[todo] *= 0.5
            t = np.flatnonzero(todo)
            new[t] = np.clip(th[t] + step[t, None] * p[t], _LO, _HI)
            fn[t], gn[t] = data.objectives(new[t], wi[t])
            todo[t] = ~(fn[t] <= fi[t] + 1e-4 * step[t] * slope[t])
        moved = ~todo
        s_, y_ = new - th, gn - gi
        sy = np.einsum("bi,bi->b", s_, y_)
        upd = moved & (sy > 1e-12)
        if upd.any():
            rho = 1.0 / sy[upd]
            V = eye - rho[:, None, None] * np.einsum("bi,bj->bij", s_[upd], y_[upd])
            Hi[upd] = (np.einsum("bij,bjk,blk->bil", V, Hi[upd], V)
                       + rho[:, None, None] * np.einsum("bi,bj->bij", s_[upd], s_[upd]))
        theta[idx[moved]], g[idx[moved]] = new[moved], gn[moved]
        done = todo | ((fi - fn) <= ftol * np.maximum(np.maximum(np.abs(fi), np.abs(fn)), 1.0))
        f[idx[moved]] = fn[moved]
        done |= np.max(np.abs(g[idx]), axis=1) < gtol
        H[idx] = Hi
        active[idx[done]] = False
    return theta, f


def _starts(data: _Data, weights: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` best grid starts (keep, 6), ranked by the Huber objective."""
    cands = []
    for A_start in _START_A_START:
        for A_max in _START_A_MAX:
            if A_max <= A_start * 1.01:
                continue
            w, z = math.log(1.0 / A_start - 1.0 / A_max), -math.log(A_max)
            theta = data.linear_start(w, z, weights)
            if theta is not None:
                cands.append((data.objective(theta, weights)[0], tuple(theta)))
    cands.sort(key=lambda t: t[0])
    return np.array([t for _, t in cands[:keep]])


def _distinct(ends: list[tuple[np.ndarray, float]], count: int) -> list[np.ndarray]:
    """Up to ``count`` end points, best first, dropping any within 1e-3 (per coordinate) of a better one."""
    out: list[np.ndarray] = []
    for theta, _ in sorted(ends, key=lambda t: t[1]):
        if all(np.max(np.abs(theta - o)) > 1e-3 for o in out):
            out.append(theta)
        if len(out) == count:
            break
    return out


@dataclass
class ELFit:
    """A fitted Eq. 13 law.

    params: {name: value} for EL_PARAMS (log10 C, log2 G). intervals: {name: [lo, hi]} percentile bootstrap
    intervals at ``confidence`` (None without bootstrap). draws: (n_boot, 6) bootstrap constants in EL_PARAMS
    order, resampling whole groups (None without bootstrap). fit_range: {"C", "A", "G", "EL", optionally
    "G_moelab"}: [min, max] of the points fitted. n_points / n_groups: points and groups behind the fit.
    points: what the EL values were ("family laws": each family's efficiency leverage from its own law;
    "cells": each (family, size, budget) cell's compute leverage; "given": passed in directly).
    """

    params: dict[str, float]
    objective: float
    n_points: int
    n_groups: int
    fit_range: dict[str, list[float]]
    intervals: dict[str, list[float]] | None = None
    draws: np.ndarray | None = field(default=None, repr=False)
    confidence: float = 0.95
    huber_delta: float = 0.1
    el_max: float | None = None
    points: str = "given"

    def predict(self, A: Any, G: Any, C: Any) -> np.ndarray:
        """EL at (A, G, C) (broadcast shape)."""
        return efficiency_leverage(A, G, C, self.params)

    def optimal_granularity(self) -> float:
        return float(optimal_granularity(self.params))


def fit_efficiency_leverage(
    A: Any, G: Any, C: Any, EL: Any, *, groups: Sequence[Any] | None = None, G_moelab: Any = None,
    n_boot: int = 200, confidence: float = 0.95, huber_delta: float = 0.1, el_max: float | None = None,
    n_starts: int = 8, seed: int = 0,
) -> ELFit:
    """Fit Tian et al. 2025 Eq. 13 to measured efficiency leverages.

    A, G, C, EL: (n,) arrays: activation ratio in (0, 1], the paper's granularity 2 d_model / d_expert, the
    compute budget in FLOPs, and the measured EL of that design at that budget. groups: (n,) labels; points
    with the same label (one family's budgets, or one trial's seeds) share their noise, so the bootstrap draws
    whole groups; None = each point its own group. G_moelab: (n,) d_ff / d_expert, only recorded in fit_range.
    huber_delta: Huber's switch from squared to absolute residual, in EL units (refs.md does not give the
    paper's; 0.1 is a few percent of a typical EL, about the noise of a measured one). el_max: fit only
    points with EL < el_max (the paper used 6); None keeps all. n_starts: the best grid starts run to convergence.
    n_boot: bootstrap resamples (0 = none).
    """
    cols = {"A": A, "G": G, "C": C, "EL": EL}
    arrs = {k: np.asarray(v, dtype=float).ravel() for k, v in cols.items()}
    n = {k: len(v) for k, v in arrs.items()}
    if len(set(n.values())) != 1:
        raise ValueError(f"A, G, C, EL must have the same length, got {n}")
    for k, v in arrs.items():
        _positive(k, v)
    if np.any(arrs["A"] > 1):
        raise ValueError(f"A: got {float(arrs['A'].max())}; allowed: activation ratios in (0, 1]")
    labels = np.arange(len(arrs["A"])) if groups is None else np.asarray(groups, dtype=object).ravel()
    if len(labels) != len(arrs["A"]):
        raise ValueError(f"groups: got {len(labels)} labels for {len(arrs['A'])} points")
    gm = None if G_moelab is None else _positive("G_moelab", np.asarray(G_moelab, dtype=float).ravel())
    keep = np.ones(len(arrs["A"]), bool) if el_max is None else arrs["EL"] < el_max
    for name, needed in (("A", 2), ("G", 3), ("C", 2)):
        if len(np.unique(arrs[name][keep])) < needed:
            raise ValueError(f"{name} has {len(np.unique(arrs[name][keep]))} distinct value(s); Eq. 13 needs at "
                             f"least {needed} ({'a parabola in log G' if name == 'G' else 'a slope'})")
    if keep.sum() < len(EL_PARAMS) + 1:
        raise ValueError(f"Eq. 13 has 6 parameters and needs at least 7 points, got {int(keep.sum())}")
    A_, G_, C_, EL_ = (arrs[k][keep] for k in ("A", "G", "C", "EL"))
    labels = labels[keep]
    c, x = np.log10(C_), np.log2(G_)
    data = _Data(A=A_, c=c - c.mean(), x=x - x.mean(), el=EL_, c0=float(c.mean()), x0=float(x.mean()),
                 delta=float(huber_delta))

    ones = np.ones(len(A_))
    starts = _starts(data, ones, n_starts)
    thetas, values = _batched_bfgs(data, starts, np.tile(ones, (len(starts), 1)))
    seeds = _distinct(list(zip(thetas, values)), 3)
    # The best distinct ends are polished by scipy's L-BFGS-B (few iterations from a converged point), so the
    # reported optimum is a reference optimiser's, not only the batched one's.
    ends = [_minimise(data, s, ones) for s in seeds]
    best, fbest = min(ends, key=lambda t: t[1])
    seeds = _distinct(ends, 3)
    params = dict(zip(EL_PARAMS, (float(v) for v in data.natural(best))))

    fit_range = {"C": [float(C_.min()), float(C_.max())], "A": [float(A_.min()), float(A_.max())],
                 "G": [float(G_.min()), float(G_.max())], "EL": [float(EL_.min()), float(EL_.max())]}
    if gm is not None:
        fit_range["G_moelab"] = [float(gm[keep].min()), float(gm[keep].max())]

    draws = intervals = None
    uniq, inverse = np.unique(labels.astype(str), return_inverse=True)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        # A resample with replacement of whole groups = integer weights (its counts) on the original points.
        counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
                           for _ in range(n_boot)])
        w = np.repeat(counts[:, inverse].astype(float), len(seeds), axis=0)
        # Each resample's optimum sits in the basin of one of the full data's best minima (its objective
        # moves by O(1/groups)), so the full fit's distinct ends are enough starts for it.
        ends, vals = _batched_bfgs(data, np.tile(np.array(seeds), (n_boot, 1)), w)
        pick = np.argmin(vals.reshape(n_boot, len(seeds)), axis=1)
        out = data.natural(ends.reshape(n_boot, len(seeds), 6)[np.arange(n_boot), pick])
        draws = out
        intervals = {name: _percentiles(out[:, i], confidence) for i, name in enumerate(EL_PARAMS)}
    return ELFit(params=params, objective=fbest * data.delta, n_points=int(keep.sum()), n_groups=len(uniq),
                 fit_range=fit_range, intervals=intervals, draws=draws, confidence=float(confidence),
                 huber_delta=float(huber_delta), el_max=el_max)


# ----------------------------------------------------------------------------------------------------------
# Fits table
# ----------------------------------------------------------------------------------------------------------


def el_law_rows(fit: ELFit) -> list[dict]:
    """The fit as `fits` table rows (moelab.platform.fitstable.FITS_SCHEMA; one row, scope "law").

    parameters holds the six constants, the conventions, the fit range (`fit_range`: [min, max] of C, A, G
    and EL, and of moelab's G = d_ff / d_expert when given) and the bootstrap draws (`draws`: n_boot lists of
    the six constants), which `moelab advise` needs for intervals on EL and on the optimal G (intervals on the
    constants alone cannot give those: the constants are correlated)."""
    parameters: dict[str, Any] = dict(fit.params)
    parameters.update({
        "conventions": "Tian et al. 2025 Eq. 13; log10 C, log2 G; G = 2 d_model / d_expert; A = activated "
                       "(top-k + shared) / (routed + shared) experts; C = training FLOPs",
        "fit_range": fit.fit_range,
        "huber_delta": fit.huber_delta,
        "el_max": fit.el_max,
        "n_groups": fit.n_groups,
        "points": fit.points,
        "draws": None if fit.draws is None else fit.draws.tolist(),
    })
    return [{
        "family": "moe", "law": "efficiency_leverage", "scope": "law", "status": "ok",
        "parameters": parameters, "intervals": fit.intervals, "n_points": fit.n_points,
        "n_boot": 0 if fit.draws is None else len(fit.draws), "confidence": fit.confidence,
        "at_compute": None,
        "message": f"fitted on {fit.n_points} points ({fit.points}) in {fit.n_groups} groups; bootstrap resamples "
                   f"whole groups",
    }]


def law_from_row(parameters: Mapping[str, Any] | str) -> tuple[dict[str, float], np.ndarray | None, dict]:
    """(constants, draws (S, 6) or None, fit_range) from an `efficiency_leverage` row's parameters (a dict, or
    the JSON string the fits table stores). ValueError naming what is missing."""
    import json

    p = json.loads(parameters) if isinstance(parameters, str) else dict(parameters)
    missing = [k for k in EL_PARAMS if p.get(k) is None]
    if missing:
        raise ValueError(f"the efficiency_leverage row lacks {missing}")
    draws = p.get("draws")
    draws = None if not draws else np.asarray(draws, dtype=float).reshape(-1, len(EL_PARAMS))
    return {k: float(p[k]) for k in EL_PARAMS}, draws, dict(p.get("fit_range") or {})


# ----------------------------------------------------------------------------------------------------------
# Advice: the design the law prefers at a budget, and shapes that realise it (`moelab advise`)
# ----------------------------------------------------------------------------------------------------------
# Shapes follow the moe-1b preset's conventions (moelab.trainers.config): 64-wide heads, vocabulary 50,304,
# sequences of 4,096, QK-norm, width 128 x depth (moe-1b: 2,048 x 16), and an active FFN as wide as the dense
# SwiGLU it replaces (8/3 d_model rounded up to 64), split into experts of d_expert = 2 d_model / G.

_ASPECT = 128
_SATURATION_SHARE = 0.99   # the A ladder stops once EL is within 1% of its A -> 0 limit
_A_FLOOR = 2.0 ** -12      # ... or at this activation ratio, whichever comes first


def default_active_params(budget: float) -> float:
    """Active non-embedding parameters for a budget when none is given: Hoffmann et al.'s 20 tokens per
    parameter, C = 6 N (20 N), so N = sqrt(C / 120). A starting point, not an MoE-optimal size."""
    return math.sqrt(budget / 120.0)


def _moe_shape(n_layers: int, G: float, n_shared: int, n_routed: int | None = None) -> Any:
    """A validated ModelConfig of depth n_layers with experts of width 2 d_model / G (rounded to 8).
    n_routed None: only the active experts exist (top_k + n_shared = all experts)."""
    from moelab.trainers.config import MoEConfig, ModelConfig

    d = _ASPECT * n_layers
    d_ff = 64 * math.ceil(8 / 3 * d / 64)
    d_expert = max(8, 8 * round(2 * d / G / 8))
    n_active = max(n_shared + 1, round(d_ff / d_expert))
    top_k = n_active - n_shared
    moe = MoEConfig(n_experts=max(top_k, n_routed or top_k), top_k=top_k, d_expert=d_expert, n_shared=n_shared,
                    renormalize=False)
    return ModelConfig(vocab_size=50304, d_model=d, n_layers=n_layers, n_heads=d // 64, d_ff=d_ff,
                       max_seq_len=4096, qk_norm="full", moe=moe).validate()


def _base_depth(active_params: float, G: float, n_shared: int) -> int:
    """The depth whose shape has active non-embedding parameters closest (in log) to active_params."""
    best, depth = math.inf, 1
    for L in range(1, 257):
        n = _moe_shape(L, G, n_shared).param_counts()["active_non_embedding"]
        if abs(math.log(n / active_params)) < best:
            best, depth = abs(math.log(n / active_params)), L
    return depth


def _plan_memory(model: Any, gpus: int) -> dict:
    """`moelab plan`'s per-GPU memory for `model` at the moe-1b preset's batch, sequence and micro-batch, with
    ep = the largest common divisor of n_experts and gpus."""
    import dataclasses

    from moelab.trainers.config import RunConfig, preset
    from moelab.trainers.plan import PlanInputs, make_plan

    rc = RunConfig(model=model, train=dataclasses.replace(preset("moe-1b").train), preset="advised shape")
    ep = math.gcd(model.moe.n_experts, gpus)
    r = make_plan(rc, PlanInputs(gpus=gpus, ep=ep))
    return {"gpus": gpus, "ep": ep, "mem_total_gib": r["mem_total_gib"], "mem_params_gib": r["mem_params_gib"],
            "mem_activations_gib": r["mem_activations_gib"], "seq": r["seq"], "micro_batch": r["micro_batch"],
            "batch": r["batch"]}


def allowed_gpus() -> list[int]:
    """GPU counts `moelab plan` accepts at the moe-1b preset's batch (512 sequences, 4 per GPU per micro-step)."""
    from moelab.trainers.config import preset

    t = preset("moe-1b").train
    return [w for w in range(1, t.batch_size // t.micro + 1) if t.batch_size % (w * t.micro) == 0]


def advise(budget: float, params: Mapping[str, float], *, draws: np.ndarray | None = None,
           fit_range: Mapping[str, Any] | None = None, paper: bool = False, active_params: float | None = None,
           max_total_params: float | None = None, gpus: int = 8, n_shared: int = 1,
           confidence: float = 0.95) -> dict:
    """What Eq. 13 advises at compute ``budget`` (FLOPs), as a JSON-able dict.

    params: the six constants; draws: (S, 6) bootstrap constants (intervals come only from these); fit_range:
    the fit's [min, max] of C, A, G, EL (extrapolations are flagged against it); paper: the constants are
    Table 2's (flagged against PAPER_EL_FIT_RANGE instead). active_params: active non-embedding parameters of
    the shapes (None: default_active_params). max_total_params: the A ladder stops at the smallest A whose
    shape fits under it. gpus: the layout `moelab plan` sizes memory for. ValueError naming the argument for
    bad input.

    Keys: G_opt (+ G_opt_interval, G_opt_no_optimum), shape (the base: depth, width, d_expert, active experts),
    rows (per activation ratio: target A, EL at G_opt [+ interval], the realising shape, its A, G, EL, totals,
    memory, extrapolation notes), saturation, stop, notes (about the budget and the source).
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget: got {budget!r}; allowed: a positive number of FLOPs")
    fr = dict(PAPER_EL_FIT_RANGE if paper else (fit_range or {}))
    g_opt = float(optimal_granularity(params))
    out: dict[str, Any] = {"budget": budget, "params": dict(params), "confidence": confidence,
                           "intervals": draws is not None, "G_opt": g_opt, "log2_G_opt": math.log2(g_opt),
                           "notes": []}
    notes = out["notes"]
    dr = None if draws is None else {k: draws[:, i:i + 1] for i, k in enumerate(EL_PARAMS)}
    if dr is not None:
        gamma, beta = draws[:, 2], draws[:, 3]
        ok = gamma > 0
        out["G_opt_interval"] = _percentiles(np.power(2.0, -beta[ok] / (2 * gamma[ok])), confidence)
        out["G_opt_no_optimum"] = int((~ok).sum())
    if paper:
        notes.append("Table 2's constants come without intervals (refs.md gives none): every figure is a point")
        notes.append("compute range of Table 2's fit: not given (refs.md), so whether this budget extrapolates "
                     "cannot be said; the paper fitted points with EL < 6, so EL above 6 is an extrapolation")
    else:
        c_lo, c_hi = fr.get("C") or (None, None)
        if c_lo is not None and not c_lo <= budget <= c_hi:
            notes.append(f"extrapolation: the budget {budget:.3g} FLOPs is outside the fitted compute range "
                         f"[{c_lo:.3g}, {c_hi:.3g}]")
        g_lo, g_hi = fr.get("G") or (None, None)
        if g_lo is not None and not g_lo <= g_opt <= g_hi:
            notes.append(f"extrapolation: the optimal G {g_opt:.3g} is outside the fitted G range [{g_lo:.3g}, "
                         f"{g_hi:.3g}]")

    if active_params is None:
        active_params = default_active_params(budget)
        out["active_params_source"] = "default: 20 tokens per active parameter, N = sqrt(C / 120)"
    else:
        out["active_params_source"] = "--active-params"
    if not (math.isfinite(active_params) and active_params > 0):
        raise ValueError(f"active_params: got {active_params!r}; allowed: a positive number")
    depth = _base_depth(active_params, g_opt, n_shared)
    base = _moe_shape(depth, g_opt, n_shared)
    n_active = base.moe.top_k + n_shared
    pc = base.param_counts()
    tokens = budget / base.flops_per_token(4096)
    out["active_params"] = active_params
    out["shape"] = {"n_layers": depth, "d_model": base.d_model, "n_heads": base.n_heads, "d_ff": base.d_ff,
                    "d_expert": base.d_expert, "top_k": base.moe.top_k, "n_shared": n_shared,
                    "active_experts": n_active, "G_paper": granularity_paper(base),
                    "G_moelab": granularity_moelab(base), "active_non_embedding": pc["active_non_embedding"],
                    "tokens": tokens}

    def total(n_routed: int) -> int:
        return _moe_shape(depth, g_opt, n_shared, n_routed).param_counts()["total"]

    e_max = None
    if max_total_params is not None:
        t0 = total(base.moe.top_k)
        if not max_total_params >= t0:
            raise ValueError(f"max_total_params: got {max_total_params:.4g}; allowed: at least {t0:.4g}, the total "
                             f"of the active shape with no inactive experts ({depth} layers, d_model {base.d_model})")
        slope = total(base.moe.top_k + 1) - t0
        e_max = base.moe.top_k + int((max_total_params - t0) // slope)

    sat = saturated_leverage(g_opt, budget, params)
    out["saturation"] = {"EL": float(sat), "A_start": float(params["A_start"])}
    if dr is not None:
        out["saturation"]["interval"] = _percentiles(saturated_leverage(g_opt, budget, dr).ravel(), confidence)

    def routed(n: float, down: bool = False) -> int:
        # Routed experts in multiples of 8 (from 8 on) so that expert parallelism can split them evenly.
        k = (math.floor(n / 8) if down else round(n / 8)) * 8 if n >= 8 else (math.floor(n) if down else round(n))
        return max(base.moe.top_k, int(k))

    if e_max is not None:
        e_max = routed(e_max, down=True)
        out["A_min"] = n_active / (e_max + n_shared)
    rows, seen, A_t, stop = [], set(), 0.5, None
    while stop is None:
        n_routed = routed(n_active / A_t - n_shared)
        if e_max is not None and n_routed >= e_max:
            n_routed, stop = e_max, "the smallest A under --max-total-params"
            A_t = n_active / (e_max + n_shared)
        el = float(efficiency_leverage(A_t, g_opt, budget, params))
        if stop is None and el >= _SATURATION_SHARE * sat:
            stop = f"EL within {1 - _SATURATION_SHARE:.0%} of its limit as A -> 0"
        if stop is None and A_t / 2 < _A_FLOOR:
            stop = f"A = 2^{int(round(math.log2(_A_FLOOR)))}, the smallest ratio listed"
        if n_routed in seen:
            A_t /= 2
            continue
        seen.add(n_routed)
        m = _moe_shape(depth, g_opt, n_shared, n_routed)
        a_real, g_real = activation_ratio(m), granularity_paper(m)
        el_real = float(efficiency_leverage(a_real, g_real, budget, params))
        counts = m.param_counts()
        row = {"A_target": A_t, "EL": el, "n_experts": m.moe.n_experts, "top_k": m.moe.top_k,
               "n_shared": n_shared, "d_expert": m.d_expert, "A": a_real, "G_paper": g_real,
               "G_moelab": granularity_moelab(m), "EL_shape": el_real, "params_total": counts["total"],
               "params_active": counts["active"], "plan": _plan_memory(m, gpus), "extrapolated": []}
        if dr is not None:
            row["EL_interval"] = _percentiles(efficiency_leverage(A_t, g_opt, budget, dr).ravel(), confidence)
        ex = row["extrapolated"]
        if paper and el >= 6.0:
            ex.append("EL above the paper's fitted EL < 6")
        a_lo, a_hi = fr.get("A") or (None, None)
        if not paper and a_lo is not None and not a_lo <= a_real <= a_hi:
            ex.append(f"A outside the fitted [{a_lo:.3g}, {a_hi:.3g}]")
        el_lo, el_hi = fr.get("EL") or (None, None)
        if not paper and el_hi is not None and el > el_hi:
            ex.append(f"EL above the largest fitted {el_hi:.3g}")
        rows.append(row)
        A_t /= 2
    out["rows"], out["stop"] = rows, stop
    return out
