"""A truth harness: results stores written from a declared world whose every answer is known.

Every number `moelab fit` prints (a leverage, its interval, an axis effect) is checked against a world where
the right answer can be computed exactly: a store is written through the real `Store` from the world, the
analysis runs on it as on any sweep, and its figures are compared with the world's.

The world (``World``, defaults sized like a small real study):

* dense trials follow a Chinchilla law ``L(N, D) = E + A/N^alpha + B/D^beta`` at ``dense_sizes`` (1.5 decades)
  x ``dense_tokens_per_param`` budgets;
* MoE designs are the grid of two axes: ``model.moe.n_experts`` plants a leverage k (the MoE of active size N
  is exactly the dense model of size k N, as refs.md's leverage examples assume) and ``upcycle.noise_std``
  adds a loss penalty delta. A design is a family; each family runs at ``moe_sizes`` x
  ``moe_tokens_per_param``. Its law is again of Chinchilla form (``E + delta, A k^-alpha, B, alpha, beta``),
  so its efficiency leverage at any compute follows exactly (`fits.efficiency_leverage_at`); with delta = 0
  it is k at every compute;
* compute is 6 N D (the frontier code serves measured FLOPs per token too; here the truth must be exact);
* noise of realistic size: a seed offset of ``seed_sd`` (relative, ~0.5% of the loss) per trial, of which a
  fraction ``seed_shared`` of the variance is shared by every trial of the same seed (same data order), and
  ``step_sd`` per logged evaluation. The final loss carries both.

``Truth`` holds the exact answers: per-trial leverages (of the noise-free loss), each family's efficiency
leverage as a function of compute, and each axis contrast (the mean over matching blocks of the noise-free
loss difference).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import pandas as pd

from moelab.ablations.fits import FlopsPerToken, efficiency_leverage_at, frontier_compute
from moelab.platform.store import Store

__all__ = ["World", "Truth", "world_trials", "write_truth_store", "SMALL_WORLD"]

EXPERTS_AXIS, NOISE_AXIS = "model.moe.n_experts", "upcycle.noise_std"
SIZE_AXIS, BUDGET_AXIS = "model.d_model", "train.steps"  # scale axes: they do not split families
EMBEDDING = 100_000  # parameters in the embedding (left out of N, as the analysis does)


@dataclasses.dataclass(frozen=True)
class World:
    """A declared world (module docstring). Sizes are active non-embedding parameters."""

    E: float = 1.9
    A: float = 400.0
    B: float = 2000.0
    alpha: float = 0.34
    beta: float = 0.37
    dense_sizes: tuple[float, ...] = (1e6, 2.4e6, 5.5e6, 1.3e7, 3e7)
    dense_tokens_per_param: tuple[float, ...] = (8.0, 20.0, 50.0)
    moe_sizes: tuple[float, ...] = (1e6, 3e6, 1e7, 3e7)
    moe_tokens_per_param: tuple[float, ...] = (10.0, 40.0)
    leverage: tuple[tuple[int, float], ...] = ((8, 2.0), (32, 3.0))  # n_experts -> planted k
    penalty: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.01, 0.01))  # noise_std -> loss penalty
    seeds: int = 3
    seed_sd: float = 0.005
    seed_shared: float = 0.3
    step_sd: float = 0.002
    logged: int = 6

    @property
    def dense_params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    def family_params(self, n_experts: int, noise: float) -> np.ndarray:
        """The Chinchilla law of a family in its active size: (E + delta, A k^-alpha, B, alpha, beta)."""
        k, delta = dict(self.leverage)[n_experts], dict(self.penalty)[noise]
        return np.array([self.E + delta, self.A * k ** -self.alpha, self.B, self.alpha, self.beta])

    def families(self) -> list[tuple[int, float]]:
        return [(e, z) for e, _ in self.leverage for z, _ in self.penalty]


SMALL_WORLD = World(dense_sizes=(1e6, 3e6, 1e7, 3e7), dense_tokens_per_param=(8.0, 40.0),
                    moe_sizes=(1e6, 3e6, 1e7, 3e7), moe_tokens_per_param=(10.0, 40.0),
                    leverage=((8, 2.0), (32, 3.0)), penalty=((0.0, 0.0),), logged=3)


def family_label(n_experts: int, noise: float) -> str:
    """The family label `moelab fit` gives these axes (``moe[axis=value, ...]``, short axis names)."""
    return f"moe[n_experts={n_experts}, noise_std={noise:.6g}]"


@dataclasses.dataclass
class Truth:
    """The exact answers of one world. trials: one row per trial (trial_id, family, group, seed, N, D, C,
    L_clean, L, parameter_leverage, compute_leverage); effects: (axis, value, baseline) -> true difference."""

    world: World
    trials: pd.DataFrame
    effects: dict[tuple[str, Any, Any], float]

    def family_leverage(self, group: str, compute: Any) -> np.ndarray:
        """True efficiency leverage of a family (by its label) at compute (k,)."""
        for e, z in self.world.families():
            if family_label(e, z) == group:
                fpt = FlopsPerToken()
                return efficiency_leverage_at(self.world.dense_params, fpt, self.world.family_params(e, z), fpt,
                                              np.atleast_1d(np.asarray(compute, float)))
        raise KeyError(f"no family {group!r} in this world")


def _loss(params: np.ndarray, N: np.ndarray, D: np.ndarray) -> np.ndarray:
    E, A, B, al, be = params
    return E + A / np.power(N, al) + B / np.power(D, be)


def world_trials(world: World = World(), seed: int = 0, sweep: str = "truth"
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]], Truth]:
    """Draw one replicate: (trial rows as the platform writes them, logged curves per trial id, Truth)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0.0, world.seed_sd * np.sqrt(world.seed_shared), world.seeds)
    own_sd = world.seed_sd * np.sqrt(1.0 - world.seed_shared)
    rows, curves, truth_rows = [], {}, []
    specs = [("dense", None, None, n, t) for n in world.dense_sizes for t in world.dense_tokens_per_param]
    specs += [("moe", e, z, n, t) for e, z in world.families() for n in world.moe_sizes
              for t in world.moe_tokens_per_param]
    size_code = {n: i for i, n in enumerate(sorted(set(world.dense_sizes) | set(world.moe_sizes)))}
    for i, (family, experts, noise, N, tpp) in enumerate(specs):
        params = world.dense_params if family == "dense" else world.family_params(experts, noise)
        D = float(round(N * tpp))
        for s in range(world.seeds):
            tid = f"{family}{i:03d}-s{s}"
            offset = shared[s] + rng.normal(0.0, own_sd)
            tokens = D * np.geomspace(1.0 / 2 ** (world.logged - 1), 1.0, world.logged)
            clean = _loss(params, N, tokens)
            noisy = clean * np.exp(offset + rng.normal(0.0, world.step_sd, world.logged))
            curves[tid] = {"step": np.arange(1, world.logged + 1, dtype=np.int64) * 10,
                           "tokens": tokens.round().astype(np.int64), "flops": 6.0 * N * tokens,
                           "loss": noisy, "eval_loss": noisy}
            axes: dict[str, Any] = {SIZE_AXIS: 64 * (size_code[N] + 1), BUDGET_AXIS: int(tpp)}
            if family == "moe":
                axes.update({EXPERTS_AXIS: experts, NOISE_AXIS: noise})
            n_total = N * (experts or 1) / 2 if family == "moe" else N
            rows.append({
                "sweep": sweep, "trial_id": tid, "family": family, "status": "finished", "seed": s, "attempt": 0,
                "name": tid, "axis_values": json.dumps(axes), "params_total": int(n_total + EMBEDDING),
                "params_non_embedding": int(n_total), "params_active": int(N + EMBEDDING),
                "flops_per_token": 6.0 * N, "final_step": int(curves[tid]["step"][-1]), "final_tokens": int(D),
                "final_flops": 6.0 * N * D, "final_loss": float(noisy[-1]), "final_eval_loss": float(noisy[-1]),
                "model.d_ff": 1024, "model.moe.d_expert": 256 if family == "moe" else 0,
                "model.moe.granularity": 1,
            })
            truth_rows.append({"trial_id": tid, "family": family, "seed": s, "N": N, "D": D, "C": 6.0 * N * D,
                               "L_clean": float(clean[-1]), "L": float(noisy[-1]),
                               "group": "dense" if family == "dense" else family_label(experts, noise),
                               EXPERTS_AXIS: experts, NOISE_AXIS: noise, "tpp": tpp})
    t = pd.DataFrame(truth_rows)
    fpt = FlopsPerToken()
    E, A, B, al, be = world.dense_params
    gap = t["L_clean"] - E - B / t["D"] ** be
    t["parameter_leverage"] = np.where(gap > 0, (A / gap.clip(lower=1e-300)) ** (1 / al), np.inf) / t["N"]
    t["compute_leverage"] = frontier_compute(world.dense_params, t["L_clean"].to_numpy(), fpt) / t["C"]
    t.loc[t["family"] == "dense", ["parameter_leverage", "compute_leverage"]] = np.nan
    return rows, curves, Truth(world, t, _true_effects(t))


