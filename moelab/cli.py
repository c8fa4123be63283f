"""The `moelab` command line: train | export | sweep | fit | dashboard | store | plan | presets | advise."""

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
    from moelab.startup import startup_imports

    with startup_imports(freeze=args.fresh_process):  # torch and the trainer (see main)
        import moelab.trainers.loop  # noqa: F401
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
  moelab plan --preset moe-1b --gpus 8 --ep 8 --activation-checkpointing selective

Memory per GPU (fp32 weights, grads and AdamW states sharded over all GPUs; bf16 all-gather buffers; the
activations autograd keeps, with or without activation checkpointing, and the loss logits), all-to-all and
FSDP bytes per step, FLOPs per step (and those recomputed), and the step time at --mfu of --peak-tflops plus
the communication at --nvlink-gbps (inside a node) or --bw-gbps (across nodes). The formulas are in
moelab/trainers/plan.py."""


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.trainers.config import ConfigError, preset
    from moelab.trainers.plan import PlanInputs, format_plan, make_plan

    try:
        rc = preset(args.preset)
        r = make_plan(rc, PlanInputs(gpus=args.gpus, ep=args.ep, seq=args.seq, micro_batch=args.micro_batch,
                                     batch=args.batch, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                     bw_gbps=args.bw_gbps, nvlink_gbps=args.nvlink_gbps,
                                     gpus_per_node=args.gpus_per_node,
                                     activation_checkpointing=args.activation_checkpointing))
    except ConfigError as e:
        print(f"moelab plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
    return 0


def cmd_presets(args: argparse.Namespace, extra: list[str]) -> int:
    import textwrap

    from moelab.trainers.config import PRESETS, preset

    def kind_of(m) -> str:
        parts = ["dense"]
        if m.moe.enabled:
            mo = m.moe
            parts = [f"moe {mo.n_experts}e top-{mo.top_k}"]
            parts += [f"+{mo.n_shared}sh"] if mo.n_shared else []
            parts += ["sig"] if mo.score_func == "sigmoid" else []
            parts += [f"grp{mo.n_group}/{mo.topk_group}"] if mo.n_group > 1 else []
        parts += ["mla"] if m.attention == "mla" else []
        parts += [f"mtp{m.mtp_depth}"] if m.mtp_depth else []
        return " ".join(parts)

    rows = []
    for name in PRESETS:
        rc = preset(name)
        m, pc = rc.model, rc.model.param_counts()
        rows.append({"preset": name, "kind": kind_of(m), "layers": m.n_layers, "d_model": m.d_model,
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

    wn = max(len("preset"), *(len(r["preset"]) for r in rows))
    wk = max(len("kind"), *(len(r["kind"]) for r in rows))
    print(f"{'preset':{wn}}  {'kind':{wk}}  {'L':>3} {'d':>5} {'total':>9} {'active':>9} {'non-emb':>9} "
          f"{'FLOPs/tok':>10}")
    for r in rows:
        print(f"{r['preset']:{wn}}  {r['kind']:{wk}}  {r['layers']:>3} {r['d_model']:>5} {h(r['total']):>9} "
              f"{h(r['active']):>9} {h(r['non_embedding']):>9} {r['flops_per_token']:>10.3g}")
    notes = ("kind: +Nsh N shared experts, sig sigmoid router scores, grpG/K G expert groups of which a token "
             "uses K (DeepSeek-V3), mla multi-head latent attention, mtpD D multi-token-prediction modules.",
             "FLOPs/tok: training (fwd + bwd) = 6 x (active non-embedding params + output head) + attention "
             "6 x layers x seq_len x n_heads x (qk + v head widths), at the preset's seq_len. MTP modules add a "
             "block, a projection and an output head each; every count includes them.")
    print()
    for note in notes:
        print(textwrap.fill(note, width=100, subsequent_indent="  "))
    return 0


SWEEP_EXAMPLES = """\
examples:
  moelab sweep noise --dry-run                       # a catalogue sweep: the trial table, nothing runs
  moelab sweep noise                                 # run it on a local Ray (all CPUs), results in results/
  moelab sweep my_sweep.yaml --storage runs/r1 --max-concurrent 2
  moelab sweep my_sweep.yaml --storage runs/r1 --resume   # after a crash: finish, skip finished trials
  moelab sweep noise --wandb                         # also log to W&B (offline unless configured)
  moelab sweep noise --verbose                       # a line per trial event under the progress line
  moelab sweep leverage-demo --set train.steps=100 --seeds 0   # a quicker look: fewer steps, one seed
  ray job submit --working-dir . -- moelab sweep my_sweep.yaml --storage s3://bucket/results

