"""The `moelab` command line: train | presets (more commands arrive with the platform)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TRAIN_EXAMPLES = """\
examples:
  moelab train --preset moe-tiny --steps 200
  moelab train --preset moe-tiny --model.moe.top_k 1 --optim.lr 1e-3 --metrics-jsonl m.jsonl
  moelab train --preset small --data.source stdlib --train.max_tokens 2000000
  moelab train --preset moe-tiny --out runs/a --resume          # continue runs/a from its checkpoint

Any config field can be set as --section.field VALUE (sections: model, model.moe, data, optim, train);
`moelab presets` lists the presets."""


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """`--a.b 1 --c.d=x` -> {"a.b": "1", "c.d": "x"}; values are typed later, strictly, by the config."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            raise SystemExit(f"moelab: unrecognised argument {arg!r}; config fields are --section.field VALUE "
                             f"(e.g. --model.moe.top_k 2)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise SystemExit(f"moelab: --{key} needs a value")
            value = extra[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.trainers.config import ConfigError, load_run_config
    from moelab.trainers.loop import Diverged, train

    overrides = parse_overrides(extra)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.out:
        overrides["train.out_dir"] = args.out
    try:
        rc = load_run_config(args.preset, overrides)
    except ConfigError as e:
        print(f"moelab train: bad config: {e}", file=sys.stderr)
        return 2
    out_dir = rc.train.out_dir or f"runs/{rc.preset}-s{rc.train.seed}"
    resume = None
    if args.resume:
        resume = out_dir if args.resume == "auto" else args.resume
    pc = rc.model.param_counts()
    print(f"moelab train: preset {rc.preset}, {pc['total'] / 1e6:.2f}M params ({pc['active'] / 1e6:.2f}M active), "
          f"{rc.total_steps()} steps -> {out_dir}", flush=True)
    try:
        summary = train(rc, out_dir, metrics_jsonl=args.metrics_jsonl, resume=resume)
    except Diverged as e:
        print(f"moelab train: {e}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"moelab train: {e}", file=sys.stderr)
        return 2
    msg = f"done: loss {summary.get('loss', float('nan')):.4f}"
    if "eval_loss" in summary:
        msg += f", eval loss {summary['eval_loss']:.4f}"
    if "bayes_loss" in summary:
        msg += f" (Bayes-optimal floor {summary['bayes_loss']:.4f})"
    print(msg)
    print(f"metrics: {summary['metrics']}\ncheckpoint: {summary['checkpoint']}\nsummary: {out_dir}/summary.json")
    return 0


def cmd_presets(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.trainers.config import PRESETS, preset

    rows = []
    for name in PRESETS:
        rc = preset(name)
        m, pc = rc.model, rc.model.param_counts()
        kind = f"moe {m.moe.n_experts}e top-{m.moe.top_k}" if m.moe.enabled else "dense"
        rows.append({"preset": name, "kind": kind, "layers": m.n_layers, "d_model": m.d_model,
                     "total": pc["total"], "active": pc["active"], "non_embedding": pc["non_embedding"],
                     "flops_per_token": m.flops_per_token(rc.train.seq_len), "seq_len": rc.train.seq_len})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def h(n: float) -> str:
        for unit, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= s:
                return f"{n / s:.2f}{unit}"
        return str(int(n))

    print(f"{'preset':10} {'kind':18} {'L':>3} {'d':>5} {'total':>9} {'active':>9} {'non-emb':>9} {'FLOPs/tok':>10}")
    for r in rows:
        print(f"{r['preset']:10} {r['kind']:18} {r['layers']:>3} {r['d_model']:>5} {h(r['total']):>9} "
              f"{h(r['active']):>9} {h(r['non_embedding']):>9} {r['flops_per_token']:>10.3g}")
    print("\nFLOPs/token: training (fwd+bwd) = 6 x (active non-embedding params + output head) + attention "
          "12 x layers x seq_len x d_attn, at the preset's seq_len.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Train, sweep and analyse Mixture-of-Experts models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (no Ray needed)", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--preset", default="moe-tiny", help="starting config (default: moe-tiny)")
    t.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    t.add_argument("--seed", type=int, help="seed for weights and data (train.seed)")
    t.add_argument("--out", help="run directory (default runs/<preset>-s<seed>)")
    t.add_argument("--metrics-jsonl", help="also/instead write one JSON object per logged step here "
                                           "(default <out>/metrics.jsonl)")
    t.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint (file or run dir; bare flag = the run's own)")
    t.set_defaults(func=cmd_train)
    pr = sub.add_parser("presets", help="list presets with parameter and FLOP counts",
                        epilog="example:\n  moelab presets\n  moelab presets --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
