"""The GPU check: everything this repository can only verify on a CUDA GPU, in one command (a few minutes on
one H100/H200), written up as a markdown section ready to paste into bench/RESULTS.md.

    make gpu-check                           # = .venv/bin/python bench/gpu_check.py --out bench/gpu_check.md
    python3 bench/gpu_check.py [--out PATH]  # the same with any python that has torch (e.g. the system's)
    python3 bench/gpu_check.py --dry-run     # the plan and the environment, nothing run

Checks, in order (each one's failure is recorded and the others still run):
  kernels      pytest tests/kernels on the CUDA device (compiled Triton kernels against the reference,
               the host-sync test, the custom op under torch.compile)
  bench        moelab.kernels.bench for the OLMoE-like and fine-grained shapes at their full token counts
               and at small ones (reference, triton, grouped_mm peer, dense GEMM; TFLOP/s and share of dense)
  train        30 steps of `moe-1b` cut to 4 layers: MFU (from the second log window on), tokens/s, peak
               memory, loss; then the same with train.compile (Inductor), and the two losses side by side
  syncs        host synchronisations per training step, counted with torch.cuda.set_sync_debug_mode("warn")
Exit status: 0 every check passed, 1 a check failed, 3 no CUDA device (nothing checked), 2 bad arguments.
`--allow-cpu` runs the same code at toy sizes on CPU (the test suite's smoke run; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout with any python: moelab need not be installed

import torch  # noqa: E402

EXIT_FAILED, EXIT_NO_CUDA = 1, 3
DEFAULT_OUT = ROOT / "bench" / "gpu_check.md"


@dataclass
class Sizes:
    """What the checks run: the GPU sizes, or toy ones for --allow-cpu."""

    test_paths: tuple[str, ...] = ("tests/kernels",)
    test_timeout_s: int = 360
    bench_shapes: tuple[tuple[str, int], ...] = (("olmoe", 16384), ("olmoe", 1024), ("fine", 16384),
                                                 ("fine", 512))
    bench_impls: tuple[str, ...] = ("reference", "triton", "grouped_mm", "dense")
    bench_iters: tuple[int, int] = (2, 5)  # warm-up, timed
    preset: str = "moe-1b"
    overrides: dict = field(default_factory=lambda: {
        "model.n_layers": 4, "train.steps": 30, "train.log_every": 10, "train.eval_every": 0,
        "train.ckpt_every": 0, "train.batch_size": 32, "train.micro_batch_size": 8, "train.seq_len": 2048})
    sync_steps: int = 2


SMOKE = Sizes(test_paths=("tests/kernels/test_reference.py",), test_timeout_s=300,
              bench_shapes=(("tiny", 64), ("tiny", 16)), bench_impls=("reference", "triton", "dense"),
              bench_iters=(0, 1), preset="moe-tiny",
              overrides={"train.steps": 6, "train.log_every": 2, "train.eval_every": 0, "train.ckpt_every": 0,
                         "train.batch_size": 4, "train.seq_len": 32},
              sync_steps=1)


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    summary: str  # one line for the table
    details: list[str] = field(default_factory=list)  # markdown below the table


def _run(name, fn, *args) -> list[Result]:
    """Run one check; an exception is a failed check with its last lines, not the end of the run."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the other checks still run
        tb = traceback.format_exc().strip().splitlines()
        return [Result(name, False, time.perf_counter() - t0, f"error: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                       ["```", *tb[-12:], "```"])]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out if isinstance(out, list) else [out]


# ----------------------------------------------------------------------------------------------------------
# Checks


def check_kernel_tests(sizes: Sizes) -> Result:
    """pytest over the kernel tests in a fresh process: on a CUDA machine tests/kernels/conftest.py leaves
    TRITON_INTERPRET unset, so the compiled kernels run (an inherited TRITON_INTERPRET=1 would interpret)."""
    t0 = time.perf_counter()
    if importlib.util.find_spec("pytest") is None:
        return Result("kernel tests", False, 0.0, f"pytest is not installed for {sys.executable}")
    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    # -rfE: the ids of failures and errors in the short summary (the project's addopts already hold -q)
    cmd = [sys.executable, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", *sizes.test_paths]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=sizes.test_timeout_s)
    except subprocess.TimeoutExpired:
        return Result("kernel tests", False, time.perf_counter() - t0,
                      f"timed out after {sizes.test_timeout_s} s: {' '.join(cmd[2:])}")
    lines = (r.stdout + r.stderr).strip().splitlines()
    tally = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                 lines[-1] if lines else "no output")
    details = [] if r.returncode == 0 else ["```", *lines[-30:], "```"]
    return Result(f"kernel tests ({', '.join(sizes.test_paths)})", r.returncode == 0, time.perf_counter() - t0,
                  tally, details)


def check_bench(sizes: Sizes, device: torch.device) -> list[Result]:
    """The kernel benchmark per (shape, tokens). Fails when triton errors or is off the reference by more
    than bf16 rounding explains."""
    from moelab.kernels import bench

    out = []
    for name, tokens in sizes.bench_shapes:
        t0 = time.perf_counter()
        shape = bench.SHAPES[name]
        shape = bench.Shape(shape.name, shape.d, shape.de, shape.E, shape.k, tokens, shape.dtype)
        rows = bench.bench_shape(shape, list(sizes.bench_impls), device, *sizes.bench_iters)
        by = {r["impl"]: r for r in rows}
        tri = by.get("triton", {})
        tol = 2e-2 if shape.dtype == torch.bfloat16 else 1e-4
        problems = [f"{r['impl']}: {r['error']}" for r in rows if "error" in r and r["impl"] != "grouped_mm"]
        if "error" not in tri and tri.get("rel_err", 0.0) > tol:
            problems.append(f"triton rel err {tri['rel_err']:.1e} > {tol:.0e}")
        if "error" in tri or "fwdbwd_tflops" not in tri:
            summary = "triton did not run"
        else:
            summary = (f"triton fwd+bwd {tri['fwdbwd_ms']:.3f} ms, {tri['fwdbwd_tflops']:.1f} TFLOP/s"
                       + (f" ({tri['fwdbwd_frac']:.0%} of dense)" if "fwdbwd_frac" in tri else "")
                       + (f", {by['grouped_mm']['fwdbwd_ms'] / tri['fwdbwd_ms']:.2f}x grouped_mm"
                          if "fwdbwd_ms" in by.get("grouped_mm", {}) else ""))
        if problems:
            summary += "; " + "; ".join(problems)
        details = [bench.format_table(shape, rows, markdown=True).replace("### ", "#### ", 1)]
        tuned = bench.tuned_configs()
        if tuned:
            details.append(f"- triton autotuned configs so far: {tuned}\n")
        out.append(Result(f"bench {name}, {tokens} tokens", not problems, time.perf_counter() - t0, summary,
                          details))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_once(sizes: Sizes, compile_: bool, tmp: Path) -> tuple[list[dict], float]:
    from moelab.trainers.config import load_run_config
    from moelab.trainers.loop import train

    rc = load_run_config(sizes.preset, {**sizes.overrides, "train.compile": compile_})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = tmp / ("compiled" if compile_ else "eager")
    train(rc, out, progress=False)
    return _rows(out / "metrics.jsonl"), time.perf_counter() - t0


def _figures(rows: list[dict]) -> dict:
    mfu = [r["mfu"] for r in rows if r.get("mfu") is not None and math.isfinite(r["mfu"])]
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    mem = rows[-1].get("max_mem_gib", float("nan"))
    return {"mfu": statistics.median(mfu) if mfu else float("nan"), "tps": statistics.median(tps),
            "mem": mem if mem is not None else float("nan"), "loss0": rows[0]["loss"], "loss": rows[-1]["loss"]}


def check_train(sizes: Sizes) -> list[Result]:
    """The training loop end to end, eager then compiled: MFU (first window excluded by the loop: it holds
    compilation and autotuning), tokens/s (median over the later windows), peak memory, loss."""
    n_layers = sizes.overrides.get("model.n_layers")
    label = f"train {sizes.preset}" + (f", {n_layers} layers" if n_layers else "") + \
        f", {sizes.overrides['train.steps']} steps"
    out = []
    with tempfile.TemporaryDirectory() as d:
        eager = None
        for compile_ in (False, True):
            t0 = time.perf_counter()
            name = label + (", train.compile" if compile_ else "")
            try:
                rows, secs = _train_once(sizes, compile_, Path(d))
            except Exception as exc:  # noqa: BLE001
                tb = traceback.format_exc().strip().splitlines()
                out.append(Result(name, False, time.perf_counter() - t0,
                                  f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                  ["```", *tb[-12:], "```"]))
                continue
            f = _figures(rows)
            ok = math.isfinite(f["loss"]) and f["loss"] < f["loss0"]
            mfu = f"MFU {f['mfu']:.1%}" if math.isfinite(f["mfu"]) else "MFU n/a (unknown GPU peak)"
            mem = f"peak mem {f['mem']:.1f} GiB" if math.isfinite(f["mem"]) else "peak mem n/a (CPU)"
            summary = (f"{mfu}, {f['tps']:,.0f} tok/s, {mem}, loss {f['loss0']:.3f} -> "
                       f"{f['loss']:.3f}, first window {rows[0]['wall_s']:.1f} s")
            if compile_ and eager is not None:
                summary += (f"; loss at the last step {f['loss'] - eager['loss']:+.2e} vs eager, tokens/s "
                            f"{f['tps'] / eager['tps']:.2f}x eager")
            if not ok:
                summary += "; the loss did not fall"
            out.append(Result(name, ok, secs, summary))
            if not compile_:
                eager = f
    return out


def check_syncs(sizes: Sizes) -> Result:
    """Host synchronisations of whole training steps (`Trainer.train_step`, which also reads the step's
    metrics; `run` reads them once per log line), counted by CUDA's sync debug mode: each one is a warning
    naming the Python line that caused it. Informational: the metric reads are syncs by design."""
    from moelab.trainers.config import load_run_config
    from moelab.trainers.loop import StepStats, Trainer

    if not torch.cuda.is_available():
        return Result("host syncs per step", True, 0.0, "skipped: CUDA only")
    t0 = time.perf_counter()
    rc = load_run_config(sizes.preset, {**sizes.overrides, "train.steps": sizes.sync_steps + 1})
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(rc, d, progress=False)
        tr.train_step(StepStats())  # warm-up: autotuning and first-call work are not the steady state
        torch.cuda.synchronize()
        sites: Counter = Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(sizes.sync_steps):
                    tr.train_step(StepStats())
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                sites[f"{Path(w.filename).relative_to(ROOT) if Path(w.filename).is_relative_to(ROOT) else w.filename}"
                      f":{w.lineno}"] += 1
        del tr
    per_step = sum(sites.values()) / sizes.sync_steps
    details = ["| site | syncs per step |", "|---|---:|"]
    details += [f"| {s} | {n / sizes.sync_steps:g} |" for s, n in sites.most_common(12)]
    return Result("host syncs per step", True, time.perf_counter() - t0,
                  f"{per_step:g} per Trainer.train_step, metric reads included ({len(sites)} sites, "
                  f"{sizes.sync_steps} steps counted)",
                  details + [""])


# ----------------------------------------------------------------------------------------------------------
# Report


def _versions() -> str:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    cuda = torch.version.cuda or "none"
    return f"torch {torch.__version__} (CUDA {cuda}), triton {version('triton')}, python {sys.version.split()[0]}"


def _commit() -> str:
    try:  # read-only
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _peak_line(device: torch.device) -> str:
    from moelab.trainers.hardware import PEAK_ENV, peak_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = peak_flops(device)
    src = f"${PEAK_ENV}" if os.environ.get(PEAK_ENV) else "moelab.trainers.hardware"
    if peak is None:
        return f"MFU peak: unknown for this GPU (set ${PEAK_ENV}); MFU not reported"
    unit = "TFLOP/s (dense bf16)" if device.type == "cuda" else "TFLOP/s (measured fp32 GEMM)"
    return f"MFU peak: {peak / 1e12:.1f} {unit}, from {src}"


def report(results: list[Result], device: torch.device, started: datetime.datetime, smoke: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: figures mean nothing)"
    ok = all(r.ok for r in results)
    lines = [f"## GPU check: {name}, {started:%Y-%m-%d %H:%M} UTC",
             "",
             f"`make gpu-check` (bench/gpu_check.py) at commit {_commit()}; {_versions()}. {_peak_line(device)}. "
             f"Total {sum(r.seconds for r in results):.0f} s. "
             + ("Every check passed." if ok else f"FAILED: {', '.join(r.name for r in results if not r.ok)}."),
             "",
             "| check | result | time | figures |",
             "|---|---|---:|---|"]
    lines += [f"| {r.name} | {'passed' if r.ok else '**FAILED**'} | {r.seconds:.0f} s | {r.summary} |"
              for r in results]
    lines.append("")
    for r in results:
        if r.details:
            lines += [f"### {r.name}", "", *r.details, ""]
    if smoke:
        lines.insert(2, "_Smoke run on CPU (--allow-cpu): it exercises the checks, it measures nothing._\n")
    return "\n".join(lines).rstrip() + "\n"


def plan(sizes: Sizes) -> str:
    shapes = ", ".join(f"{n} at {t} tokens" for n, t in sizes.bench_shapes)
    return "\n".join([
        "gpu_check plan:",
        f"  kernels  {sys.executable} -m pytest {' '.join(sizes.test_paths)}  (CUDA device, compiled kernels)",
        f"  bench    moelab.kernels.bench: {shapes}; impls {', '.join(sizes.bench_impls)}",
        f"  train    {sizes.preset} with {sizes.overrides}, eager then train.compile",
        f"  syncs    {sizes.sync_steps} training steps under torch.cuda.set_sync_debug_mode('warn')",
        f"  environment: {_versions()}; pytest {'found' if importlib.util.find_spec('pytest') else 'MISSING'}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"markdown report path (default {DEFAULT_OUT})")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the environment; run nothing")
    p.add_argument("--allow-cpu", action="store_true", help="toy sizes on CPU (tests only; figures mean nothing)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: kernels, bench, train, syncs")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    bad = skip - {"kernels", "bench", "train", "syncs"}
    if bad:
        p.error(f"--skip: unknown check(s) {sorted(bad)}; allowed: kernels, bench, train, syncs")
    sizes = SMOKE if args.allow_cpu else Sizes()
    has_cuda = torch.cuda.is_available()
    if args.dry_run:
        print(plan(sizes))
    if not has_cuda and not args.allow_cpu:
        print(f"gpu_check: no CUDA device here ({_versions()}); nothing was checked. Run it on a machine with an "
              f"NVIDIA GPU (make gpu-check).", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.dry_run:
        return 0
    device = torch.device("cuda" if has_cuda else "cpu")
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"gpu_check on {torch.cuda.get_device_name(device) if has_cuda else 'CPU (smoke)'}: {_versions()}",
          flush=True)
    results: list[Result] = []
    checks = [("kernels", check_kernel_tests, (sizes,)), ("bench", check_bench, (sizes, device)),
              ("train", check_train, (sizes,)), ("syncs", check_syncs, (sizes,))]
    for key, fn, fargs in checks:
        if key in skip:
            continue
        for r in _run(key, fn, *fargs):
            print(f"  {'ok  ' if r.ok else 'FAIL'} {r.name}: {r.summary} ({r.seconds:.0f} s)", flush=True)
            results.append(r)
    text = report(results, device, started, args.allow_cpu)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    failed = [r.name for r in results if not r.ok]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'every check passed'}; report: {out}")
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