def _true_effects(t: pd.DataFrame) -> dict[tuple[str, Any, Any], float]:
    """Mean over blocks (the other axis, size, budget) of the noise-free loss difference to the baseline."""
    moe = t[t["family"] == "moe"].drop_duplicates(["group", "N", "D"])
    out = {}
    for axis, other in ((EXPERTS_AXIS, NOISE_AXIS), (NOISE_AXIS, EXPERTS_AXIS)):
        values = sorted(moe[axis].unique())
        base = moe[moe[axis] == values[0]].set_index([other, "N", "D"])["L_clean"]
        for v in values[1:]:
            arm = moe[moe[axis] == v].set_index([other, "N", "D"])["L_clean"]
            out[(axis, v, values[0])] = float((arm - base.loc[arm.index]).mean())
    return out


def write_truth_store(root: str | os.PathLike | Store, world: World = World(), seed: int = 0,
                      sweep: str = "truth", metrics: bool = True) -> Truth:
    """Write one replicate of ``world`` as sweep ``sweep`` through the real Store; returns its Truth."""
    rows, curves, truth = world_trials(world, seed, sweep)
    store = root if isinstance(root, Store) else Store(root)
    for row in rows:
        if metrics:
            store.append_metrics(sweep, row["trial_id"], 0, curves[row["trial_id"]])
            store.flush(sweep, row["trial_id"])
        store.write_trial(row)
    if not isinstance(root, Store):
        store.close()
    return truth
