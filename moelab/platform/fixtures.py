"""A synthetic results store, fast: for tests of the readers (dashboard, notebook, fits) and for benchmarks.

`synthetic_store(root, n_trials=18, n_steps=50)` writes the `trials`, `metrics`, `experts` and `routing`
tables of a made-up sweep through the real `Store`, with trials that come from a real `SweepSpec` expansion (dense
ladder-2/3/4 baselines + MoE trials on ladder-2: axes `model.moe.n_experts` x `upcycle.noise_std`, upcycled
from ladder-2, seeds 0, 1, ...), so every column the platform writes is there with its real type.

Losses follow a Chinchilla-like law with a known answer, so fits can be checked:

    L(N, D) = 1.7 + 60 / N_eff^0.35 + 30 / D^0.3,   N_eff = params_active * (n_experts / top_k)^0.3 (MoE)

plus a per-seed offset and per-step noise; an upcycling noise of 1e-2 costs +0.02. MoE trials route the
synthetic source's 4 domains to experts that specialise over training (see `_routing`). `restarts` trials have a
second attempt that rewrites the last half of their steps (readers must keep attempt 1's rows), and
`diverged` trials end in NaN with status `diverged`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any

import numpy as np

from moelab.platform.spec import expand, parse_spec
from moelab.platform.store import Store

__all__ = ["SyntheticStore", "synthetic_store", "synthetic_spec", "LAW"]

LAW = {"E": 1.7, "A": 60.0, "alpha": 0.35, "B": 30.0, "beta": 0.3, "leverage_exp": 0.3}


@dataclasses.dataclass
class SyntheticStore:
    root: str
    sweep: str
    trial_ids: list[str]
    steps: list[int]  # the logged steps of a finished trial
    restarted: list[str]  # trials with an attempt 1
    diverged: list[str]  # trials that end in NaN (fewer logged steps)
    logged: dict[str, list[int]]  # trial_id -> the steps that survive deduplication
    moe: list[str]  # trials with an experts (and a routing) table


def synthetic_spec(sweep: str = "synthetic", n_seeds: int = 2, n_steps: int = 50, log_every: int = 10) -> dict:
    """The sweep (as a dict for `parse_spec`) whose trials the synthetic store holds."""
    return {
        "name": sweep,
        "common": {"data.source": "synthetic", "train.steps": n_steps * log_every, "train.log_every": log_every,
                   "train.eval_every": 5 * log_every},
        "baselines": [{"preset": "ladder-2"}, {"preset": "ladder-3"}, {"preset": "ladder-4"}],
        "base": {"preset": "ladder-2", "upcycle_from": "ladder-2",
                 "overrides": {"model.moe.granularity": 2, "model.moe.top_k": 2}},
        "axes": {"model.moe.n_experts": [8, 16], "upcycle.noise_std": [0.0, 1e-3, 1e-2]},
        "seeds": list(range(n_seeds)),
    }


def _curves(rng: np.random.Generator, trial: Any, steps: np.ndarray, seed_offset: float,
            inherited_tokens: float = 0.0) -> dict[str, np.ndarray]:
    """inherited_tokens: what an upcycled trial's dense source trained on; the law sees them too (so do fits)."""
    rc = trial.config
    tokens_per_step = rc.train.batch_size * rc.train.seq_len
    tokens = steps * tokens_per_step
    n_eff = float(trial.params_active)
    if trial.family == "moe":
        n_eff *= (rc.model.moe.n_experts / rc.model.moe.top_k) ** LAW["leverage_exp"]
    penalty = 0.02 if rc.upcycle.noise_std >= 1e-2 else 0.0
    clean = LAW["E"] + LAW["A"] / n_eff ** LAW["alpha"] + LAW["B"] / np.maximum(tokens + inherited_tokens, 1) ** LAW["beta"]
    clean = clean + penalty + seed_offset
    n = len(steps)
    total = rc.total_steps()
    warm = max(rc.optim.warmup_steps, 1)
    lr = np.where(steps < warm, rc.optim.lr * steps / warm,
                  rc.optim.lr * (0.1 + 0.45 * (1 + np.cos(np.pi * np.minimum(steps / total, 1)))))
    step_s = 1e-3 * trial.params_active / 1e4
    out = {
        "step": steps, "tokens": tokens, "flops": tokens * trial.flops_per_token, "wall_s": steps * step_s,
        "loss": clean + rng.normal(0, 0.02, n), "lr": lr, "grad_norm": 1.0 + rng.gamma(2.0, 0.1, n),
        "tokens_per_s": np.full(n, tokens_per_step / step_s) * rng.uniform(0.95, 1.05, n),
        "mfu": np.full(n, 0.3) * rng.uniform(0.95, 1.05, n),
    }
    ev = np.full(n, np.nan)
    every = max(rc.train.eval_every // rc.train.log_every, 1)
    idx = np.arange(n)
    mask = ((idx + 1) % every == 0) | (idx == n - 1)
    ev[mask] = clean[mask] + 0.02 + rng.normal(0, 0.005, mask.sum())
    out["eval_loss"] = ev
    if rc.model.mtp_depth:  # predicting further ahead is harder; no draw from rng (other columns unchanged)
        out["mtp_loss"] = clean + 0.5
    if trial.family == "moe":
        E, L = rc.model.moe.n_experts, rc.model.n_layers
        out["aux_loss"] = 1.0 + 0.1 * np.exp(-steps / total * 5) + rng.normal(0, 0.005, n)
        out["z_loss"] = 0.5 * np.exp(-steps / total * 3) + 0.01
        # per-sequence balance sits above the batch-level one (a batch can be balanced while each sequence is
        # not); no draw from rng, so the other synthetic columns stay as they were
        out["seq_aux_loss"] = out["aux_loss"] + 0.05 * np.exp(-steps / total * 2)
        out["drop_frac"] = np.zeros(n)
        sharp = 2.0 * np.exp(-steps / total * 4)[:, None, None]
        logits = rng.normal(0, 1, (n, L, E)) * sharp
        load = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        out["imbalance"] = (load.max(-1) * E).mean(-1)
        out["router_entropy"] = -(load * np.log(load)).sum(-1).mean(-1)
        out["expert_load"] = load
    return out


def _sinkhorn(kernel: np.ndarray, rows: np.ndarray, cols: np.ndarray, iters: int = 60) -> np.ndarray:
    """The matrix closest to `kernel` (in KL) with row sums `rows` and column sums `cols` (both summing to 1),
    by alternately rescaling rows and columns. kernel: [..., K, E] > 0; rows: [..., K]; cols: [..., E]."""
    p = kernel / kernel.sum((-2, -1), keepdims=True)
    for _ in range(iters):
        p *= (rows / p.sum(-1))[..., :, None]
        p *= (cols / p.sum(-2))[..., None, :]
    return p


def _routing(trial: Any, steps: np.ndarray, load: np.ndarray, seed: int) -> np.ndarray:
    """Routed slots per (step, layer, domain, expert): [n, L, K, E] int64, consistent with `load` [n, L, E].

    Domain d prefers the experts e with e % K == d; how strongly grows over training (0 at step 0, faster in
    deeper layers and with more upcycling noise, which breaks the copied experts' symmetry), plus a fixed
    per-trial jitter. Each step's matrix has the domains' token shares as row sums and `load` as column sums
    (Sinkhorn), times the interval's slots. Its own RNG (seeded by the trial id): the other columns' random
    streams stay as they were before this table existed.
    """
    rc = trial.config
    K, (n, L, E) = rc.data.n_domains, load.shape
    rng = np.random.default_rng([seed, zlib.crc32(trial.trial_id.encode())])
    prefer = (np.arange(E)[None, :] % K == np.arange(K)[:, None]).astype(float)  # [K, E]
    progress = steps / rc.total_steps()
    rate = (1.0 + 30.0 * rc.upcycle.noise_std) * (1.0 + 0.5 * np.arange(L))  # [L]
    sharp = 3.0 * (1.0 - np.exp(-4.0 * progress[:, None] * rate[None, :]))  # [n, L]
    jitter = rng.normal(0.0, 0.3, (L, K, E))
    kernel = np.exp(sharp[:, :, None, None] * prefer + jitter * (sharp[:, :, None, None] / 3.0))
    prior = rng.dirichlet(np.full(K, 20.0))  # the domains' token shares, near uniform
    share = _sinkhorn(kernel, np.broadcast_to(prior, (n, L, K)), load)
    slots = rc.train.batch_size * rc.train.seq_len * rc.train.log_every * rc.model.moe.top_k
    return np.rint(share * slots).astype(np.int64)


def synthetic_store(root: str | os.PathLike | Store, *, n_trials: int | None = None, n_steps: int = 50,
                    sweep: str = "synthetic", log_every: int = 10, seed: int = 0, experts: bool = True,
                    restarts: int = 1, diverged: int = 1, batch_steps: int | None = None) -> SyntheticStore:
    """Write a synthetic sweep of `n_trials` trials (default: all 18 of 2 seeds) x `n_steps` logged steps.

    root: a directory, URI or an open Store. batch_steps: steps per metrics file (default: one per attempt).
    Returns what was written, for assertions.
    """
    per_seed = 3 + 2 * 3  # baselines + grid of one seed
    n_seeds = 2 if n_trials is None else max(2, math.ceil(n_trials / per_seed))
    # Seed-major, so a truncated list holds whole seeds (baselines before the trials upcycled from them).
    trials = sorted(expand(parse_spec(synthetic_spec(sweep, n_seeds, n_steps, log_every))), key=lambda t: t.seed)
    trials = trials[: (n_trials if n_trials is not None else len(trials))]
    by_id = {t.trial_id: t for t in trials}
    store = root if isinstance(root, Store) else Store(root, batch_rows=10**9, flush_s=math.inf)
    rng = np.random.default_rng(seed)
    seed_offsets = {s: rng.normal(0, 0.01) for s in range(n_seeds)}
    steps = np.arange(1, n_steps + 1, dtype=np.int64) * log_every
    # Restarts and divergence go to MoE trials when there are any (their experts table is affected too).
    order = sorted(range(len(trials)), key=lambda i: trials[i].family != "moe")
    restarted = [trials[i].trial_id for i in order[:restarts]]
    div = [trials[i].trial_id for i in order[restarts:restarts + diverged]] if len(trials) > restarts else []
    logged: dict[str, list[int]] = {}
    batch = batch_steps or n_steps

    def write(trial: Any, attempt: int, cols: dict[str, np.ndarray], lo: int, hi: int) -> None:
        for start in range(lo, hi, batch):
            end = min(start + batch, hi)
            store.append_metrics(sweep, trial.trial_id, attempt, {k: v[start:end] for k, v in cols.items()})
            store.flush(sweep, trial.trial_id)

    def curves(trial: Any, attempt: int) -> dict[str, np.ndarray]:
        src = by_id.get(trial.depends_on) if trial.depends_on else None
        inherited = float(steps[-1] * src.config.train.batch_size * src.config.train.seq_len) if src else 0.0
        cols = _curves(rng, trial, steps, seed_offsets[trial.seed], inherited)
        if "expert_load" in cols and experts:
            cols["expert_domain"] = _routing(trial, steps, cols["expert_load"], seed + 1000 * attempt)
        if not experts:
            cols.pop("expert_load", None)
        return cols

    for trial in trials:
        cols = curves(trial, 0)
        n = len(steps)
        status, attempt = "finished", 0
        if trial.trial_id in div:
            cut = max(1, int(0.6 * n))
            cols["loss"][cut - 1] = np.nan
            cols = {k: v[:cut] for k, v in cols.items()}
            n, status = cut, "diverged"
        if trial.trial_id in restarted:
            half, crash = n // 2, max(n // 2 + 1, int(0.7 * n))
            write(trial, 0, cols, 0, crash)
            again = curves(trial, 1)
            write(trial, 1, {k: v[:n] for k, v in again.items()}, half, n)
            cols = {k: (np.concatenate([cols[k][:half], again[k][half:n]]) if k in again else v)
                    for k, v in cols.items()}
            attempt = 1
        else:
            write(trial, 0, cols, 0, n)
        logged[trial.trial_id] = [int(s) for s in cols["step"]]
        row = trial.row()
        last = {k: v[n - 1] for k, v in cols.items() if k not in ("expert_load", "expert_domain")}
        evals = cols["eval_loss"][~np.isnan(cols["eval_loss"])]
        row.update(status=status, attempt=attempt, final_step=int(last["step"]), final_tokens=int(last["tokens"]),
                   final_flops=float(last["flops"]), final_loss=float(last["loss"]),
                   final_eval_loss=float(evals[-1]) if len(evals) else None, wall_s=float(last["wall_s"]),
                   error="loss is NaN" if status == "diverged" else None)
        store.write_trial(row)
    return SyntheticStore(root=store.uri, sweep=sweep, trial_ids=[t.trial_id for t in trials],
                          steps=[int(s) for s in steps], restarted=restarted, diverged=div, logged=logged,
                          moe=[t.trial_id for t in trials if t.family == "moe"])
