"""Scaling-law fits on plain arrays: Chinchilla L(N, D), loss-vs-compute power laws, leverage, granularity.

Every fit here is the same kind of problem, so one engine serves all of them. Each law is written as

    L_hat = sum_k exp(u_k),      u_k = M_k @ theta   (linear in the parameters theta)

so that ``log L_hat = LSE_k(u_k)`` and the loss is the Huber loss of ``log L_hat - log L``, summed over points
(Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Approach 3, and its replication by
Besiroglu et al. 2024, Epoch AI). Examples (x = ln N, y = ln D, c = ln C):

* Chinchilla: ``L = E + A/N^alpha + B/D^beta``  ->  u = (a - alpha x, b - beta y, e), theta = (a, b, e, alpha, beta)
* power law:  ``L = E + A C^-alpha``            ->  u = (a - alpha c, e)
* Krajewski et al. 2024 eq. 9: ``L = c + (g/G^gamma + a)/N^alpha + b/D^beta``
  ->  u = (ln g - gamma ln G - alpha x, ln a - alpha x, ln b - beta y, ln c)

The design tensor ``M`` has shape ``(K, n, p)`` (terms, points, parameters). The objective and its analytic
gradient are vectorised over points *and* over starts.

Optimiser. Hoffmann et al. run L-BFGS from every start of a grid and keep the best end point. One scipy
``minimize`` call per start costs ~100 us of Python/wrapper overhead per evaluation, ~5-10 ms per start,
so the 4,500-start grid alone takes ~30 s and 1,000 bootstrap refits would take minutes. Instead:

1. every start is advanced by the same L-BFGS algorithm (two-loop recursion, Armijo backtracking, scipy's
   relative-decrease stopping rule), written for a batch of independent problems so one numpy evaluation
   serves all unconverged starts (``_batched_lbfgs``); each start still follows its own trajectory;
2. the best few *distinct* end points are rerun with ``scipy.optimize.minimize(method="L-BFGS-B")`` with
   tight tolerances (``_polish``), so the reported optimum is a reference L-BFGS-B optimum.

Internally the parameters are centred (``_centring``): intercepts are re-expressed at the mean of ln N, ln D.
This is a fixed invertible linear map, so minimisers are unchanged; it only removes the strong
intercept/exponent coupling that slows every gradient method.

Bootstrap (``n_boot``): a resample with replacement is the same as integer weights (the counts) on the original
points, so resamples reuse the design tensor and only the weights change. Each resample is started from the
few best *distinct* end points of the full-data grid search instead of the whole grid. Why that is sound: a
resample's objective is a small perturbation of the full-data objective (each point's weight moves by
O(1) out of n), so its global minimum lies in the basin of one of the full-data objective's best local minima;
the grid only exists to find those basins, and it has already found them. Starting from several distinct
minima (not only the best) covers resamples where the ranking of two nearby basins flips.
``boot_starts="grid"`` restores the brute-force behaviour (every grid start for every resample).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

__all__ = [
    "ChinchillaFit",
    "PowerLawFit",
    "GranularityFit",
    "chinchilla_grid",
    "fit_chinchilla",
    "fit_power_law",
    "fit_granularity",
    "parameter_leverage",
    "compute_leverage",
]

# scipy L-BFGS-B settings for the final polish (_polish). The objective is rescaled by 1/delta inside the
# optimiser (see _LSEModel.value_and_grad): with delta = 1e-3 the raw objective is ~1e-3 and its gradient
# tiny, which would trip scipy's absolute gradient tolerance long before the minimum. Rescaling leaves the
# minimiser unchanged.
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 10}


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _as_positive_1d(name: str, values: Any) -> np.ndarray:
    """Return ``values`` as a float array of shape (n,), raising ValueError if any entry is NaN, inf or <= 0."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); drop or fix them before fitting")
    if np.any(arr <= 0):
        bad = int(np.sum(arr <= 0))
        raise ValueError(f"{name} contains {bad} non-positive value(s); scaling laws need positive inputs")
    return arr


def _check_columns(**columns: Any) -> dict[str, np.ndarray]:
    """Validate several same-length positive 1-D columns; returns them as float arrays of shape (n,)."""
    arrays = {name: _as_positive_1d(name, values) for name, values in columns.items()}
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return arrays


def _check_point_count(n: int, n_params: int, what: str) -> None:
    """A fit needs more points than parameters (at least one residual degree of freedom)."""
    if n < n_params + 1:
        raise ValueError(
            f"{what} has {n_params} parameters and needs at least {n_params + 1} points, got {n}"
        )


def _check_distinct(name: str, values: np.ndarray, needed: int, why: str) -> None:
    """Raise unless ``values`` (shape (n,)) holds at least ``needed`` distinct values."""
    distinct = len(np.unique(values))
    if distinct < needed:
        raise ValueError(f"{name} has {distinct} distinct value(s); at least {needed} are needed {why}")


# ----------------------------------------------------------------------------------------------------------
# Engine: Huber loss on the log of a sum of exponentials, batched multi-start L-BFGS, scipy polish
# ----------------------------------------------------------------------------------------------------------


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss, shape of ``r``: 0.5 r^2 for |r| <= delta, delta (|r| - delta/2) beyond (Huber 1964)."""
    abs_r = np.abs(r)
    return np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def _centring(design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reparametrise so every non-intercept column of every term has mean zero over the points.

    design (K, n, p) where each term k has one intercept column j0(k) (all ones) used by no other term.
    Writing M_kj = mean_k,j + (M_kj - mean_kj) gives u_k = theta'_j0 + sum_j (M_kj - mean_kj) theta_j with
    theta'_j0 = theta_j0 + sum_{j != j0} mean_kj theta_j, i.e. theta' = T theta. Same minimisers, but the
    intercepts no longer move with the exponents (ln N ~ 20 makes the raw problem badly conditioned).
    Returns (centred design (K, n, p), T (p, p)).
    """
    K, _, p = design.shape
    centred = design.copy()
    to_opt = np.eye(p)
    for k in range(K):
        is_one = np.all(design[k] == 1.0, axis=0)
        j0 = int(np.flatnonzero(is_one)[0])
        means = design[k].mean(axis=0)
        means[j0] = 0.0
        centred[k] -= means
        to_opt[j0] += means
    return centred, to_opt


