"""Leverage of MoE runs over the dense law, with intervals that carry both sources of error.

Three figures, each at a stated point (refs.md "Efficiency leverage"):

* per trial: parameter leverage ``N_dense(L, D) / N_active`` (the dense size that reaches the trial's loss
  at its tokens) and compute leverage ``C_dense(L) / C`` (the least dense compute that reaches the loss,
  on the dense law's compute-optimal frontier, over the trial's compute);
* per size (a family at one N and D): the geometric mean of its trials' leverages over seeds;
* per family (a design at several sizes): the efficiency leverage ``C_dense(L_moe(C)) / C`` of Tian et al.
  2025 from the family's own Chinchilla law against the dense one, at stated compute budgets. Never at an
  average of L, N, D, C over sizes: loss is convex in log N and log C, so that average is a point no model
  sits on (it gave 0.47 for a true 3 on a 4-size world).

Intervals. The dense law's error comes from its bootstrap (whole trials resampled). A trial's own loss also
carries seed noise that one trial cannot show; its size is the spread of log-loss among trials that differ
only in seed (``seed_noise``, pooled over cells). Each bootstrap draw b pairs dense parameters b with
``L exp(s t_nu)`` (t-distributed with the pooled degrees of freedom), so an interval covers the design's
leverage, not just this run's. A per-size figure averages log-leverage over its seeds inside each draw, so
its seed term shrinks as 1/sqrt(seeds) while the dense term does not. A loss the dense law never reaches
gives +inf (never NaN, never dropped): an interval's upper end may be +inf, which the report says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moelab.ablations.fits import (ChinchillaFit, FlopsPerToken, efficiency_leverage_at, frontier_compute,
                                   frontier_loss)

__all__ = ["SeedNoise", "seed_noise", "trial_leverage", "cell_leverage", "family_leverage", "interval"]


@dataclass(frozen=True)
class SeedNoise:
    """Seed-to-seed spread of log loss: sd (relative), dof (pooled degrees of freedom), where it came from."""

    sd: float
    dof: int
    source: str

    def draws(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Multiplicative loss noise exp(sd t_dof), shape ``shape``; ones without an estimate."""
        if not (self.sd > 0) or self.dof < 1:
            return np.ones(shape)
        return np.exp(self.sd * rng.standard_t(self.dof, size=shape))


NO_NOISE = SeedNoise(0.0, 0, "no seed replicates: intervals leave out the runs' own seed noise")


def seed_noise(frame: pd.DataFrame, cells: Sequence[str], loss: str = "L", source: str = "") -> SeedNoise:
    """Pooled within-cell variance of log loss over cells (trials equal but for their seed) with >= 2 trials.

    frame: one row per trial with the ``cells`` columns and a positive ``loss``. NO_NOISE when no cell has two.
    """
    if frame.empty:
        return NO_NOISE
    logs = np.log(frame[loss].to_numpy(float))
    key = frame[list(cells)].map(str).agg("|".join, axis=1) if cells else pd.Series("", index=frame.index)
    ss, dof = 0.0, 0
    for _, idx in pd.Series(range(len(frame)), index=key.to_numpy()).groupby(level=0):
        x = logs[idx.to_numpy()]
        x = x[np.isfinite(x)]
        if len(x) > 1:
            ss += float(np.sum((x - x.mean()) ** 2))
            dof += len(x) - 1
    if dof == 0:
        return NO_NOISE
    return SeedNoise(float(np.sqrt(ss / dof)), dof, source or f"pooled over {dof} seed degrees of freedom")


def interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 of samples (m, ...); NaN samples count as +inf (never reached), and
    +inf stays +inf (``inverted_cdf`` never interpolates across it)."""
    s = np.where(np.isnan(samples), np.inf, samples)
    tail = (1.0 - confidence) / 2.0
    return (np.quantile(s, tail, axis=0, method="inverted_cdf"),
            np.quantile(s, 1.0 - tail, axis=0, method="inverted_cdf"))


def _n_equivalent(params: np.ndarray, loss: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Dense N reaching ``loss`` at ``tokens`` under (S, 5) params; loss (S, m) or (m,). +inf below the floor."""
    P = np.atleast_2d(params)
    E, A, B, al, be = (P[:, i, None] for i in range(5))
    gap = loss - E - B / np.power(tokens, be)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.power(A / gap, 1.0 / al)
    return np.where(gap > 0, n, np.inf)


