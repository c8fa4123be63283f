"""The `moelab` command line: train | sweep | plan | presets (more commands arrive with the platform)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

TRAIN_EXAMPLES = """\
examples:
  moelab train --preset moe-tiny --steps 200
  moelab train --preset moe-tiny --model.moe.top_k 1 --optim.lr 1e-3 --metrics-jsonl m.jsonl
  moelab train --preset small --data.source stdlib --train.max_tokens 2000000
  moelab train --preset moe-tiny --out runs/a --resume          # continue runs/a from its checkpoint
  torchrun --nproc_per_node 2 -m moelab train --preset moe-tiny --ep 2   # 2 ranks, experts split in 2
  moelab train --preset tiny --out runs/dense                          # a dense model, then
  moelab train --preset moe-tiny --init-from runs/dense --upcycle.noise_std 1e-3 --upcycle.reset_ratio 0.05

Under torchrun every rank is a data-parallel rank (FSDP2) and --ep ranks split the routed experts (gloo on
CPU, nccl on CUDA); the global batch is the single-process one, train.micro_batch_size counts per rank;
rank 0 alone prints and writes metrics. Checkpoints are then sharded directories <out>/ckpt-<step>/ that
--resume loads at any number of ranks or ep size.

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

    overrides = parse_overrides(extra)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.out:
        overrides["train.out_dir"] = args.out
    if args.ep is not None:
        overrides["train.ep"] = args.ep
    if args.init_from:
        overrides["upcycle.source"] = args.init_from
    try:
        rc = load_run_config(args.preset, overrides)
    except ConfigError as e:
        print(f"moelab train: bad config: {e}", file=sys.stderr)
        return 2
    par = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join the group, build the mesh
        from moelab.trainers.parallel import init_parallel

        try:
            par = init_parallel(rc.train.ep, rc.model.moe.n_experts, rc.train.device)
        except ConfigError as e:
            print(f"moelab train: bad config: {e}", file=sys.stderr)
            return 2
    try:
        return _train_ranks(rc, args, par)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train_ranks(rc, args: argparse.Namespace, par) -> int:
    from moelab.trainers.config import ConfigError
    from moelab.trainers.loop import Diverged, train

    main_rank = par is None or par.is_main
    say = print if main_rank else (lambda *a, **k: None)
    out_dir = rc.train.out_dir or f"runs/{rc.preset}-s{rc.train.seed}"
    resume = None
    if args.resume:
        resume = out_dir if args.resume == "auto" else args.resume
        if args.resume == "auto":  # bare --resume: continue if there is anything to continue
            from moelab.trainers.loop import find_checkpoint

            try:
                find_checkpoint(out_dir)
            except FileNotFoundError:
                say(f"moelab train: no checkpoint in {out_dir} yet: starting from step 0")
                resume = None
    pc = rc.model.param_counts()
    ranks = f", {par.world_size} ranks (ep {par.ep} x dp_shard {par.dp})" if par else ""
    say(f"moelab train: preset {rc.preset}, {pc['total'] / 1e6:.2f}M params ({pc['active'] / 1e6:.2f}M active), "
        f"{rc.total_steps()} steps{ranks} -> {out_dir}", flush=True)
    try:
        summary = train(rc, out_dir, metrics_jsonl=args.metrics_jsonl, resume=resume, parallel=par)
    except Diverged as e:
        say(f"moelab train: {e}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError) as e:
        say(f"moelab train: {e}", file=sys.stderr)
        return 2
    msg = f"done: loss {summary.get('loss', float('nan')):.4f}"
    if "eval_loss" in summary:
        msg += f", eval loss {summary['eval_loss']:.4f}"
    if "bayes_loss" in summary:
        msg += f" (Bayes-optimal floor {summary['bayes_loss']:.4f})"
    say(msg)
    say(f"metrics: {summary['metrics']}\ncheckpoint: {summary['checkpoint']}\nsummary: {out_dir}/summary.json")
    return 0


PLAN_EXAMPLES = """\
examples:
  moelab plan --preset moe-1b --gpus 64 --ep 8
  moelab plan --preset moe-1b --gpus 512 --ep 8 --micro-batch 1 --mfu 0.35 --bw-gbps 400
  moelab plan --preset moe-1b --gpus 8 --ep 8 --seq 2048 --micro-batch 8 --json

Memory per GPU (fp32 weights, grads and AdamW states sharded over all GPUs; bf16 all-gather buffers; an
activation estimate without recomputation), all-to-all and FSDP bytes per step, FLOPs per step, and the
step time at --mfu of --peak-tflops plus the communication at --nvlink-gbps (inside a node) or --bw-gbps
(across nodes). The formulas are in moelab/trainers/plan.py."""


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.trainers.config import ConfigError, preset
    from moelab.trainers.plan import PlanInputs, format_plan, make_plan

    try:
        rc = preset(args.preset)
        r = make_plan(rc, PlanInputs(gpus=args.gpus, ep=args.ep, seq=args.seq, micro_batch=args.micro_batch,
                                     batch=args.batch, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                     bw_gbps=args.bw_gbps, nvlink_gbps=args.nvlink_gbps,
                                     gpus_per_node=args.gpus_per_node))
    except ConfigError as e:
        print(f"moelab plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
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


SWEEP_EXAMPLES = """\
examples:
  moelab sweep noise --dry-run                       # a catalogue sweep: the trial table, nothing runs
  moelab sweep noise                                 # run it on a local Ray (all CPUs), results in results/
  moelab sweep my_sweep.yaml --storage runs/r1 --max-concurrent 2
  moelab sweep my_sweep.yaml --storage runs/r1 --resume   # after a crash: finish, skip finished trials
  moelab sweep noise --wandb                         # also log to W&B (offline unless configured)
  moelab sweep leverage-demo --set train.steps=100 --seeds 0   # a quicker look: fewer steps, one seed
  ray job submit --working-dir . -- moelab sweep my_sweep.yaml --storage s3://bucket/results

The sweep file is validated and expanded before Ray starts (exit 2 naming the bad key). Under `ray job
submit` (RAY_ADDRESS set) the sweep runs on that cluster, else on a local Ray. Trials run up to
--max-concurrent at a time (default: as many as the cluster's CPUs/GPUs hold), dense baselines before the
MoE trials upcycled from them. Results: ROOT/{trials,metrics,experts,routing}/sweep=NAME/*.parquet, read with
moelab.results.open(ROOT); Ray's state (checkpoints, Tune) under ROOT/_ray/NAME.
Catalogue: moelab/ablations/catalogue/*.yaml. Exit status: 0 every trial finished or diverged, 1 some
trial failed, 2 bad sweep file or arguments, 130 interrupted (finish with --resume)."""


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set train.steps=50` items -> {"train.steps": 50} (values read as YAML: numbers, null, lists)."""
    from moelab.platform.spec import SpecError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set: got {item!r}; allowed: KEY=VALUE with a dotted config key, "
                            f"e.g. train.steps=50")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.platform.spec import SpecError, expand, format_trials, load_spec

    try:
        sets = parse_sets(args.set or [])
        spec = load_spec(args.sweep, common=sets, seeds=args.seeds)
        trials = expand(spec)
    except SpecError as e:
        print(f"moelab sweep: bad sweep: {e}", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print(f"moelab sweep: --max-concurrent: got {args.max_concurrent}; allowed: >= 1", file=sys.stderr)
        return 2
    root = args.storage or spec.storage
    if args.dry_run:
        print(f"sweep {spec.name}" + (f": {spec.description}" if spec.description else ""))
        print(format_trials(trials))
        print(f"storage: {root}")
        return 0
    from moelab.platform.controller import SweepError, format_report, run_sweep
    from moelab.platform.sink import WandbUnavailable

    try:
        report = run_sweep(spec, storage=root, resume=args.resume, max_concurrent=args.max_concurrent,
                           wandb=args.wandb)
    except (SpecError, SweepError, WandbUnavailable) as e:
        print(f"moelab sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelab sweep: interrupted; finish with: moelab sweep {args.sweep} --storage {root} --resume",
              file=sys.stderr)
        return 130
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_fit(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.ablations.report import run_fit, summary_text

    try:
        analysis, report = run_fit(args.root, sweep=args.sweep, report_path=args.report, n_boot=args.n_boot)
    except (FileNotFoundError, ValueError) as e:
        print(f"moelab fit: {e}", file=sys.stderr)
        return 2
    print(summary_text(analysis))
    print(f"fits table: {args.root}/fits/\nreport: {report}")
    return 0


def cmd_dashboard(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from moelab.dashboards import serve
    except ImportError as e:
        print(f"moelab dashboard: {e}; install the dashboard extra: pip install 'moelab[dashboard]'", file=sys.stderr)
        return 2
    try:
        serve(args.root, host=args.host, port=args.port, refresh_s=args.refresh)
    except KeyboardInterrupt:
        pass
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
    t.add_argument("--init-from", metavar="PATH",
                   help="start from these weights (upcycle.source): a moelab run dir / checkpoint.pt or a "
                        "local Hugging Face dir; a dense source is upcycled when the model is an MoE")
    t.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint (file, ckpt-* dir or run dir; bare flag = the run's own)")
    t.add_argument("--ep", type=int, help="expert-parallel size under torchrun (train.ep; default 1)")
    t.set_defaults(func=cmd_train)
    from moelab.trainers.plan import PlanInputs

    d = PlanInputs(gpus=1)
    pl = sub.add_parser("plan", help="per-GPU memory, communication and step time of a cluster layout",
                        epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--preset", default="moe-1b", help="model and batch (default: moe-1b)")
    pl.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    pl.add_argument("--ep", type=int, default=1, help="expert-parallel size: divides --gpus and n_experts")
    pl.add_argument("--seq", type=int, default=0, help="sequence length (default: the preset's)")
    pl.add_argument("--micro-batch", type=int, default=0, help="sequences per GPU per micro-step "
                                                              "(default: the preset's micro batch)")
    pl.add_argument("--batch", type=int, default=0, help="global sequences per step (default: the preset's)")
    pl.add_argument("--mfu", type=float, default=d.mfu, help=f"model FLOPs utilisation (default {d.mfu})")
    pl.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                    help=f"peak bf16 TFLOP/s per GPU (default {d.peak_tflops:.0f}, H100)")
    pl.add_argument("--bw-gbps", type=float, default=d.bw_gbps,
                    help=f"network bandwidth per GPU in Gbit/s, across nodes (default {d.bw_gbps:.0f})")
    pl.add_argument("--nvlink-gbps", type=float, default=d.nvlink_gbps,
                    help=f"bandwidth per GPU in Gbit/s inside a node (default {d.nvlink_gbps:.0f}, NVLink)")
    pl.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="default 8")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_plan)
    sw = sub.add_parser("sweep", help="run a sweep (grid of Ray Train runs) into the results store",
                        description="Run a sweep file or a catalogue sweep with Ray Tune + Ray Train; "
                                    "every trial's metrics go to Parquet tables under --storage.",
                        epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("sweep", metavar="FILE_OR_CATALOGUE_NAME",
                    help="a sweep YAML file, or the name of a catalogue sweep (e.g. noise)")
    sw.add_argument("--dry-run", action="store_true", help="print the trial table (params, FLOPs) and exit")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key for every trial, over the file's `common` (repeatable), "
                         "e.g. --set train.steps=100")
    sw.add_argument("--seeds", type=int, nargs="+", metavar="N", help="replace the sweep's seeds, e.g. --seeds 0")
    sw.add_argument("--resume", action="store_true",
                    help="finish a sweep whose controller stopped: finished and diverged trials are not rerun")
    sw.add_argument("--storage", metavar="ROOT",
                    help="results root: a directory or a URI such as s3://bucket/prefix (default: the sweep's "
                         "`storage`)")
    sw.add_argument("--max-concurrent", type=int, metavar="N",
                    help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    sw.add_argument("--wandb", action="store_true",
                    help="also log every trial to Weights & Biases (offline unless W&B is configured; "
                         "needs pip install 'moelab[wandb]')")
    sw.set_defaults(func=cmd_sweep)
    fi = sub.add_parser("fit", help="fit scaling laws and leverage over a results store; write the fits "
                                     "table and an HTML report",
                        epilog="examples:\n  moelab fit results/\n  moelab fit results/ --sweep noise --report noise.html",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    fi.add_argument("root", help="the results store (a directory or s3://... URI)")
    fi.add_argument("--sweep", help="one sweep (default: every sweep in the store, pooled)")
    fi.add_argument("--report", help="HTML report path (default <root>/reports/fit-<sweep>.html)")
    fi.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    fi.set_defaults(func=cmd_fit)
    da = sub.add_parser("dashboard", help="serve the web dashboard over a results store (read-only)",
                        epilog="examples:\n  moelab dashboard results/\n"
                               "  moelab dashboard s3://bucket/results --host 0.0.0.0 --port 8080",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    da.add_argument("root", help="the results store (a directory or s3://... URI)")
    da.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    da.add_argument("--port", type=int, default=8050)
    da.add_argument("--refresh", type=float, default=10.0, help="auto-refresh period in seconds (0 = off)")
    da.set_defaults(func=cmd_dashboard)
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