class _LSEModel:
    """``log L_hat = LSE_k(design[k] @ theta)`` against targets ``log L``, Huber(delta) on the residuals.

    Works internally in centred coordinates theta' = T theta (see _centring); ``to_opt``/``from_opt`` convert
    arrays of parameter vectors (..., p). design: (K, n, p); target: (n,) log losses.
    """

    def __init__(self, design: np.ndarray, target: np.ndarray, delta: float):
        self.K, self.n, self.p = design.shape
        centred, self._to_opt = _centring(design)
        self._from_opt = np.linalg.inv(self._to_opt)
        self.flat = centred.reshape(self.K * self.n, self.p)  # (K n, p) for BLAS products
        self.target = target
        self.delta = delta

    def to_opt(self, theta: np.ndarray) -> np.ndarray:
        return theta @ self._to_opt.T

    def from_opt(self, theta_opt: np.ndarray) -> np.ndarray:
        return theta_opt @ self._from_opt.T

    def _terms(self, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """thetas (S, p) centred -> (log L_hat (S, n), exp(u - max) (S, K, n), sum over terms (S, n))."""
        u = (thetas @ self.flat.T).reshape(len(thetas), self.K, self.n)
        top = u.max(axis=1)
        ex = np.exp(u - top[:, None, :])
        total = ex.sum(axis=1)
        return top + np.log(total), ex, total

    def value_and_grad(self, thetas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Objectives sum_i w_si Huber(r_si) / delta, shape (S,), and gradients (S, p), centred coordinates.

        thetas (S, p); weights (S, n) or (n,). The 1/delta scale only helps the optimiser's tolerances.
        d r / d theta = sum_k softmax_k(u) M_k (log-sum-exp derivative); Huber' = clip(r, -delta, delta).
        """
        log_hat, ex, total = self._terms(thetas)
        r = log_hat - self.target
        values = np.sum(weights * _huber(r, self.delta), axis=1) / self.delta
        psi = weights * np.clip(r, -self.delta, self.delta) / (self.delta * total)  # (S, n)
        grads = (ex * psi[:, None, :]).reshape(len(thetas), -1) @ self.flat
        return values, grads

    def objective(self, theta: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Unscaled sum_i w_i Huber_delta(log L_hat_i - log L_i) for natural-coordinate thetas (..., p)."""
        thetas = np.atleast_2d(self.to_opt(theta))
        log_hat, _, _ = self._terms(thetas)
        values = np.sum(weights * _huber(log_hat - self.target, self.delta), axis=1)
        return values if np.ndim(theta) > 1 else values[0]

    def log_predict(self, theta: np.ndarray) -> np.ndarray:
        """log L_hat (n,) at one natural-coordinate theta (p,)."""
        return self._terms(self.to_opt(theta)[None, :])[0][0]


# --- Batched L-BFGS: every start (row) is an independent problem, advanced in lockstep -------------------


def _two_loop(grad: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """L-BFGS two-loop recursion (Nocedal & Wright 2006, Algorithm 7.4) for many problems at once.

    grad (S, p); s_hist, y_hist (S, m, p) with the newest pair last and unused slots zero; rho (S, m)
    (0 for unused). Returns the quasi-Newton direction H grad, shape (S, p).
    """
    m = s_hist.shape[1]
    q = grad.copy()
    coeffs = np.zeros(rho.shape)
    for i in range(m - 1, -1, -1):
        coeffs[:, i] = rho[:, i] * np.einsum("sp,sp->s", s_hist[:, i], q)
        q -= coeffs[:, i, None] * y_hist[:, i]
    s_new, y_new = s_hist[:, -1], y_hist[:, -1]
    yy = np.einsum("sp,sp->s", y_new, y_new)
    scale = np.where(rho[:, -1] > 0, np.einsum("sp,sp->s", s_new, y_new) / np.where(yy > 0, yy, 1.0), 1.0)
    r = scale[:, None] * q
    for i in range(m):
        beta = rho[:, i] * np.einsum("sp,sp->s", y_hist[:, i], r)
        r += s_hist[:, i] * (coeffs[:, i] - beta)[:, None]
    return r


def _backtrack(fun, theta, f, direction, slope, step, max_halvings=40, c1=1e-4):
    """Armijo backtracking for many problems: halve each row's step until f decreases enough.

    theta, direction (S, p); f, slope (g . d < 0), step (S,). fun(thetas, rows) -> (f (S',), g (S', p)).
    Returns (ok (S,) bool, new theta (S, p), new f (S,), new g (S, p)); rows that never pass keep theta.
    """
    S, p = theta.shape
    ok = np.zeros(S, dtype=bool)
    new_theta, new_f, new_g = theta.copy(), f.copy(), np.zeros((S, p))
    pending = np.arange(S)
    step = step.copy()
    for _ in range(max_halvings):
        trial = theta[pending] + step[pending, None] * direction[pending]
        f_try, g_try = fun(trial, pending)
        good = np.isfinite(f_try) & (f_try <= f[pending] + c1 * step[pending] * slope[pending])
        done = pending[good]
        ok[done], new_theta[done], new_f[done], new_g[done] = True, trial[good], f_try[good], g_try[good]
        pending = pending[~good]
        if pending.size == 0:
            break
        step[pending] *= 0.5
    return ok, new_theta, new_f, new_g


def _batched_lbfgs(fun, theta0: np.ndarray, *, max_iter: int = 500, memory: int = 10,
                   ftol: float = 2.2e-9, gtol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Minimise S independent smooth problems with L-BFGS (Armijo backtracking), all rows at once.

    fun(thetas (S', p), rows (S',) int) -> (values (S',), grads (S', p)); ``rows`` says which problems the
    thetas belong to. theta0: (S, p) starts. A row stops when its relative decrease falls to ``ftol``, its
    largest gradient entry to ``gtol`` (scipy L-BFGS-B's rules and default values), when its line search
    fails, or after ``max_iter`` iterations (rows still creeping along a flat valley). Returns the
    end points (S, p) and values (S,). Converged rows drop out, so late iterations are cheap.
    """
    theta = np.array(theta0, dtype=float)
    S, p = theta.shape
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f, g = fun(theta, np.arange(S))
    s_hist, y_hist, rho = np.zeros((S, memory, p)), np.zeros((S, memory, p)), np.zeros((S, memory))
    active = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        direction = -_two_loop(g[idx], s_hist[idx], y_hist[idx], rho[idx])
        slope = np.einsum("sp,sp->s", g[idx], direction)
        restart = ~(slope < 0)  # not a descent direction: forget the memory, use steepest descent
        if restart.any():
            direction[restart] = -g[idx[restart]]
            slope[restart] = -np.einsum("sp,sp->s", g[idx[restart]], g[idx[restart]])
            rho[idx[restart]] = 0.0
            s_hist[idx[restart]] = y_hist[idx[restart]] = 0.0
        fresh = rho[idx, -1] == 0  # no curvature yet: cap the first step's largest move at 1
        step = np.where(fresh, 1.0 / np.maximum(1.0, np.abs(direction).max(axis=1)), 1.0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ok, th_new, f_new, g_new = _backtrack(lambda t, rows: fun(t, idx[rows]), theta[idx], f[idx],
                                                  direction, slope, step)
        # curvature pairs; skip those that would break positive-definiteness
        s_vec, y_vec = th_new - theta[idx], g_new - g[idx]
        sy = np.einsum("sp,sp->s", s_vec, y_vec)
        keep = ok & (sy > 1e-12 * np.linalg.norm(s_vec, axis=1) * np.linalg.norm(y_vec, axis=1))
        upd = idx[keep]
        s_hist[upd] = np.concatenate([s_hist[upd, 1:], s_vec[keep, None]], axis=1)
        y_hist[upd] = np.concatenate([y_hist[upd, 1:], y_vec[keep, None]], axis=1)
        rho[upd] = np.concatenate([rho[upd, 1:], (1.0 / sy[keep])[:, None]], axis=1)
        decrease = f[idx] - f_new
        small = decrease <= ftol * np.maximum(np.maximum(np.abs(f[idx]), np.abs(f_new)), 1.0)
        flat = np.abs(g_new).max(axis=1) <= gtol
        theta[idx[ok]], f[idx[ok]], g[idx[ok]] = th_new[ok], f_new[ok], g_new[ok]
        active[idx[~ok | small | flat]] = False
    return theta, f


def _polish(model: "_LSEModel", theta: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B from one natural-coordinate theta (p,) with tight tolerances; returns (theta, objective).

    The batched search finds the basins; this final run is the reference optimiser, so the reported optimum
    is an L-BFGS-B optimum (Hoffmann et al. / Epoch use L-BFGS-B).
    """

    def fun(theta_opt: np.ndarray) -> tuple[float, np.ndarray]:
        values, grads = model.value_and_grad(theta_opt[None, :], weights)
        return float(values[0]), grads[0]

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        res = minimize(fun, model.to_opt(theta), jac=True, method="L-BFGS-B", options=_LBFGS_OPTIONS)
    polished = model.from_opt(np.asarray(res.x, dtype=float))
    value = float(model.objective(polished, weights))
    start_value = float(model.objective(theta, weights))
    if not np.isfinite(value) or value > start_value:  # never worse than the batched end point
        return theta, start_value
    return polished, value


def _multistart(model: _LSEModel, starts: np.ndarray, weights: np.ndarray, *, groups: int = 1,
                polish: int = 1, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Minimise from many starts; returns (end points (groups, S_g, p), objectives (groups, S_g)), best first.

    starts: (groups * S_g, p) natural coordinates, group-major: rows [i S_g, (i+1) S_g) start problem i.
    weights: (groups, n) point weights of each problem (a bootstrap resample = integer weights).
    polish: within each group, the best ``polish`` distinct end points are rerun with scipy L-BFGS-B.
    """
    # The products here are tiny ((S, K n) x (K n, p)): a multi-threaded BLAS only spins its threads, which
    # cost 4x the CPU time on 2 cores (and far more on a busy machine), so one thread does the work.
    with threadpool_limits(limits=1, user_api="blas"):
        return _multistart_1(model, starts, weights, groups, polish, chunk)


def _multistart_1(model: _LSEModel, starts: np.ndarray, weights: np.ndarray, groups: int, polish: int,
                  chunk: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    per_group = len(starts) // groups
    problem = np.repeat(np.arange(groups), per_group)

    def fun(thetas: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, grads = np.empty(len(thetas)), np.empty_like(thetas)
        for lo in range(0, len(thetas), chunk):  # chunks bound the (chunk, K, n) temporaries
            sl = slice(lo, lo + chunk)
            values[sl], grads[sl] = model.value_and_grad(thetas[sl], weights[problem[rows[sl]]])
        return values, grads

    ends_opt, _ = _batched_lbfgs(fun, model.to_opt(starts))
    ends = model.from_opt(ends_opt).reshape(groups, per_group, -1)
    values = np.empty((groups, per_group))
    for i in range(groups):
        values[i] = model.objective(ends[i], weights[i])
    values = np.where(np.isfinite(values), values, np.inf)
    for i in range(groups):
        order = np.argsort(values[i], kind="stable")
        ends[i], values[i] = ends[i][order], values[i][order]
        for j in _distinct_rows(ends[i], values[i], polish):
            ends[i, j], values[i, j] = _polish(model, ends[i, j], weights[i])
        order = np.argsort(values[i], kind="stable")
        ends[i], values[i] = ends[i][order], values[i][order]
    return ends, values


def _distinct_rows(ends: np.ndarray, values: np.ndarray, count: int, tol: float = 1e-3) -> list[int]:
    """Indices of up to ``count`` rows of ``ends`` (S, p), sorted best first, that differ by more than tol."""
    chosen: list[int] = []
    for j, (theta, value) in enumerate(zip(ends, values)):
        if len(chosen) == count or not np.isfinite(value):
            break
        if all(np.max(np.abs(theta - ends[c])) > tol for c in chosen):
            chosen.append(j)
    return chosen or [0]


def _bootstrap(model: _LSEModel, full_ends: np.ndarray, full_values: np.ndarray, grid: np.ndarray,
               n_boot: int, seed: int, boot_starts: int | str, groups: np.ndarray | None = None) -> np.ndarray:
    """Refit ``n_boot`` resamples (with replacement) of the points; returns their best thetas (n_boot, p).

    full_ends (S, p), full_values (S,): the full-data results, best first. boot_starts: an int k starts
    each resample from the k best distinct full-data end points (module docstring says why this is sound);
    "grid" starts every resample from the whole grid. groups: (n,) labels of the units resampled together
    (a trial's logged points share its seed noise and are not independent; resampling them one by one
    makes intervals too narrow); None = every point is its own unit.
    """
    rng = np.random.default_rng(seed)
    codes = np.arange(model.n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_units = int(codes.max()) + 1
    unit_counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(float)
    counts = unit_counts[:, codes]
    if boot_starts == "grid":
        starts = grid
    else:
        starts = full_ends[_distinct_rows(full_ends, full_values, int(boot_starts))]
    ends, _ = _multistart(model, np.tile(starts, (n_boot, 1)), counts, groups=n_boot)
    return ends[:, 0, :]


def _fit_full(model: _LSEModel, starts: np.ndarray, polish: int = 5,
              refine_top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Starts (S, p) on the unweighted data; returns end points (S', p) and objectives (S',), best first.

    refine_top: if set, evaluate the objective at every start first and optimise only the ``refine_top``
    best (a screening heuristic, used where no reference procedure prescribes every start).
    """
    weights = np.ones(model.n)
    if refine_top is not None and refine_top < len(starts):
        with np.errstate(over="ignore", invalid="ignore"):
            screen = model.objective(starts, weights)
        screen = np.where(np.isfinite(screen), screen, np.inf)
        starts = starts[np.argsort(screen, kind="stable")[:refine_top]]
    ends, values = _multistart(model, starts, weights, polish=polish)
    return ends[0], values[0]


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of samples (m,); +/-inf allowed (no interpolation across infinities)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    method = "linear" if np.all(np.isfinite(samples)) else "inverted_cdf"
    lo, hi = np.quantile(samples, [tail, 1.0 - tail], method=method)
    return (float(lo), float(hi))


def _intervals(samples: np.ndarray | None, names: Sequence[str], confidence: float) -> dict | None:
    """Per-parameter percentile intervals from samples (m, len(names)), or None without samples."""
    if samples is None:
        return None
    return {name: _percentile_interval(samples[:, i], confidence) for i, name in enumerate(names)}


def _maybe_scalar(x: np.ndarray) -> float | np.ndarray:
    """0-d arrays -> Python float, others unchanged."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


# ----------------------------------------------------------------------------------------------------------
# Chinchilla L(N, D)
# ----------------------------------------------------------------------------------------------------------

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")


def chinchilla_grid(
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
    betas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
    es: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0),
    as_: Sequence[float] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    bs: Sequence[float] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
) -> np.ndarray:
    """Grid of starts in the optimiser's order (a, b, e, alpha, beta); shape (S, 5).

    Defaults are Hoffmann et al.'s grid as given in refs.md: alpha, beta in {0, 0.5, .., 2}, e in {-1, .., 1},
    a, b in {0, 5, .., 25} -> 5 * 5 * 5 * 6 * 6 = 4,500 starts.
    """
    rows = itertools.product(as_, bs, es, alphas, betas)
    return np.array(list(rows), dtype=float)


def _chinchilla_design(N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Design tensor (3, n, 5) for theta = (a, b, e, alpha, beta): u = (a - alpha ln N, b - beta ln D, e)."""
    n = len(N)
    design = np.zeros((3, n, 5))
    design[0, :, 0] = 1.0
    design[0, :, 3] = -np.log(N)
    design[1, :, 1] = 1.0
    design[1, :, 4] = -np.log(D)
    design[2, :, 2] = 1.0
    return design


def _chinchilla_natural(theta: np.ndarray) -> np.ndarray:
    """(..., 5) optimiser params (a, b, e, alpha, beta) -> (..., 5) natural params (E, A, B, alpha, beta)."""
    theta = np.asarray(theta, dtype=float)
    a, b, e, alpha, beta = np.moveaxis(theta, -1, 0)
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=-1)


def _chinchilla_loss(params: np.ndarray, N: Any, D: Any) -> np.ndarray:
    """L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022 eq. 2); params (5,) natural order."""
    E, A, B, alpha, beta = params
    return E + A / np.power(N, alpha) + B / np.power(D, beta)


def _chinchilla_n_opt(params: np.ndarray, C: Any) -> np.ndarray:
    """Compute-optimal N for C = 6 N D (refs.md / Hoffmann et al. Approach 3):

    G = (alpha A / (beta B))^(1/(alpha+beta)),  N_opt = G (C/6)^(beta/(alpha+beta)).
    """
    E, A, B, alpha, beta = params
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return G * np.power(np.asarray(C, dtype=float) / 6.0, beta / (alpha + beta))


@dataclass
class ChinchillaFit:
    """Fitted ``L(N, D) = E + A/N^alpha + B/D^beta``.

    intervals: {param: (lo, hi)} percentile bootstrap intervals at ``confidence``, None without bootstrap.
    boot_params: (n_boot, 5) bootstrap samples in order (E, A, B, alpha, beta), None without bootstrap.
    n_range, d_range: (min, max) of the fitted N and D; kept: (n_input,) bool mask of the points used.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    intervals: dict[str, tuple[float, float]] | None = None
    boot_params: np.ndarray | None = field(default=None, repr=False)
    n_range: tuple[float, float] = (float("nan"), float("nan"))
    d_range: tuple[float, float] = (float("nan"), float("nan"))
    huber_delta: float = 1e-3
    confidence: float = 0.95
    kept: np.ndarray | None = field(default=None, repr=False)

    @property
    def params(self) -> np.ndarray:
        """(5,) array (E, A, B, alpha, beta)."""
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    def predict(self, N: Any, D: Any) -> float | np.ndarray:
        """Loss at N params and D tokens (broadcasting arrays)."""
        return _maybe_scalar(_chinchilla_loss(self.params, np.asarray(N, float), np.asarray(D, float)))

    def n_opt(self, C: Any) -> float | np.ndarray:
        """Compute-optimal parameter count for compute C = 6 N D (FLOPs)."""
        return _maybe_scalar(_chinchilla_n_opt(self.params, C))

    def d_opt(self, C: Any) -> float | np.ndarray:
        """Compute-optimal token count: D_opt = C / (6 N_opt)."""
        return _maybe_scalar(np.asarray(C, dtype=float) / (6.0 * _chinchilla_n_opt(self.params, C)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no bootstrap samples)."""
        return {
            "law": "chinchilla",
            **{name: float(getattr(self, name)) for name in CHINCHILLA_PARAMS},
            "objective": float(self.objective),
            "n_points": int(self.n_points),
            "n_boot": 0 if self.boot_params is None else int(len(self.boot_params)),
            "confidence": float(self.confidence),
            "intervals": None if self.intervals is None else {k: list(v) for k, v in self.intervals.items()},
            "n_range": list(self.n_range),
            "d_range": list(self.d_range),
            "huber_delta": float(self.huber_delta),
        }


def _robust_outliers(residuals: np.ndarray, threshold: float) -> np.ndarray:
    """Bool mask (n,) of residuals more than ``threshold`` robust standard deviations (1.4826 MAD) from the median."""
    centre = np.median(residuals)
    scale = 1.4826 * np.median(np.abs(residuals - centre))
    if scale == 0:
        return np.zeros(residuals.shape, dtype=bool)
    return np.abs(residuals - centre) > threshold * scale


def fit_chinchilla(
    N: Any,
    D: Any,
    L: Any,
    *,
    huber_delta: float = 1e-3,
    grid: np.ndarray | None = None,
    n_boot: int = 0,
    seed: int = 0,
    drop_outliers: bool = False,
    outlier_threshold: float = 5.0,
    boot_starts: int | str = 5,
    confidence: float = 0.95,
    refine_top: int | None = None,
    groups: Any = None,
) -> ChinchillaFit:
    """Fit ``L = E + A/N^alpha + B/D^beta`` by Hoffmann et al.'s Approach 3.

    N, D, L: (n,) parameter counts, tokens, final losses (positive, finite).
    grid: (S, 5) starts in (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e; default the 4,500-start grid.
    drop_outliers: fit, drop points whose log residual is more than ``outlier_threshold`` robust SDs
        (1.4826 MAD) from the median, refit on the rest from the full grid (``kept`` marks the points used).
        The default 5 is meant for gross failures (diverged runs): the near-L1 Huber fit interpolates some
        points, which makes the MAD of its residuals underestimate the noise, so 3 drops honest points.
    n_boot, seed: bootstrap resamples (0 = none); boot_starts: see module docstring.
    groups: (n,) unit labels for the bootstrap (e.g. trial ids: a trial's points are resampled together).
    refine_top: optimise only the ``refine_top`` grid starts with the lowest objective (None: all of them,
        as Hoffmann et al. do; 256 finds the same optimum on every law we tried at a fraction of the cost).
    """
    cols = _check_columns(N=N, D=D, L=L)
    N, D, L = cols["N"], cols["D"], cols["L"]
    _check_point_count(len(L), 5, "the Chinchilla law")
    _check_distinct("N (model size)", N, 2, "to separate A/N^alpha from the other terms; a single model size cannot")
    _check_distinct("D (tokens)", D, 2, "to separate B/D^beta from the other terms")
    starts = chinchilla_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
    if starts.shape[1] != 5:
        raise ValueError(f"grid must have 5 columns (a, b, e, alpha, beta), got shape {starts.shape}")

    unit = None if groups is None else np.asarray(groups)
    if unit is not None and unit.shape != L.shape:
        raise ValueError(f"groups must have one label per point ({len(L)}), got shape {unit.shape}")
    kept = np.ones(len(L), dtype=bool)
    model = _LSEModel(_chinchilla_design(N, D), np.log(L), huber_delta)
    ends, values = _fit_full(model, starts, refine_top=refine_top)
    if drop_outliers:
        residuals = model.log_predict(ends[0]) - model.target
        kept = ~_robust_outliers(residuals, outlier_threshold)
        _check_point_count(int(kept.sum()), 5, "the Chinchilla law after dropping outliers")
        N, D, L = N[kept], D[kept], L[kept]
        if unit is not None:
            unit = unit[kept]
        model = _LSEModel(_chinchilla_design(N, D), np.log(L), huber_delta)
        ends, values = _fit_full(model, starts, refine_top=refine_top)

    boot = None
    if n_boot > 0:
        boot = _chinchilla_natural(_bootstrap(model, ends, values, starts, n_boot, seed, boot_starts, unit))
    E, A, B, alpha, beta = _chinchilla_natural(ends[0])
    return ChinchillaFit(
        E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta),
        objective=float(values[0]),
        n_points=len(L),
        intervals=_intervals(boot, CHINCHILLA_PARAMS, confidence),
        boot_params=boot,
        n_range=(float(N.min()), float(N.max())),
        d_range=(float(D.min()), float(D.max())),
        huber_delta=huber_delta,
        confidence=confidence,
        kept=kept,
    )


# ----------------------------------------------------------------------------------------------------------
# Power law in compute: L = E + A C^-alpha (or A C^-alpha)
# ----------------------------------------------------------------------------------------------------------


def _power_law_loss(params: np.ndarray, C: Any) -> np.ndarray:
    """L = E + A C^-alpha; params (3,) = (E, A, alpha)."""
    E, A, alpha = params
    return E + A * np.power(np.asarray(C, dtype=float), -alpha)


def _power_law_inverse(params: np.ndarray, L: Any) -> np.ndarray:
    """Compute at which E + A C^-alpha = L: C = (A / (L - E))^(1/alpha); NaN where L <= E (never reached)."""
    E, A, alpha = params
    gap = np.asarray(L, dtype=float) - E
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.power(A / gap, 1.0 / alpha)
    return np.where(gap > 0, out, np.nan)


@dataclass
class PowerLawFit:
    """Fitted ``L = E + A * C^-alpha`` (E = 0 when fitted without offset).

    boot_params: (n_boot, 3) samples of (E, A, alpha); c_range: (min, max) fitted compute.
    """

    E: float
    A: float
    alpha: float
    objective: float
    n_points: int
    with_offset: bool = True
    intervals: dict[str, tuple[float, float]] | None = None
    boot_params: np.ndarray | None = field(default=None, repr=False)
    c_range: tuple[float, float] = (float("nan"), float("nan"))
    huber_delta: float = 1e-3
    confidence: float = 0.95

    @property
    def params(self) -> np.ndarray:
        """(3,) array (E, A, alpha)."""
        return np.array([self.E, self.A, self.alpha])

    def predict(self, C: Any) -> float | np.ndarray:
        """Loss at compute C."""
        return _maybe_scalar(_power_law_loss(self.params, C))

    def inverse(self, L: Any) -> float | np.ndarray:
        """Compute needed to reach loss L; NaN where L <= E (the law never gets there)."""
        return _maybe_scalar(_power_law_inverse(self.params, L))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no bootstrap samples)."""
        return {
            "law": "power_law",
            "E": float(self.E), "A": float(self.A), "alpha": float(self.alpha),
            "with_offset": bool(self.with_offset),
            "objective": float(self.objective),
            "n_points": int(self.n_points),
            "n_boot": 0 if self.boot_params is None else int(len(self.boot_params)),
            "confidence": float(self.confidence),
            "intervals": None if self.intervals is None else {k: list(v) for k, v in self.intervals.items()},
            "c_range": list(self.c_range),
            "huber_delta": float(self.huber_delta),
        }


def _power_law_design(C: np.ndarray, with_offset: bool) -> np.ndarray:
    """Design (K, n, p): theta = (a, alpha, e) with u = (a - alpha ln C, e), or (a, alpha) without offset."""
    n = len(C)
    p = 3 if with_offset else 2
    design = np.zeros((2 if with_offset else 1, n, p))
    design[0, :, 0] = 1.0
    design[0, :, 1] = -np.log(C)
    if with_offset:
        design[1, :, 2] = 1.0
    return design


def _power_law_starts(C: np.ndarray, L: np.ndarray, with_offset: bool) -> np.ndarray:
    """Data-scaled starts (S, p): each curve passes through the median point (C_med, L_med).

    With offset E = f * min(L) for f in {0.1, 0.5, 0.8, 0.95}, A = (L_med - E) C_med^alpha; without offset the
    ordinary least-squares line in log-log space is added to the alpha grid.
    """
    log_c_med, l_med = np.median(np.log(C)), np.median(L)
    alphas = (0.01, 0.03, 0.1, 0.3, 1.0)
    if not with_offset:
        slope, intercept = np.polyfit(np.log(C), np.log(L), 1)
        rows = [(np.log(l_med) + al * log_c_med, al) for al in alphas]
        return np.array(rows + [(intercept, -slope)])
    rows = []
    for al, frac in itertools.product(alphas, (0.1, 0.5, 0.8, 0.95)):
        E = frac * L.min()
        rows.append((np.log(l_med - E) + al * log_c_med, al, np.log(E)))
    return np.array(rows)


def _power_law_natural(theta: np.ndarray, with_offset: bool) -> np.ndarray:
    """(..., p) optimiser params -> (..., 3) natural (E, A, alpha)."""
    theta = np.asarray(theta, dtype=float)
    E = np.exp(theta[..., 2]) if with_offset else np.zeros(theta.shape[:-1])
    return np.stack([E, np.exp(theta[..., 0]), theta[..., 1]], axis=-1)


def fit_power_law(
    C: Any,
    L: Any,
    *,
    with_offset: bool = True,
    huber_delta: float = 1e-3,
    n_boot: int = 0,
    seed: int = 0,
    boot_starts: int | str = 3,
    confidence: float = 0.95,
) -> PowerLawFit:
    """Fit ``L = E + A C^-alpha`` (or ``L = A C^-alpha``) to compute C (n,) and loss L (n,).

    Same robust procedure as the Chinchilla fit: Huber(delta) on log L, L-BFGS-B from data-scaled starts
    (see _power_law_starts), percentile bootstrap intervals with ``n_boot`` resamples.
    """
    cols = _check_columns(C=C, L=L)
    C, L = cols["C"], cols["L"]
    p = 3 if with_offset else 2
    law = "the power law with offset" if with_offset else "the power law without offset"
    _check_point_count(len(L), p, law)
    _check_distinct("C (compute)", C, p, f"to fit {law}")
    model = _LSEModel(_power_law_design(C, with_offset), np.log(L), huber_delta)
    starts = _power_law_starts(C, L, with_offset)
    ends, values = _fit_full(model, starts)
    boot = None
    if n_boot > 0:
        boot = _power_law_natural(_bootstrap(model, ends, values, starts, n_boot, seed, boot_starts), with_offset)
    E, A, alpha = _power_law_natural(ends[0], with_offset)
    names = ("E", "A", "alpha") if with_offset else ("A", "alpha")
    intervals = None
    if boot is not None:
        columns = boot if with_offset else boot[:, 1:]
        intervals = _intervals(columns, names, confidence)
    return PowerLawFit(
        E=float(E), A=float(A), alpha=float(alpha),
        objective=float(values[0]),
        n_points=len(L),
        with_offset=with_offset,
        intervals=intervals,
        boot_params=boot,
        c_range=(float(C.min()), float(C.max())),
        huber_delta=huber_delta,
        confidence=confidence,
    )


# ----------------------------------------------------------------------------------------------------------
# Leverage
# ----------------------------------------------------------------------------------------------------------


def _dense_equivalent_n(params: np.ndarray, loss: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Solve E + A/N^alpha + B/D^beta = loss for N (closed form):

    N = (A / (loss - E - B/D^beta))^(1/alpha); +inf where loss is at or below the law's floor at D tokens.
    params (5,) natural order; loss, tokens broadcast together.
    """
    E, A, B, alpha, beta = params
    gap = loss - E - B / np.power(tokens, beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eq = np.power(A / gap, 1.0 / alpha)
    return np.where(gap > 0, n_eq, np.inf)


def _outside(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Bool mask: values outside [lo, hi] or not finite."""
    lo, hi = bounds
    values = np.asarray(values, dtype=float)
    return ~np.isfinite(values) | (values < lo) | (values > hi)


def _sample_intervals(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals along axis 0 of samples (m, ...) -> (lo, hi), each of shape samples.shape[1:]."""
    flat = samples.reshape(samples.shape[0], -1)
    bounds = np.array([_percentile_interval(flat[:, j], confidence) for j in range(flat.shape[1])])
    shape = samples.shape[1:]
    return bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape)


def parameter_leverage(
    dense_fit: ChinchillaFit,
    moe_loss: Any,
    moe_tokens: Any,
    moe_active_params: Any,
    *,
    n_range: tuple[float, float] | None = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    """Parameter leverage of MoE run(s) over the dense law: N_dense_equivalent / N_active.

    N_dense_equivalent is the dense size whose fitted L(N, D) at the MoE's tokens equals the MoE's loss.
    moe_loss, moe_tokens, moe_active_params: scalars or broadcastable arrays.
    n_range: (Nmin, Nmax) trusted for the dense law; default the fit's own N range. Outputs:
      n_equivalent, leverage (inf when the loss is below the dense law's floor at those tokens: ``reachable``
      False), extrapolated (equivalent N outside n_range), and with bootstrap samples on the fit
      n_equivalent_interval / leverage_interval (percentile, ``confidence`` default the fit's).
    """
    loss = np.asarray(moe_loss, dtype=float)
    tokens = np.asarray(moe_tokens, dtype=float)
    active = np.asarray(moe_active_params, dtype=float)
    for name, arr in (("moe_loss", loss), ("moe_tokens", tokens), ("moe_active_params", active)):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and positive")
    bounds = dense_fit.n_range if n_range is None else n_range
    n_eq = _dense_equivalent_n(dense_fit.params, loss, tokens)
    out: dict[str, Any] = {
        "n_equivalent": _maybe_scalar(n_eq),
        "leverage": _maybe_scalar(n_eq / active),
        "reachable": _maybe_bool(np.isfinite(n_eq)),
        "extrapolated": _maybe_bool(_outside(n_eq, bounds)),
        "n_range": tuple(float(b) for b in bounds),
        "n_equivalent_interval": None,
        "leverage_interval": None,
    }
    if dense_fit.boot_params is not None:
        conf = dense_fit.confidence if confidence is None else confidence
        samples = np.stack([_dense_equivalent_n(p, loss, tokens) for p in dense_fit.boot_params])
        out["n_equivalent_interval"] = _interval_pair(*_sample_intervals(samples, conf))
        out["leverage_interval"] = _interval_pair(*_sample_intervals(samples / active, conf))
    return out


def _maybe_bool(mask: np.ndarray) -> bool | np.ndarray:
    """0-d bool arrays -> Python bool."""
    mask = np.asarray(mask, dtype=bool)
    return bool(mask) if mask.ndim == 0 else mask


def _interval_pair(lo: np.ndarray, hi: np.ndarray) -> tuple:
    """(lo, hi) as floats for scalars, arrays otherwise."""
    return (_maybe_scalar(lo), _maybe_scalar(hi))


def _compute_leverage_at(
    dense: np.ndarray, moe: np.ndarray, loss: np.ndarray | None, compute: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss, C_dense, C_moe) at equal loss for natural params dense (3,), moe (3,)."""
    if compute is not None:
        loss = _power_law_loss(moe, compute)
        c_moe = np.asarray(compute, dtype=float)
    else:
        c_moe = _power_law_inverse(moe, loss)
    return loss, _power_law_inverse(dense, loss), c_moe


def compute_leverage(
    dense_fit: PowerLawFit,
    moe_fit: PowerLawFit,
    *,
    loss: Any = None,
    compute: Any = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    """Efficiency leverage EL = C_dense / C_moe at equal loss (Tian et al. 2025, "Towards Greater Leverage").

    Give exactly one of ``loss`` (target loss) or ``compute`` (MoE compute; its loss is the MoE curve there).
    Outputs: loss, c_dense, c_moe, leverage (NaN when a curve never reaches the loss), extrapolated (either
    compute outside its fit's range, or unreachable), and leverage_interval from paired bootstrap samples
    (sample i of each fit; the fits are independent, so any pairing is a valid joint draw).
    """
    if (loss is None) == (compute is None):
        raise ValueError("give exactly one of loss= or compute=")
    given = np.asarray(loss if compute is None else compute, dtype=float)
    if not np.all(np.isfinite(given)) or np.any(given <= 0):
        raise ValueError(f"{'loss' if compute is None else 'compute'} must be finite and positive")
    loss_arr = None if loss is None else given
    comp_arr = None if compute is None else given
    at_loss, c_dense, c_moe = _compute_leverage_at(dense_fit.params, moe_fit.params, loss_arr, comp_arr)
    with np.errstate(invalid="ignore", divide="ignore"):
        lev = c_dense / c_moe
    extrapolated = _outside(c_dense, dense_fit.c_range) | _outside(c_moe, moe_fit.c_range)
    out: dict[str, Any] = {
        "loss": _maybe_scalar(at_loss),
        "c_dense": _maybe_scalar(c_dense),
        "c_moe": _maybe_scalar(c_moe),
        "leverage": _maybe_scalar(lev),
        "extrapolated": _maybe_bool(extrapolated),
        "leverage_interval": None,
    }
    if dense_fit.boot_params is not None and moe_fit.boot_params is not None:
        m = min(len(dense_fit.boot_params), len(moe_fit.boot_params))
        samples = []
        for d_par, m_par in zip(dense_fit.boot_params[:m], moe_fit.boot_params[:m]):
            _, cd, cm = _compute_leverage_at(d_par, m_par, loss_arr, comp_arr)
            with np.errstate(invalid="ignore", divide="ignore"):
                samples.append(cd / cm)
        conf = dense_fit.confidence if confidence is None else confidence
        out["leverage_interval"] = _interval_pair(*_sample_intervals(np.array(samples), conf))
    return out


# ----------------------------------------------------------------------------------------------------------
# Granularity law (Krajewski et al. 2024, eq. 9)
# ----------------------------------------------------------------------------------------------------------

GRANULARITY_PARAMS = ("g", "gamma", "a", "alpha", "b", "beta", "c")


def granularity_grid() -> np.ndarray:
    """Starts (S, 7) in optimiser order (ln g, gamma, ln a, alpha, ln b, beta, ln c); 3*4*4*3*3*3*3 = 3,888.

    Chosen to bracket Krajewski et al.'s fitted values (refs.md) on raw parameter/token counts.
    """
    axes = (
        (0.0, 2.5, 5.0),          # ln g
        (0.25, 0.5, 1.0, 1.5),    # gamma
        (0.0, 2.5, 5.0, 10.0),    # ln a
        (0.1, 0.3, 0.6),          # alpha
        (0.0, 5.0, 10.0),         # ln b
        (0.1, 0.3, 0.6),          # beta
        (-1.0, 0.0, 1.0),         # ln c
    )
    return np.array(list(itertools.product(*axes)), dtype=float)


def _granularity_design(N: np.ndarray, D: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Design (4, n, 7) for L = g G^-gamma N^-alpha + a N^-alpha + b D^-beta + c (eq. 9 expanded)."""
    n = len(N)
    design = np.zeros((4, n, 7))
    design[0, :, 0] = 1.0
    design[0, :, 1] = -np.log(G)
    design[0, :, 3] = -np.log(N)
    design[1, :, 2] = 1.0
    design[1, :, 3] = -np.log(N)
    design[2, :, 4] = 1.0
    design[2, :, 5] = -np.log(D)
    design[3, :, 6] = 1.0
    return design


@dataclass
class GranularityFit:
    """Fitted ``L(N, D, G) = c + (g/G^gamma + a)/N^alpha + b/D^beta`` (Krajewski et al. 2024, eq. 9)."""

    g: float
    gamma: float
    a: float
    alpha: float
    b: float
    beta: float
    c: float
    objective: float
    n_points: int

    def predict(self, N: Any, D: Any, G: Any) -> float | np.ndarray:
        """Loss at N total non-embedding params, D tokens and granularity G = d_ff / d_expert."""
        N, D, G = (np.asarray(v, dtype=float) for v in (N, D, G))
        return _maybe_scalar(
            self.c + (self.g / G**self.gamma + self.a) / N**self.alpha + self.b / D**self.beta
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"law": "granularity", **{k: float(getattr(self, k)) for k in GRANULARITY_PARAMS},
                "objective": float(self.objective), "n_points": int(self.n_points)}


def fit_granularity(
    N: Any,
    D: Any,
    G: Any,
    L: Any,
    *,
    huber_delta: float = 1e-3,
    grid: np.ndarray | None = None,
    refine_top: int | None = 256,
) -> GranularityFit:
    """Fit Krajewski et al.'s eq. 9 to N (n,) total non-embedding params, D (n,) tokens, G (n,), L (n,).

    Needs at least 8 points (7 parameters + 1), 3 distinct G (g, gamma and a are only separable with three
    granularities), 2 distinct N and 2 distinct D. Starts: ``grid`` (S, 7) in optimiser order, default
    granularity_grid(); the objective is evaluated at every start and L-BFGS runs from the ``refine_top``
    best (None = all). The 7-parameter law has long flat valleys, so optimising all 3,888 starts costs
    ~20 s for little gain; Krajewski et al. prescribe no grid.
    """
    cols = _check_columns(N=N, D=D, G=G, L=L)
    N, D, G, L = cols["N"], cols["D"], cols["G"], cols["L"]
    _check_point_count(len(L), 7, "the granularity law (Krajewski et al. eq. 9)")
    _check_distinct("G (granularity)", G, 3, "to separate g, gamma and a in (g/G^gamma + a)/N^alpha")
    _check_distinct("N (model size)", N, 2, "to fit the N^-alpha term")
    _check_distinct("D (tokens)", D, 2, "to fit the D^-beta term")
    starts = granularity_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
    model = _LSEModel(_granularity_design(N, D, G), np.log(L), huber_delta)
    ends, values = _fit_full(model, starts, refine_top=refine_top)
    ln_g, gamma, ln_a, alpha, ln_b, beta, ln_c = ends[0]
    return GranularityFit(
        g=float(np.exp(ln_g)), gamma=float(gamma), a=float(np.exp(ln_a)), alpha=float(alpha),
        b=float(np.exp(ln_b)), beta=float(beta), c=float(np.exp(ln_c)),
        objective=float(values[0]), n_points=len(L),
    )


# ----------------------------------------------------------------------------------------------------------
# Compute-optimal frontier of a Chinchilla law, and efficiency leverage from two such laws
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token as a power law of the active non-embedding size: ``exp(log_coef) N^slope``.

    6N (Kaplan et al. 2020) is slope 1, log_coef ln 6; measured FLOPs also count attention and the output
    layer, which weigh more in small models, so the law is fitted to a family's own trials (``fit``).
    """

    log_coef: float = float(np.log(6.0))
    slope: float = 1.0

    def __call__(self, N: Any) -> np.ndarray:
        return np.exp(self.log_coef) * np.power(np.asarray(N, dtype=float), self.slope)

    @classmethod
    def fit(cls, N: Any, D: Any, C: Any) -> "FlopsPerToken":
        """Least squares of ln(C/D) on ln N over trials (n,); one distinct N gives slope 1 through its mean."""
        cols = _check_columns(N=N, D=D, C=C)
        x, y = np.log(cols["N"]), np.log(cols["C"] / cols["D"])
        if np.ptp(x) < 1e-9:
            return cls(log_coef=float(np.mean(y - x)), slope=1.0)
        slope, coef = np.polyfit(x, y, 1)
        return cls(log_coef=float(coef), slope=float(slope))


def frontier_params(params: Any, fpt: FlopsPerToken) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute-optimal frontier ``L*(C) = E + K C^-a`` of the Chinchilla law ``params`` (..., 5) when a
    token costs fpt(N) = c N^s FLOPs. Returns (E, K, a), each of shape params.shape[:-1].

    Minimising A N^-alpha + B (C / (c N^s))^-beta over N (Hoffmann et al. 2022, Approach 3, with 6N replaced
    by c N^s): N_opt = (alpha A / (s beta B c^beta))^(1/(alpha + s beta)) C^(beta/(alpha + s beta)), where
    the data term is alpha/(s beta) times the size term, so
    K = A (1 + alpha/(s beta)) (alpha A / (s beta B c^beta))^(-alpha/(alpha + s beta)),
    a = alpha beta / (alpha + s beta). With c = 6, s = 1 this is the usual frontier exponent.
    """
    P = np.asarray(params, dtype=float)
    E, A, B, al, be = (P[..., i] for i in range(5))
    c, sl = np.exp(fpt.log_coef), fpt.slope
    if not sl > 0:
        raise ValueError(f"FLOPs per token must grow with N (slope > 0), got slope {sl}")
    ratio = al * A / (sl * be * B * np.power(c, be))
    K = A * (1.0 + al / (sl * be)) * np.power(ratio, -al / (al + sl * be))
    return E, K, al * be / (al + sl * be)


def frontier_compute(params: Any, loss: Any, fpt: FlopsPerToken) -> np.ndarray:
    """Least compute at which the law ``params`` ((5,) or (S, 5)) reaches ``loss`` ((m,), or (S, m) paired
    with the rows of params): ``(K / (L - E))^(1/a)`` on its frontier; +inf at or below the floor E.
    Returns (m,) for one law, (S, m) for S."""
    E, K, a = (np.asarray(v)[..., None] for v in frontier_params(params, fpt))
    gap = np.asarray(loss, dtype=float) - E
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c = np.power(K / gap, 1.0 / a)
    return np.where(gap > 0, c, np.inf)


def frontier_loss(params: Any, compute: Any, fpt: FlopsPerToken) -> np.ndarray:
    """Lowest loss the law ``params`` ((5,) or (S, 5)) reaches with ``compute`` (m,): E + K C^-a."""
    E, K, a = (np.asarray(v)[..., None] for v in frontier_params(params, fpt))
    return E + K * np.power(np.asarray(compute, dtype=float), -a)


def efficiency_leverage_at(dense: Any, dense_fpt: FlopsPerToken, moe: Any, moe_fpt: FlopsPerToken,
                           compute: Any) -> np.ndarray:
    """Efficiency leverage of an MoE family at its compute C (Tian et al. 2025): C_dense(L_moe(C)) / C, where
    L_moe(C) is the family's compute-optimal loss and C_dense(L) the dense law's least compute for L.

    dense, moe: (5,) or paired (S, 5) Chinchilla parameters; compute (m,). Returns (m,) or (S, m); +inf where
    the dense law never reaches the MoE's loss."""
    loss = frontier_loss(moe, compute, moe_fpt)
    return frontier_compute(dense, loss, dense_fpt) / np.asarray(compute, dtype=float)
from moelab.ablations.el_law import efficiency_leverage  # noqa: E402,F401  (Tian et al. 2025 Eq. 13; own module)