def trial_leverage(dense: ChinchillaFit, dense_fpt: FlopsPerToken, L: Any, D: Any, N: Any,
                   C: Any, noise: SeedNoise | Sequence[SeedNoise], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-trial leverages with their bootstrap draws. L, D, N, C: (m,) loss, tokens, active size, compute.

    noise: one SeedNoise, or one per trial (its family's). Returns arrays (m,): parameter, n_equivalent,
    compute, c_dense, and draws (S, m): parameter_draws, compute_draws (empty (0, m) without a bootstrap).
    """
    L, D, N, C = (np.asarray(v, dtype=float) for v in (L, D, N, C))
    m = len(L)
    n_eq = _n_equivalent(dense.params, L, D)[0]
    c_dense = frontier_compute(dense.params, L, dense_fpt)
    out = {"n_equivalent": n_eq, "parameter": n_eq / N, "c_dense": c_dense, "compute": c_dense / C,
           "parameter_draws": np.empty((0, m)), "compute_draws": np.empty((0, m))}
    if dense.boot_params is None or not len(dense.boot_params):
        return out
    boot = dense.boot_params
    rng = np.random.default_rng(seed)
    per = [noise] * m if isinstance(noise, SeedNoise) else list(noise)
    jitter = np.stack([per[j].draws(rng, (len(boot),)) for j in range(m)], axis=1) if m else np.ones((len(boot), 0))
    Lb = L[None, :] * jitter
    out["parameter_draws"] = _n_equivalent(boot, Lb, D[None, :]) / N[None, :]
    out["compute_draws"] = frontier_compute(boot, Lb, dense_fpt) / C[None, :]
    return out


def cell_leverage(values: np.ndarray, draws: np.ndarray, confidence: float) -> dict[str, Any]:
    """Geometric mean of one cell's per-trial leverages (k,) over seeds; its interval from the per-draw
    geometric means of draws (S, k). +inf anywhere makes the mean +inf (the loss is below the dense floor)."""
    with np.errstate(divide="ignore"):
        point = float(np.exp(np.mean(np.log(values))))
    lo = hi = float("nan")
    if draws.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.exp(np.mean(np.log(np.where(np.isnan(draws), np.inf, draws)), axis=1))
        lo, hi = (float(v) for v in interval(g, confidence))
    return {"leverage": point, "lo": lo, "hi": hi, "n_inf": int(np.sum(np.isinf(values)))}


def family_leverage(dense: ChinchillaFit, dense_fpt: FlopsPerToken, moe: ChinchillaFit, moe_fpt: FlopsPerToken,
                    budgets: Any, confidence: float) -> dict[str, np.ndarray]:
    """Efficiency leverage of a family at compute budgets (k,), with paired bootstrap draws of both laws
    (independent fits: draw b of each is a valid joint draw). Returns leverage, lo, hi, loss (the family's
    compute-optimal loss there), c_dense (k,)."""
    budgets = np.asarray(budgets, dtype=float)
    loss = frontier_loss(moe.params, budgets, moe_fpt)
    c_dense = frontier_compute(dense.params, loss, dense_fpt)
    k = len(budgets)
    out = {"leverage": c_dense / budgets, "loss": loss, "c_dense": c_dense, "lo": np.full(k, np.nan),
           "hi": np.full(k, np.nan)}
    if dense.boot_params is not None and moe.boot_params is not None:
        m = min(len(dense.boot_params), len(moe.boot_params))
        draws = efficiency_leverage_at(dense.boot_params[:m], dense_fpt, moe.boot_params[:m], moe_fpt, budgets)
        out["lo"], out["hi"] = interval(draws, confidence)
    return out