The sweep file is validated and expanded before Ray starts (exit 2 naming the bad key). Under `ray job
submit` (RAY_ADDRESS set) the sweep runs on that cluster, else on a local Ray. Trials run up to
--max-concurrent at a time (default: as many as the cluster's CPUs/GPUs hold), dense baselines before the
MoE trials upcycled from them; one line shows the progress (trials done / running / pending, tokens/s,
ETA), --verbose adds a line per trial event. A 1-worker trial trains inside its Ray Tune trial; trials of
several workers run as Ray Train runs, and so do 1-worker trials with `resources: {ray_train: true}`.
Results: ROOT/{trials,metrics,experts,routing}/sweep=NAME/*.parquet, read with moelab.results.open(ROOT);
Ray's state (checkpoints, Tune) under ROOT/_ray/NAME.
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


class LiveLine:
    """The sweep's one progress line (`SweepProgress`) and its log lines, on `stream`. On a terminal the
    progress line is redrawn in place under the log lines; elsewhere (a log file, CI, a pipe) a redraw would
    be one line per second, so it is printed when the trial counts change, or every `every_s` seconds."""

    def __init__(self, stream: Any, every_s: float = 30.0):
        self.stream, self.every_s = stream, every_s
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.shown = ""  # the progress line on screen (terminal only)
        self.counts: tuple[int, ...] | None = None
        self.printed_at = float("-inf")

    def progress(self, p: Any) -> None:
        import shutil
        import time

        text = p.line()
        if self.tty:
            text = text[:max(shutil.get_terminal_size().columns - 1, 20)]  # a wrapped line cannot be redrawn
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self.shown = text
            return
        counts, now = (p.finished, p.diverged, p.failed, p.running), time.monotonic()
        if counts != self.counts or now - self.printed_at >= self.every_s:
            self.counts, self.printed_at = counts, now
            print(text, file=self.stream, flush=True)

    def log(self, msg: str) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
        print(f"[moelab sweep] {msg}", file=self.stream, flush=True)
        if self.shown:
            self.stream.write(self.shown)
            self.stream.flush()

    def close(self) -> None:
        """Leave the last progress line on screen and move below it."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = ""


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.platform.spec import SpecError, expand, format_trials, load_spec
    from moelab.platform.store import redact_uri

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
        print(f"storage: {redact_uri(root)}")
        return 0
    from moelab.startup import startup_imports

    with startup_imports(freeze=args.fresh_process):  # the driver's Ray and Tune (see main)
        import ray.tune  # noqa: F401 - what run_sweep's controller imports when it starts

        from moelab.platform.controller import SweepError, format_report, run_sweep
        from moelab.platform.sink import WandbUnavailable

    live = LiveLine(sys.stderr)
    try:
        report = run_sweep(spec, storage=root, resume=args.resume, max_concurrent=args.max_concurrent,
                           wandb=args.wandb, log=live.log, verbose=args.verbose, progress=live.progress)
    except (SpecError, SweepError, WandbUnavailable) as e:
        live.close()
        print(f"moelab sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        live.close()
        print(f"moelab sweep: interrupted; finish with: moelab sweep {args.sweep} --storage {redact_uri(root)} "
              f"--resume", file=sys.stderr)
        return 130
    live.close()
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
        serve(args.root, host=args.host, port=args.port, refresh_s=args.refresh, allowed_hosts=args.allow_host or ())
    except KeyboardInterrupt:
        pass
    return 0


STORE_EXAMPLES = """\
examples:
  moelab store check results/                  # list damaged files and orphans; exit 1 if there are any
  moelab store check results/ --repair         # move them to results/_quarantine/<time>/, where no reader looks
  moelab store check s3://bucket/results --grace 600

Damaged: a .parquet file that does not read whole, lacks its table's key columns, or a trial file without
exactly one row. Orphans: temp files of writes interrupted more than --grace seconds ago, and metric /
expert / routing batches of a trial that has no trial row. Readers already skip damaged files (with a
warning naming them); --repair moves them aside (nothing is deleted; move a file back by hand to undo).
Exit status: 0 nothing found (or all moved), 1 something found and not moved, 2 no store there."""


def cmd_store(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.platform.store import check_store, redact_uri

    try:
        report = check_store(args.root, repair=args.repair, grace_s=args.grace)
    except (FileNotFoundError, ValueError) as e:
        print(f"moelab store check: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if report.ok:
        return 0
    if args.repair:
        print(f"moved {len(report.moved)} file(s) to {redact_uri(args.root).rstrip('/')}/_quarantine/")
        if report.held:
            print(f"{len(report.held)} sweep(s) not repaired while their writer runs: run again once it ends")
            return 1
        return 0
    print("run again with --repair to move them aside")
    return 1


ADVISE_EXAMPLES = """\
examples:
  moelab advise --budget 1e22 --params paper                     # Tian et al. 2025's Table 2 constants
  moelab advise --budget 1e22 --params paper --active-params 8.5e8 --max-total-params 1.75e10
  moelab advise --budget 3e19 --fits results --sweep efficiency-leverage   # a law fitted to your sweep
  moelab advise --budget 1e20 --fits results --gpus 64 --json

The law is Tian et al. 2025 Eq. 13 (arXiv 2507.17702): EL(A, G, C), the dense compute an MoE saves at equal
loss, from the activation ratio A = (top_k + shared) / (routed + shared) experts, the granularity
G = 2 d_model / d_expert (moelab's model.moe.granularity is d_ff / d_expert: both are printed) and the budget
C in training FLOPs. Printed: the G that maximises EL (the same at every A and C); EL against A, halving A
down to the smallest A that --max-total-params allows (or until EL is within 1% of its limit as A -> 0);
for each A the MoE shape that realises it at the active size (--active-params, else 20 tokens per active
parameter) and its per-GPU memory as `moelab plan` computes it (moe-1b's batch, sequence and micro-batch on
--gpus GPUs). Intervals come from a fitted law's bootstrap (--fits); Table 2's constants have none.
--fits ROOT reads the `efficiency_leverage` row of ROOT's fits table. Exit status: 0 advice printed,
2 bad arguments or no law to read."""


def _advise_number(flag: str, value: str | None, allowed: str, *, integer: bool = False) -> float | int | None:
    """A flag's value as a positive number; ValueError naming the flag and what is allowed."""
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not (x > 0 and x != float("inf")) or (integer and not x.is_integer()):
        raise ValueError(f"{flag}: got {value!r}; allowed: {allowed}")
    return int(x) if integer else x


def _advise_law(args: argparse.Namespace) -> tuple[dict, Any, dict, str, float]:
    """(constants, bootstrap draws or None, fit range, a line naming the source, confidence) for --fits ROOT
    [--sweep S]; ValueError saying what is missing and how to get it."""
    import math

    from moelab.ablations.el_law import law_from_row
    from moelab.platform.fitstable import read_fits

    how = ("fit Eq. 13 to the measured leverages with moelab.ablations.el_law.fit_efficiency_leverage and write "
           "el_law_rows(fit) with moelab.platform.fitstable.write_fits_table; or use --params paper for "
           "Tian et al.'s Table 2 constants")
    if "://" not in args.fits and not os.path.isdir(args.fits):
        raise ValueError(f"--fits: {args.fits!r} is not a directory (a results store root); {how}")
    fits = read_fits(args.fits, args.sweep)
    where = f"{args.fits}" + (f" (sweep {args.sweep})" if args.sweep else "")
    rows = fits[fits["law"] == "efficiency_leverage"] if len(fits) else fits
    if not len(rows):
        laws = sorted(set(fits["law"].dropna())) if len(fits) else []
        held = f"its fits table holds {', '.join(laws)}" if laws else "it has no fits table"
        raise ValueError(f"--fits: no `efficiency_leverage` law in {where}: {held}. To get one: {how}")
    ok = rows[rows["status"] == "ok"]
    if not len(ok):
        msgs = "; ".join(sorted(set(str(m) for m in rows["message"].dropna()))) or "no reason recorded"
        raise ValueError(f"--fits: the `efficiency_leverage` law in {where} was skipped ({msgs}). To get one: {how}")
    if ok["sweep"].nunique() > 1:
        raise ValueError(f"--sweep: {where} holds an `efficiency_leverage` law for several sweeps; allowed: "
                         f"--sweep {' | '.join(sorted(ok['sweep'].unique()))}")
    row = ok.iloc[-1]
    params, draws, fit_range = law_from_row(row["parameters"])
    conf = 0.95 if row["confidence"] is None or math.isnan(row["confidence"]) else float(row["confidence"])
    n_points = "?" if row["n_points"] is None or math.isnan(row["n_points"]) else int(row["n_points"])
    source = (f"fitted in {args.fits}, sweep {row['sweep']} ({n_points} points; "
              + (f"{conf:.0%} intervals from {len(draws)} bootstrap resamples of whole groups)" if draws is not None
                 else "no bootstrap draws stored: no intervals)"))
    return params, draws, fit_range, source, conf


def _advise_text(r: dict, source: str) -> str:
    """The human-readable report of `el_law.advise`."""
    def h(n: float) -> str:
        for unit, sc in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(n) >= sc:
                return f"{n / sc:.2f}{unit}"
        return f"{n:.0f}"

    def iv(x: list | None) -> str:
        return f"[{x[0]:.3g}, {x[1]:.3g}]" if x else ""

    def pct(x: float) -> str:
        return f"{100 * x:.3g}%"

    p, sh, conf = r["params"], r["shape"], f"{r['confidence']:.0%}"
    consts = ", ".join(f"{k}={v:.4g}" for k, v in p.items())
    lines = [f"efficiency leverage at a budget of {r['budget']:.3g} training FLOPs "
             f"(Tian et al. 2025 Eq. 13; log10 C, log2 G)",
             f"law: {source}", f"  {consts}"]
    lines += [f"note: {n}" for n in r["notes"]]
    g_iv = f"  {conf} interval {iv(r.get('G_opt_interval'))}" if r.get("G_opt_interval") else ""
    if r.get("G_opt_no_optimum"):
        g_iv += f" ({r['G_opt_no_optimum']} resamples have gamma <= 0: no optimum; left out)"
    lines += ["", f"optimal granularity G = 2 d_model / d_expert: {r['G_opt']:.4g} (2^{r['log2_G_opt']:.2f}){g_iv}",
              "  the vertex of the parabola in log2 G: the same at every A and C",
              "", f"shapes at {h(r['active_params'])} active non-embedding parameters "
                  f"({r['active_params_source']}); {h(sh['tokens'])} tokens at this budget",
              f"  {sh['n_layers']} layers, d_model {sh['d_model']}, {sh['n_heads']} heads; d_expert {sh['d_expert']} "
              f"(G = {sh['G_paper']:.4g}; moelab's G = d_ff / d_expert = {sh['G_moelab']:.4g} with d_ff {sh['d_ff']}); "
              f"top_k {sh['top_k']} routed + {sh['n_shared']} shared = {sh['active_experts']} experts per token"]
    plan = r["rows"][0]["plan"]
    lines += ["", f"EL against the activation ratio A at G = {r['G_opt']:.4g}; memory per GPU from `moelab plan` on "
                  f"{plan['gpus']} GPUs (seq {plan['seq']}, micro-batch {plan['micro_batch']}, batch {plan['batch']})",
              f"  {'A':>8} {'EL':>7} {conf + ' interval':>18}   {'n_experts':>9} {'top_k':>5} {'n_shared':>8} "
              f"{'d_expert':>8} {'A (shape)':>9} {'EL (shape)':>10} {'total':>8} {'GiB/GPU':>8} {'ep':>3}"]
    marks = []
    for row in r["rows"]:
        mark = ""
        if row["extrapolated"]:
            why = "; ".join(row["extrapolated"])
            if why not in marks:
                marks.append(why)
            mark = f" *{marks.index(why) + 1}"
        lines.append(f"  {pct(row['A_target']):>8} {row['EL']:>7.3f} {iv(row.get('EL_interval')) or '-':>18}   "
                     f"{row['n_experts']:>9} {row['top_k']:>5} {row['n_shared']:>8} {row['d_expert']:>8} "
                     f"{pct(row['A']):>9} {row['EL_shape']:>10.3f} {h(row['params_total']):>8} "
                     f"{row['plan']['mem_total_gib']:>8.1f} {row['plan']['ep']:>3}{mark}")
    sat = r["saturation"]
    lines.append(f"  limit as A -> 0 (A_hat -> A_start = {sat['A_start']:.3g}): EL {sat['EL']:.3f}"
                 + (f" {conf} interval {iv(sat.get('interval'))}" if sat.get("interval") else ""))
    lines.append(f"  stopped at {r['stop']}" + (f" (A_min = {pct(r['A_min'])})" if "A_min" in r else ""))
    if not r["intervals"]:
        lines.append("  no intervals: the law has no bootstrap draws (Table 2's constants come without any)")
    for i, why in enumerate(marks, 1):
        lines.append(f"  *{i} extrapolation: {why}")
    return "\n".join(lines)


def cmd_advise(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.ablations import el_law

    try:
        budget = _advise_number("--budget", args.budget, "a positive number of training FLOPs, e.g. 1e22")
        active = _advise_number("--active-params", args.active_params,
                                "a positive number of active non-embedding parameters, e.g. 1e9")
        max_total = _advise_number("--max-total-params", args.max_total_params,
                                   "a positive number of total parameters, e.g. 2e10")
        gpus = _advise_number("--gpus", args.gpus, "a positive integer", integer=True)
        if gpus not in el_law.allowed_gpus():
            raise ValueError(f"--gpus: got {args.gpus}; allowed: {el_law.allowed_gpus()} (moe-1b's batch of "
                             f"512 sequences at 4 per GPU must split evenly)")
        if args.sweep and not args.fits:
            raise ValueError(f"--sweep: got {args.sweep!r}; allowed: only with --fits ROOT")
        if args.params == "paper":
            params, draws, fit_range, conf = dict(el_law.PAPER_EL_PARAMS), None, None, 0.95
            source = "Tian et al. 2025 Table 2 constants (--params paper)"
        else:
            params, draws, fit_range, source, conf = _advise_law(args)
        r = el_law.advise(budget, params, draws=draws, fit_range=fit_range, paper=args.params == "paper",
                          active_params=active, max_total_params=max_total, gpus=gpus, confidence=conf)
    except ValueError as e:
        msg = str(e)
        for arg, flag in (("max_total_params:", "--max-total-params:"), ("active_params:", "--active-params:"),
                          ("gamma:", "--fits: the law's gamma:")):
            if msg.startswith(arg):
                msg = flag + msg[len(arg):]
        print(f"moelab advise: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2, default=float) if args.json else _advise_text(r, source))
    return 0


EXPORT_EXAMPLES = """\
examples:
  moelab export runs/moe-tiny-s0 hf/moe-tiny                    # auto: the format that fits (here mixtral)
  moelab export runs/dense hf/dense --format qwen2 --dtype bfloat16
  moelab export runs/a/ckpt-00000400 hf/a --force               # a sharded checkpoint; replace hf/a
  moelab export hf/qwen3-moe hf/qwen3-moe-again                 # a Hugging Face directory, re-exported

Writes OUT_DIR/config.json and model.safetensors (shards + model.safetensors.index.json past
--max-shard-gb); transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR) computes the same logits, and
`--init-from OUT_DIR` or moelab.trainers.hf.load_hf read it back. RUN_DIR: a moelab run directory (its newest
checkpoint: checkpoint.pt or ckpt-<step>/), a checkpoint file or directory, or a Hugging Face directory.
Formats: auto, llama, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe (MoE); deepseek_v3 (MLA,
dense or MoE: sigmoid scores, expert biases, groups, routed scaling, MTP). A feature the format cannot hold
(shared experts in mixtral, sigmoid scores outside deepseek_v3, a capacity factor, ...) is refused, naming
the formats that can; nothing is approximated. No tokenizer is written. The directory appears whole or not
at all; a non-empty OUT_DIR is refused unless --force. Exit status: 0 exported, 2 refused (the message says why)."""


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from moelab.trainers.config import ConfigError
    from moelab.trainers.hf import HFLoadError
    from moelab.trainers.hf_export import ExportError, export

    if not args.max_shard_gb > 0:
        print(f"moelab export: --max-shard-gb: got {args.max_shard_gb}; allowed: a positive number", file=sys.stderr)
        return 2
    try:
        r = export(args.run_dir, args.out_dir, args.format, force=args.force, dtype=args.dtype,
                   max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ExportError, ConfigError, HFLoadError, FileNotFoundError) as e:
        print(f"moelab export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} as {r['format']} ({r['params'] / 1e6:.2f}M params, {r['dtype']}) -> "
          f"{r['out_dir']}: {', '.join(r['files'])}")
    print(f"load with: transformers.AutoModelForCausalLM.from_pretrained({r['out_dir']!r})")
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
    pl.add_argument("--activation-checkpointing", choices=("none", "selective", "full"), default="",
                    help="recompute in the backward: selective (norms, attention), full (every block); default: "
                         "the preset's train.activation_checkpointing")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_plan)
    sw = sub.add_parser("sweep", help="run a sweep (a grid of training runs on Ray) into the results store",
                        description="Run a sweep file or a catalogue sweep with Ray Tune (+ Ray Train); "
                                    "every trial's metrics go to Parquet tables under --storage.",
                        epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("sweep", metavar="FILE_OR_CATALOGUE_NAME",
                    help="a sweep YAML file, or the name of a catalogue sweep (e.g. noise)")
    sw.add_argument("--dry-run", action="store_true", help="print the trial table (params, FLOPs) and exit")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key for every trial, over the file's `common` (repeatable), "
                         "e.g. --set train.steps=100")
    sw.add_argument("--seeds", type=int, nargs="+", metavar="N",
                    help="replace the sweep's seeds (the grid's and every baseline's), e.g. --seeds 0")
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
    sw.add_argument("--verbose", "-v", action="store_true",
                    help="also print a line per trial event (running, resumed, finished, failed, diverged)")
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
                               "  moelab dashboard s3://bucket/results --host 0.0.0.0 --port 8080 "
                               "--allow-host myhost.lan",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    da.add_argument("root", help="the results store (a directory or s3://... URI)")
    da.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    da.add_argument("--port", type=int, default=8050)
    da.add_argument("--refresh", type=float, default=10.0, help="auto-refresh period in seconds (0 = off)")
    da.add_argument("--allow-host", action="append", metavar="NAME",
                    help="also serve requests whose Host header is NAME (repeatable; '*' = any). Default: "
                         "127.0.0.1, localhost, ::1 and --host; other names get 403 (DNS rebinding)")
    da.set_defaults(func=cmd_dashboard)
    so = sub.add_parser("store", help="check a results store for damaged files and orphans (and repair it)",
                        epilog=STORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    so_sub = so.add_subparsers(dest="store_command", required=True)
    ck = so_sub.add_parser("check", help="read every file of the store; list damaged files and orphans",
                           epilog=STORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ck.add_argument("root", help="the results store (a directory or s3://... URI)")
    ck.add_argument("--repair", action="store_true",
                    help="move damaged files and orphans to ROOT/_quarantine/<time>/ (readers ignore it)")
    ck.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                    help="a temp file younger than this may be a write in progress: not an orphan (default 3600)")
    ck.set_defaults(func=cmd_store)
    ex = sub.add_parser("export", help="write a run's model as a Hugging Face directory (config.json + "
                                       "safetensors) that transformers loads with the same logits",
                        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a moelab run directory, checkpoint, or Hugging Face dir")
    ex.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (new or empty, or --force)")
    ex.add_argument("--format", default="auto", metavar="FORMAT",
                    help="auto (default), llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3")
    ex.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="tensor dtype written (default: the checkpoint's, float32 for moelab runs)")
    ex.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB",
                    help="split the weights into safetensors shards of at most this many GiB (default 5)")
    ex.set_defaults(func=cmd_export)
    pr = sub.add_parser("presets", help="list presets with parameter and FLOP counts",
                        epilog="example:\n  moelab presets\n  moelab presets --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_presets)
    ad = sub.add_parser("advise", help="the MoE design the efficiency-leverage law favours at a compute budget "
                                       "(granularity, activation ratio, shapes, memory)",
                        description="Advice from Tian et al. 2025 Eq. 13: the granularity that maximises "
                                    "efficiency leverage, EL against the activation ratio, shapes and memory.",
                        epilog=ADVISE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ad.add_argument("--budget", required=True, metavar="FLOPS", help="training compute in FLOPs, e.g. 1e22")
    src = ad.add_mutually_exclusive_group(required=True)
    src.add_argument("--fits", metavar="ROOT", help="a results store whose fits table holds an "
                                                    "`efficiency_leverage` law")
    src.add_argument("--params", choices=["paper"], help="paper: Tian et al. 2025's Table 2 constants")
    ad.add_argument("--sweep", help="with --fits: the sweep whose law to use (needed when several have one)")
    ad.add_argument("--max-total-params", metavar="N", help="the largest total parameter count allowed: sets "
                                                             "the smallest activation ratio listed")
    ad.add_argument("--active-params", metavar="N", help="active non-embedding parameters of the shapes "
                                                          "(default: 20 tokens per parameter at the budget)")
    ad.add_argument("--gpus", default="8", metavar="N", help="GPUs for the memory figures (default 8)")
    ad.add_argument("--json", action="store_true", help="machine-readable output")
    ad.set_defaults(func=cmd_advise)
    return p


def main(argv: list[str] | None = None) -> int:
    from moelab.startup import startup_imports

    # A `moelab` process's heavy imports (torch, already for the parser; the trainer; Ray and Tune) run without
    # the garbage collector, and `train` and `sweep` freeze them (moelab.startup) when this call is the process's
    # start: not in a caller that had torch already (a test, a notebook), whose objects are its own.
    fresh_process = "torch" not in sys.modules
    with startup_imports(freeze=False):
        parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    args.fresh_process = fresh_process
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
