"""Upcycling knobs with power: paired-by-seed contrasts for the source documents' claims (issue 15), on CPU.

Claims tested (source document 000, chapter 3; refs.md "Upcycling"), loss lower = better:
  noise N(0, sigma^2) on the copied experts: sigma 1e-6 and 1e-3 help, 1e-2 hurts;
  partial reset (Drop-Upcycling): 5% of each expert's units helps, 50% hurts;
  shuffling the dense FFN's units before the split helps;
  no extra scaling factor beats the NVIDIA factor (softmax routers);
  routed experts at 30% of the global LR help.

Design (default `--design factorial`). One dense model (`--dense`, default `tiny`) is trained once; every
run upcycles that same checkpoint into `--moe` (default `moe-tiny`: 8 experts of d_ff/2, G = 2, top-2,
softmax with renormalisation, random router) and continues `--steps` steps on the same data (data.seed is
fixed; train.seed only matters for a from-scratch model, so it plays no part). The seed s of a run is
upcycle.seed: it draws the router, the noise, the reset units and the shuffle permutation. Each seed runs
  * a 2^(5-1) fractional factorial (resolution V, defining relation I = -ABCDE, so it holds the all-off base
    run) over the five two-level knobs, off -> on: A noise 0 -> 1e-3, B reset 0 -> 0.05, C shuffle off -> on,
    D scaling none -> nvidia, E expert LR fraction 1 -> 0.3 (16 runs);
  * three one-factor arms off the base, for the other levels: noise 1e-6, noise 1e-2, reset 0.5 (3 runs).
A main effect of the factorial is mean(loss, knob on) - mean(loss, knob off) within a seed (8 runs against
8, averaged over the other knobs' levels), then a paired t-interval over seeds: per run it costs a quarter
of the variance of a one-factor contrast. The ten two-factor interactions (clean in resolution V: aliased
only with three-factor ones) are estimated the same way and reported to show whether a main effect depends
on the other knobs. The extra arms are paired arm - base contrasts. `--design ofat` instead runs base + one
arm per knob value (9 runs per seed), every contrast then an arm - base difference paired by seed.
Statistics: `moelab.ablations.effects.effects` (paired t by seed) and `holm` (over the eight claim
contrasts; the interactions form their own Holm family). MDE = (t_{0.975,dof} + t_{0.80,dof}) x SE: the
true effect a two-sided 5% test detects with 80% power (about 2.8 SE for many seeds).

Common random numbers (default; `--no-common-router` turns it off): every run's routers are replaced by the
routers of the base configuration for its seed, so the runs of one seed differ only in the knobs. The
results in RESULTS.md were measured this way when upcycle.py still drew the router after the noise and reset
values from one generator (a noise or reset arm then got another router); upcycle.py now draws routers from
their own stream, so the copy changes nothing in what it pairs, and keeps those runs reproducible.

Runs go seed-major (all runs of seed 0 first), in a process pool of `--workers` (1-2) single-threaded
processes; each finished run is appended to `--out` (JSON lines) at once, and a rerun with the same setup
skips the runs already there. `--time-limit` stops starting runs after that many minutes; the analysis
uses the seeds whose runs are all complete.

    OMP_NUM_THREADS=1 python bench/upcycle_ablation.py --quick                        # smoke check, < 1 min
    OMP_NUM_THREADS=1 python bench/upcycle_ablation.py --seeds 14 --workers 2 --time-limit 22.5 \
        --out /tmp/upcycle.jsonl --summary /tmp/upcycle_summary.json
    OMP_NUM_THREADS=1 python bench/upcycle_ablation.py --analyse-only --out /tmp/upcycle.jsonl   # tables again

Cost, 1 thread per process: dense `tiny` 400 steps ~15 s; one `moe-tiny` run of 200 steps (seq 64 x batch
16, 16 eval batches) ~11-12 s alone, 16-28 s with 2 workers on a 2-core machine shared with other work.
19 runs a seed: ~2 min a seed with 2 workers on an idle 2-core machine, 2.5-4 min on a busy one (the run of
2026-12-03 finished 6 seeds in 22.7 min with `--time-limit 22.5`). `--quick`: ~25 s idle, ~60 s busy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

COMMON = {"train.seq_len": 64, "train.batch_size": 16, "train.eval_every": 0, "train.eval_batches": 16,
          "train.ckpt_every": 0, "optim.warmup_steps": 10, "data.seed": 0}

# Knob name -> (config key, off value, on value of the factorial). Off values are the base arm.
FACTORS = {
    "noise": ("upcycle.noise_std", 0.0, 1e-3),
    "reset": ("upcycle.reset_ratio", 0.0, 0.05),
    "shuffle": ("upcycle.shuffle", False, True),
    "scaling": ("upcycle.scaling", "none", "nvidia"),
    "expert_lr": ("optim.expert_lr_fraction", 1.0, 0.3),
}
EXTRA = [("noise", 1e-6), ("noise", 1e-2), ("reset", 0.5)]  # one-factor arms off the base
BASE = {k: v[1] for k, v in FACTORS.items()}

# The claims, in the order of the table: (knob, value, claimed sign of the loss difference vs off, text).
CLAIMS = [
    ("noise", 1e-6, -1, "noise sigma 1e-6 helps"),
    ("noise", 1e-3, -1, "noise sigma 1e-3 helps"),
    ("noise", 1e-2, +1, "noise sigma 1e-2 hurts"),
    ("reset", 0.05, -1, "reset 5% helps"),
    ("reset", 0.5, +1, "reset 50% hurts"),
    ("shuffle", True, -1, "shuffling the init matrix helps"),
    ("scaling", "nvidia", +1, "no scaling factor beats the NVIDIA factor"),
    ("expert_lr", 0.3, -1, "expert LR 0.3 x global helps"),
]


def arm_name(knobs: dict) -> str:
    diff = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items() if v != BASE[k]]
    return ", ".join(diff) or "base"


def design_arms(design: str) -> list[dict]:
    """Per-seed list of arms: dicts knob -> value (every knob present)."""
    names = list(FACTORS)
    arms = []
    if design == "factorial":
        for a, b, c, d in itertools.product((-1, 1), repeat=4):
            e = -a * b * c * d  # I = -ABCDE: the all-off run is in the fraction
            codes = dict(zip(names, (a, b, c, d, e)))
            arms.append({k: FACTORS[k][2] if codes[k] > 0 else FACTORS[k][1] for k in names})
        arms.sort(key=lambda arm: arm != BASE)  # base first
    elif design == "ofat":
        arms.append(dict(BASE))
        arms += [{**BASE, k: FACTORS[k][2]} for k in names]
    else:
        raise SystemExit(f"--design: got {design!r}; allowed: factorial, ofat")
    arms += [{**BASE, k: v} for k, v in EXTRA]
    return arms


# ----------------------------------------------------------------------------------------------------------
# Runs (in worker processes)


def _train(preset: str, out: Path, steps: int, extra: dict, common_router: bool = False) -> dict:
    import torch

    from moelab.trainers.config import load_run_config
    from moelab.trainers.loop import train
    from moelab.trainers.upcycle import initial_model, load_source, upcycle

    torch.set_num_threads(1)
    rc = load_run_config(preset, {**COMMON, "train.steps": steps, "train.log_every": steps, **extra})
    model = initial_model(rc)
    if common_router and model is not None and rc.model.moe.enabled:
        base_cfg = dataclasses.replace(rc.upcycle, noise_std=0.0, reset_ratio=0.0, shuffle=False)
        ref = upcycle(load_source(rc.upcycle.source), rc.model.moe, base_cfg)
        with torch.no_grad():
            for mine, theirs in zip(model.layers, ref.layers):
                if hasattr(mine.ffn, "router"):
                    mine.ffn.router.weight.copy_(theirs.ffn.router.weight)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(rc, out, progress=False, model=model)
    return {"eval_loss": float(summary["eval_loss"]), "train_loss": float(summary.get("loss", float("nan"))),
            "wall_s": time.perf_counter() - t0}


def run_arm(job: dict) -> dict:
    """One upcycled run; job: arm (knobs), seed, moe, steps, lr, dense_dir, common_router, setup."""
    knobs, seed = job["arm"], job["seed"]
    extra = {"optim.lr": job["lr"], "upcycle.source": job["dense_dir"], "upcycle.seed": seed}
    extra.update({FACTORS[k][0]: v for k, v in knobs.items()})
    out = Path(tempfile.mkdtemp(prefix="upcycle-run-"))
    try:
        res = _train(job["moe"], out, job["steps"], extra, job["common_router"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"setup": job["setup"], "kind": "arm", "arm": arm_name(knobs), **knobs, "seed": seed, **res}


def run_dense_continued(job: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="upcycle-run-"))
    try:
        res = _train(job["dense"], out, job["steps"], {"optim.lr": job["lr"], "upcycle.source": job["dense_dir"],
                                                       "optim.expert_lr_fraction": 1.0})
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"setup": job["setup"], "kind": "dense_continued", "arm": "dense, continued", "seed": None, **res}


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# Analysis


def _load(path: Path, setup: dict) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("setup") == setup:
                rows.append(rec)
    return rows


def _fmt(x: float, digits: int = 5) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def _pfmt(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _mde(se: float, dof: float, power: float = 0.8, alpha: float = 0.05) -> float:
    from scipy import stats

    if not (se > 0 and dof > 0):
        return float("nan")
    return float((stats.t.ppf(1 - alpha / 2, dof) + stats.t.ppf(power, dof)) * se)


def verdict(row: dict, sign: int, delta: float) -> str:
    """reproduced: Holm p < 0.05 in the claimed direction; refuted: Holm p < 0.05 the other way, or the 95%
    interval rules out an effect of delta or more in the claimed direction; else inconclusive."""
    lo, hi, p = row["diff_lo"], row["diff_hi"], row["p_holm"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive (no interval)"
    if math.isfinite(p) and p < 0.05:
        return "reproduced" if row["diff"] * sign > 0 else "refuted (significant, opposite direction)"
    near = hi if sign > 0 else -lo  # the interval's furthest reach in the claimed direction
    if near < delta:
        side = "; interval on the opposite side of 0" if near < 0 else ""
        return f"refuted (CI excludes an effect of {delta:g} nats in the claimed direction{side})"
    return "inconclusive"


def analyse(rows: list[dict], design: str, delta: float, arm_names: list[str]) -> dict:
    import numpy as np
    import pandas as pd

    from moelab.ablations.effects import effects, holm

    arms = pd.DataFrame([r for r in rows if r["kind"] == "arm" and r["arm"] in arm_names])
    if arms.empty:
        return {"claims": [], "interactions": [], "at_expert_lr_1": [], "seeds": []}
    counts = arms.groupby("seed")["arm"].nunique()
    seeds = sorted(int(s) for s in counts[counts == len(set(arm_names))].index)
    arms = arms[arms["seed"].isin(seeds)].copy()
    if arms.empty:  # no seed has every run of the design yet
        return {"claims": [], "interactions": [], "at_expert_lr_1": [], "seeds": []}
    arms["shuffle"] = arms["shuffle"].astype(bool)
    names = list(FACTORS)
    on = {k: FACTORS[k][2] for k in names}
    extra_keys = {(k, v) for k, v in EXTRA}
    is_factorial_run = np.logical_and.reduce([arms[k].isin([FACTORS[k][1], FACTORS[k][2]]) for k in names])
    out_claims = []
    for knob, value, sign, text in CLAIMS:
        if design == "factorial" and (knob, value) not in extra_keys:
            sub = arms[is_factorial_run]  # every factorial run; main effect = on - off averaged per seed
            blocks: list[str] = []
            how = "factorial main effect (8 vs 8 runs per seed)"
        else:
            others = [k for k in names if k != knob]
            mask = np.logical_and.reduce([arms[k] == BASE[k] for k in others])
            sub = arms[mask & arms[knob].isin([BASE[knob], value])]
            blocks = others
            how = "arm - base (1 vs 1 run per seed)"
        sub = sub.assign(level=(sub[knob] == value).map({True: "on", False: "off"}))
        eff = effects(sub, "level", "eval_loss", baseline="off", blocks=blocks)
        r = eff.loc["on"].to_dict()
        r.update(knob=knob, value=value, sign=sign, claim=text, how=how,
                 base_mean=float(eff.loc["off", "mean"]), arm_mean=float(r["mean"]),
                 mde=_mde(r["diff_stderr"], r["dof"]))
        out_claims.append(r)
    for r, p in zip(out_claims, holm([r["p_value"] for r in out_claims])):
        r["p_holm"] = float(p)
        r["verdict"] = verdict(r, r["sign"], delta)
    inter, cond = [], []
    if design == "factorial":
        # The same main effects within the expert-LR-1 half (a 2^(4-1) design of resolution IV in the other
        # four knobs: 4 runs against 4 per seed), i.e. at the base's expert LR, which has a large effect.
        half = arms[is_factorial_run & (arms["expert_lr"] == BASE["expert_lr"])]
        for knob in [k for k in names if k != "expert_lr"]:
            sub = half.assign(level=(half[knob] == on[knob]).map({True: "on", False: "off"}))
            r = effects(sub, "level", "eval_loss", baseline="off").loc["on"].to_dict()
            r.update(knob=knob, value=on[knob], mde=_mde(r["diff_stderr"], r["dof"]))
            cond.append(r)
        for r, p in zip(cond, holm([r["p_value"] for r in cond])):
            r["p_holm"] = float(p)
        fac = arms[is_factorial_run].copy()
        for k in names:
            fac[f"c_{k}"] = np.where(fac[k] == on[k], 1, -1)
        for a, b in itertools.combinations(names, 2):
            fac["prod"] = fac[f"c_{a}"] * fac[f"c_{b}"]
            eff = effects(fac, "prod", "eval_loss", baseline=-1)
            r = eff.loc[1].to_dict()
            r.update(pair=f"{a} x {b}", mde=_mde(r["diff_stderr"], r["dof"]))
            inter.append(r)
        for r, p in zip(inter, holm([r["p_value"] for r in inter])):
            r["p_holm"] = float(p)
    return {"claims": out_claims, "interactions": inter, "at_expert_lr_1": cond, "seeds": seeds}


def report(res: dict, rows: list[dict], delta: float) -> str:
    import statistics

    lines = []
    seeds = res["seeds"]
    arms = [r for r in rows if r["kind"] == "arm" and r["seed"] in seeds]
    dense = [r for r in rows if r["kind"] == "dense_continued"]
    if dense:
        lines.append(f"dense continued (reference, seed-independent): eval loss {dense[0]['eval_loss']:.4f}")
    base = [r["eval_loss"] for r in arms if r["arm"] == "base"]
    if len(base) > 1:
        lines.append(f"base arm: eval loss mean {statistics.mean(base):.4f}, sd over seeds "
                     f"{statistics.stdev(base):.4f} ({len(base)} seeds)")
    lines.append(f"complete seeds: {len(seeds)} {seeds}")
    lines.append("")
    lines.append("| claim | contrast (knob on - off) | how | off mean | on mean | diff | 95% CI | SE | n | "
                 "Holm p | MDE (80%) | verdict |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in res["claims"]:
        v = r["value"]
        val = f"{v:g}" if isinstance(v, float) else str(v)
        lines.append(
            f"| {r['claim']} | {r['knob']} {BASE[r['knob']]} -> {val} | {r['how']} | {r['base_mean']:.4f} | "
            f"{r['arm_mean']:.4f} | {_fmt(r['diff'])} | [{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}] | "
            f"{r['diff_stderr']:.2g} | {r['n']} | {_pfmt(r['p_holm'])} | {r['mde']:.2g} | {r['verdict']} |")
    if res.get("at_expert_lr_1"):
        lines.append("")
        lines.append("| main effect at expert LR 1 only (4 vs 4 runs per seed) | diff | 95% CI | Holm p (4 tests) | "
                     "MDE (80%) |")
        lines.append("| --- | ---: | --- | ---: | ---: |")
        for r in res["at_expert_lr_1"]:
            lines.append(f"| {r['knob']} {BASE[r['knob']]} -> {r['value']} | {_fmt(r['diff'])} | "
                         f"[{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}] | {_pfmt(r['p_holm'])} | {r['mde']:.2g} |")
    if res["interactions"]:
        lines.append("")
        lines.append("| interaction (factorial) | effect | 95% CI | Holm p (10 tests) | MDE (80%) |")
        lines.append("| --- | ---: | --- | ---: | ---: |")
        for r in res["interactions"]:
            lines.append(f"| {r['pair']} | {_fmt(r['diff'])} | [{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}] | "
                         f"{_pfmt(r['p_holm'])} | {r['mde']:.2g} |")
    lines.append("")
    lines.append(f"target half-width / equivalence margin delta = {delta:g} nats; negative diff = lower loss")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="tiny")
    ap.add_argument("--moe", default="moe-tiny")
    ap.add_argument("--dense-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200, help="continued steps per upcycled run")
    ap.add_argument("--seeds", type=int, default=11, help="number of seeds (0 .. n-1)")
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="continued-training peak LR")
    ap.add_argument("--design", choices=["factorial", "ofat"], default="factorial")
    ap.add_argument("--workers", type=int, default=2, choices=[1, 2])
    ap.add_argument("--no-common-router", dest="common_router", action="store_false")
    ap.add_argument("--no-dense-continued", dest="dense_continued", action="store_false")
    ap.add_argument("--delta", type=float, default=0.001, help="target half-width / smallest effect (nats)")
    ap.add_argument("--time-limit", type=float, default=0.0, help="minutes; no run starts after (0 = none)")
    ap.add_argument("--out", default="", help="per-run results, JSON lines (default /tmp/upcycle-<setup>.jsonl)")
    ap.add_argument("--summary", default="", help="also write the analysis here (JSON)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 3 seeds, 6 steps, < 1 min")
    ap.add_argument("--analyse-only", action="store_true", help="no runs: analyse what --out already holds")
    a = ap.parse_args()
    if a.quick:
        a.dense_steps, a.steps, a.seeds = 12, 6, 3
        COMMON["train.eval_batches"] = 2
        COMMON["optim.warmup_steps"] = 2
    t_start = time.perf_counter()
    setup = {"dense": a.dense, "moe": a.moe, "dense_steps": a.dense_steps, "steps": a.steps, "lr": a.lr,
             "common_router": a.common_router, "common": dict(COMMON)}
    tag = f"{a.dense}-{a.moe}-d{a.dense_steps}-s{a.steps}-lr{a.lr:g}{'' if a.common_router else '-nocrn'}"
    if a.quick:
        tag += "-quick"
    out = Path(a.out or f"/tmp/upcycle-{tag}.jsonl")
    dense_dir = out.with_name(out.stem + f".dense-{a.dense}-{a.dense_steps}")
    arms = design_arms(a.design)
    if a.analyse_only:
        rows = _load(out, setup)
        res = analyse(rows, a.design, a.delta, [arm_name(x) for x in arms])
        print(report(res, rows, a.delta))
        if a.summary:
            Path(a.summary).write_text(json.dumps({"setup": setup, "design": a.design, **res}, indent=1,
                                                  default=str))
        return
    if not (dense_dir / "checkpoint.pt").exists():
        print(f"training dense {a.dense} for {a.dense_steps} steps -> {dense_dir}", flush=True)
        shutil.rmtree(dense_dir, ignore_errors=True)
        d = _train(a.dense, dense_dir, a.dense_steps, {})
        print(f"dense: eval loss {d['eval_loss']:.4f} ({d['wall_s']:.0f} s)", flush=True)
    seeds = list(range(a.seed_offset, a.seed_offset + a.seeds))
    done = {(r["arm"], r["seed"]) for r in _load(out, setup)}
    common = {"moe": a.moe, "steps": a.steps, "lr": a.lr, "dense_dir": str(dense_dir),
              "common_router": a.common_router, "setup": setup}
    jobs: list[tuple] = []
    if a.dense_continued and ("dense, continued", None) not in done:
        jobs.append((run_dense_continued, {"dense": a.dense, **common}))
    jobs += [(run_arm, {"arm": arm, "seed": s, **common}) for s in seeds for arm in arms
             if (arm_name(arm), s) not in done]
    total = len(jobs)
    print(f"design {a.design}: {len(arms)} arms x {len(seeds)} seeds; {len(done)} runs already in {out}, "
          f"{total} to run on {a.workers} worker(s)", flush=True)
    pending, finished, stopped = {}, 0, False
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool, \
            out.open("a") as fh:
        it = iter(jobs)
        while True:
            while len(pending) < a.workers and not stopped:
                if a.time_limit and time.perf_counter() - t_start > a.time_limit * 60:
                    stopped = True
                    print(f"time limit {a.time_limit} min reached: no new runs", flush=True)
                    break
                nxt = next(it, None)
                if nxt is None:
                    stopped = True
                    break
                fn, job = nxt
                pending[pool.submit(fn, job)] = job
            if not pending:
                break
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in ready:
                job = pending.pop(fut)
                rec = fut.result()
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                finished += 1
                el = time.perf_counter() - t_start
                print(f"[{finished}/{total} {el / 60:5.1f} min] {rec['arm']:<55} seed {rec['seed']}: eval "
                      f"{rec['eval_loss']:.4f} ({rec['wall_s']:.0f} s)", flush=True)
    rows = _load(out, setup)
    res = analyse(rows, a.design, a.delta, [arm_name(x) for x in arms])
    print()
    print(report(res, rows, a.delta))
    print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min; raw runs: {out}", flush=True)
    if a.summary:
        Path(a.summary).write_text(json.dumps({"setup": setup, "design": a.design, **res}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
