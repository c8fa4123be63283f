"""Benchmark of the routed-expert compute: `python -m moelab.kernels.bench [--shapes ...] [--markdown]`.

GPU only (on a machine without CUDA it prints why and exits with status 2). Per shape, a table of:
  reference      moelab.kernels.reference (sorted slots, per-expert torch.mm loop, hand-written backward)
  triton         moelab.kernels.triton_moe, combine="gather" (deterministic); triton-atomic: combine="atomic"
  loop           the source documents' per-expert masked loop (`for e: mask = idx == e ...`), autograd backward
  grouped_mm     the torchtitan-style peer: slots sorted by expert (groups padded to 16 rows), two
                 `torch._grouped_mm` calls with offsets, autograd backward (skipped if unavailable)
  dense          one dense GEMM of the same FLOPs: [S, d] @ [d, 3 d_e], S = tokens * k
with forward and forward+backward time (CUDA events, warmup, median), TFLOP/s and the fraction of the dense
GEMM's rate measured in the same run. FLOPs: 6 d d_e per routed slot forward (gate/up 4 d d_e, down
2 d d_e), three times that for forward+backward. "fwd" is a training forward (grad enabled, state saved).
Routing is uniform random top-k (distinct experts per token), so expert loads are near-balanced.

`--compile-check SM` needs no GPU: it compiles every Triton kernel config for sm_SM with Triton's bundled
ptxas and reports shared memory, registers and spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.kernels import reference


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    de: int
    E: int
    k: int
    tokens: int
    dtype: torch.dtype = torch.bfloat16


SHAPES = {
    "olmoe": Shape("olmoe", 2048, 1024, 64, 8, 16384),
    "mixtral": Shape("mixtral", 4096, 14336, 8, 2, 8192),
    "fine": Shape("fine", 2048, 256, 128, 16, 16384),
    # For the CPU smoke test (--allow-cpu) only.
    "tiny": Shape("tiny", 64, 48, 4, 2, 64, torch.float32),
}
DEFAULT_SHAPES = ("olmoe", "mixtral", "fine")
IMPLS = ("reference", "triton", "triton-atomic", "loop", "grouped_mm", "dense")

# Goals from issue 4 for the OLMoE-like shape (fwd+bwd).
GOAL_DENSE_FRACTION = 0.75
GOAL_LOOP_SPEEDUP = 5.0


# ----------------------------------------------------------------------------------------------------------
# Peers


def loop_moe(x, w_gate_up, w_down, topk_idx, topk_weight):
    """The seed's per-expert masked loop: one boolean mask per expert, autograd through w[e]."""
    out = torch.zeros_like(x)
    de = w_down.shape[2]
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(topk_idx == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w_gate_up[e].t()
        y = (F.silu(h[:, :de]) * h[:, de:]) @ w_down[e].t()
        out = out.index_add(0, tok, y * topk_weight[tok, slot, None].to(y.dtype))
    return out


ALIGN_M = 16  # torchtitan pads each expert's group to a multiple of 8/16 rows for the grouped GEMM


def grouped_mm_moe(x, w_gate_up, w_down, topk_idx, topk_weight):
    """torchtitan-style: gather tokens in expert order (groups padded to ALIGN_M rows), two grouped GEMMs
    with offsets, weight and scatter-add back; autograd backward."""
    from moelab.kernels.triton_moe import routing_metadata

    T, d = x.shape
    E = w_gate_up.shape[0]
    de = w_down.shape[2]
    k = topk_idx.shape[1]
    S = T * k
    meta = routing_metadata(topk_idx, E, ALIGN_M)  # sorted slot ids, each group padded with sentinel S
    counts = meta.offsets[1:] - meta.offsets[:-1]
    offs = torch.cumsum((counts + ALIGN_M - 1) // ALIGN_M * ALIGN_M, 0, dtype=torch.int32)
    slots = meta.padded_slots.long()
    valid = slots < S
    tok = torch.where(valid, slots // k, T)  # row T = a zero row / a discarded output row
    xs = torch.cat([x, x.new_zeros(1, d)]).index_select(0, tok)
    h = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)
    a = F.silu(h[:, :de]) * h[:, de:]
    y = torch._grouped_mm(a, w_down.transpose(-2, -1), offs=offs)
    wv = torch.cat([topk_weight.reshape(-1), topk_weight.new_zeros(1)])[torch.where(valid, slots, S)]
    # Rows past the last offset are not written by the grouped GEMM: mask them (their weight is 0 anyway).
    y = torch.where(valid[:, None], y * wv[:, None].to(y.dtype), 0)
    out = x.new_zeros(T + 1, d).index_add(0, tok, y)
    return out[:T]


def _triton(combine):
    def run(x, w_gate_up, w_down, topk_idx, topk_weight):
        from moelab.kernels import triton_moe

        return triton_moe.moe_experts(x, w_gate_up, w_down, topk_idx, topk_weight, combine=combine)

    return run


MOE_IMPLS = {
    "reference": reference.moe_experts,
    "triton": _triton("gather"),
    "triton-atomic": _triton("atomic"),
    "loop": loop_moe,
    "grouped_mm": grouped_mm_moe,
}


# ----------------------------------------------------------------------------------------------------------
# Timing


def _timer(device: torch.device):
    """Returns time_ms(fn, warmup, iters) -> median milliseconds (CUDA events on GPU, perf_counter on CPU)."""

    def time_ms(fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return time_ms


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, d, de, E, k = shape.tokens, shape.d, shape.de, shape.E, shape.k
    x = torch.randn(T, d, generator=g).to(device, shape.dtype)
    wgu = (torch.randn(E, 2 * de, d, generator=g) / d**0.5).to(device, shape.dtype)
    wd = (torch.randn(E, d, de, generator=g) / de**0.5).to(device, shape.dtype)
    # Uniform random top-k (distinct experts per token), softmax gate weights over the chosen k.
    logits = torch.randn(T, E, generator=g)
    top = logits.topk(k, dim=-1)
    idx = top.indices.to(device)
    w = top.values.softmax(-1).to(device)
    dout = torch.randn(T, d, generator=g).to(device, shape.dtype)
    return x, wgu, wd, idx, w, dout


def bench_shape(shape: Shape, impls, device, warmup: int, iters: int) -> list[dict]:
    time_ms = _timer(device)
    x, wgu, wd, idx, w, dout = make_inputs(shape, device)
    S = shape.tokens * shape.k
    flops_fwd = 6.0 * S * shape.d * shape.de
    rows = []
    ref_out = None
    for name in impls:
        row = {"shape": shape.name, "impl": name}
        try:
            if name == "dense":
                a = torch.randn(S, shape.d, device=device, dtype=shape.dtype, requires_grad=True)
                b = torch.randn(3 * shape.de, shape.d, device=device, dtype=shape.dtype, requires_grad=True)
                gy = torch.randn(S, 3 * shape.de, device=device, dtype=shape.dtype)

                def fwd(a=a, b=b):
                    return F.linear(a, b)

                def fwdbwd(a=a, b=b, gy=gy):
                    torch.autograd.grad(F.linear(a, b), (a, b), gy)
            else:
                fn = MOE_IMPLS[name]
                if name == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
                    raise RuntimeError("torch._grouped_mm not available in this torch")
                leaves = [t.detach().clone().requires_grad_() for t in (x, wgu, wd, w)]

                def fwd(fn=fn, leaves=leaves):
                    return fn(leaves[0], leaves[1], leaves[2], idx, leaves[3])

                def fwdbwd(fn=fn, leaves=leaves):
                    out = fn(leaves[0], leaves[1], leaves[2], idx, leaves[3])
                    torch.autograd.grad(out, leaves, dout)

                with torch.no_grad():
                    out = fn(x, wgu, wd, idx, w).float()
                if name == "reference":
                    ref_out = out
                elif ref_out is not None:
                    row["rel_err"] = ((out - ref_out).norm() / ref_out.norm()).item()
                del out
            row["fwd_ms"] = time_ms(fwd, warmup, iters)
            row["fwdbwd_ms"] = time_ms(fwdbwd, warmup, iters)
            row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
            row["fwdbwd_tflops"] = 3 * flops_fwd / row["fwdbwd_ms"] / 1e9
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = next((r for r in rows if r["impl"] == "dense" and "error" not in r), None)
    for r in rows:
        if dense and "error" not in r:
            r["fwd_frac"] = r["fwd_tflops"] / dense["fwd_tflops"]
            r["fwdbwd_frac"] = r["fwdbwd_tflops"] / dense["fwdbwd_tflops"]
    return rows


# ----------------------------------------------------------------------------------------------------------
# Offline compile check (no GPU needed: Triton's bundled ptxas; the runtime's argument specialisation is
# reproduced: stride 1 -> constant, multiples of 16 -> divisibility hints)

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # max dynamic shared memory per block, bytes


def compile_check(arch: int, shape: Shape, only: set[str] | None = None) -> list[dict]:
    """Compile every kernel (or those named in `only`, e.g. {"gate_up"}) in every tuned config for `shape` on
    sm_`arch`; report shared memory, registers, spilled bytes (local stack) and the MMA instruction per
    config. Needs TRITON_INTERPRET unset."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moelab.kernels import triton_moe as tm

    if tm.INTERPRETED:
        raise RuntimeError("--compile-check compiles for a GPU: run it without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")
    d, de, E, k, T = shape.d, shape.de, shape.E, shape.k, shape.tokens
    S = T * k
    BM = tm.block_m_for(S, E, arch)
    NB = triton.cdiv(S, BM) + E
    x = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16"}[shape.dtype]
    dot_t, prec = tm._dot_types(shape.dtype)
    i32 = "*i32"
    f32 = "*fp32"

    def rows(**kw):
        return dict(BLOCK_M=BM, GROUP_M=8, DOT_T=dot_t, PREC=prec, **kw)

    cfg = tm._config(S, E)
    fixed = [triton.Config({"BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)]
    kernels = [
        ("gate_up", tm._gate_up_kernel, tm._gpu_configs("gate_up"),
         dict(x_ptr=x, w_ptr=x, h_ptr=x, a_ptr=x, slots_ptr=i32, block_expert_ptr=i32),
         dict(S=S, K_TOP=k, D=d, DE=de, n_blocks=NB, stride_xt=d, stride_xd=1, stride_we=2 * de * d,
              stride_wn=d, stride_wk=1, stride_hs=2 * de, stride_hn=1, stride_as=de, stride_an=1),
         rows(SAVE_H=True)),
        ("down (fwd)", tm._grouped_gemm_kernel, tm._gpu_configs("gemm"),
         dict(a_ptr=x, b_ptr=x, c_ptr=x, w_ptr=f32, slots_ptr=i32, block_expert_ptr=i32),
         dict(S=S, K_TOP=k, N=d, K=de, n_blocks=NB, stride_as=de, stride_ak=1, stride_be=d * de, stride_bk=1,
              stride_bn=de, stride_cr=d, stride_cn=1), rows(SCALE=True, ATOMIC=False)),
        ("down (fwd, atomic)", tm._grouped_gemm_kernel, fixed,
         dict(a_ptr=x, b_ptr=x, c_ptr=f32, w_ptr=f32, slots_ptr=i32, block_expert_ptr=i32),
         dict(S=S, K_TOP=k, N=d, K=de, n_blocks=NB, stride_as=de, stride_ak=1, stride_be=d * de, stride_bk=1,
              stride_bn=de, stride_cr=d, stride_cn=1), rows(SCALE=True, ATOMIC=True)),
        ("combine", tm._combine_kernel, [triton.Config({"BLOCK_T": 32, "BLOCK_N": 128}, num_warps=4)],
         dict(y_ptr=x, idx_ptr="*i64", out_ptr=x),
         dict(T=T, K_TOP=k, N=d, stride_ys=d, stride_yn=1, stride_ot=d, stride_on=1), {}),
        ("down bwd (dh, dw)", tm._down_bwd_kernel, tm._gpu_configs("down_bwd"),
         dict(dout_ptr=x, w2_ptr=x, h_ptr=x, a_ptr=x, w_ptr=f32, dh_ptr=x, dwp_ptr=f32, slots_ptr=i32,
              block_expert_ptr=i32),
         dict(S=S, K_TOP=k, D=d, DE=de, n_blocks=NB, stride_dt=d, stride_dd=1, stride_we=d * de, stride_wd=de,
              stride_wn=1, stride_hs=2 * de, stride_hn=1, stride_as=de, stride_an=1, stride_gs=2 * de,
              stride_gn=1, stride_pp=S), rows(COMPUTE_DW=True)),
        ("dx (gate_up bwd)", tm._grouped_gemm_kernel, tm._gpu_configs("gemm"),
         dict(a_ptr=x, b_ptr=x, c_ptr=x, w_ptr=x, slots_ptr=i32, block_expert_ptr=i32),
         dict(S=S, K_TOP=k, N=d, K=2 * de, n_blocks=NB, stride_as=2 * de, stride_ak=1, stride_be=2 * de * d,
              stride_bk=d, stride_bn=1, stride_cr=d, stride_cn=1), rows(SCALE=False, ATOMIC=False)),
        ("dW_gate_up", tm._grouped_xty_kernel, tm._gpu_xty_configs(),
         dict(a_ptr=x, b_ptr=x, c_ptr=x, w_ptr=x, order_ptr=i32, offsets_ptr=i32),
         dict(K_TOP=k, M=2 * de, N=d, stride_ar=2 * de, stride_am=1, stride_br=d, stride_bn=1,
              stride_ce=2 * de * d, stride_cm=d, stride_cn=1),
         dict(A_BY_TOKEN=False, B_BY_TOKEN=True, SCALE_A=False, DOT_T=dot_t, PREC=prec)),
        ("dW_down", tm._grouped_xty_kernel, tm._gpu_xty_configs(),
         dict(a_ptr=x, b_ptr=x, c_ptr=x, w_ptr=f32, order_ptr=i32, offsets_ptr=i32),
         dict(K_TOP=k, M=d, N=de, stride_ar=d, stride_am=1, stride_br=de, stride_bn=1, stride_ce=d * de,
              stride_cm=de, stride_cn=1),
         dict(A_BY_TOKEN=True, B_BY_TOKEN=False, SCALE_A=True, DOT_T=dot_t, PREC=prec)),
    ]
    report = []
    for name, fn, configs, ptrs, ints, consts in kernels:
        if only is not None and name not in only:
            continue
        for c in configs:
            meta = {**consts, **c.kwargs}
            sig, cx, attrs = {}, {}, {}
            for i, arg in enumerate(fn.arg_names):
                if arg in meta:
                    sig[arg], cx[(i,)] = "constexpr", meta[arg]
                elif arg in ptrs:
                    sig[arg], attrs[(i,)] = ptrs[arg], [["tt.divisibility", 16]]
                elif ints[arg] == 1:
                    sig[arg], cx[(i,)] = "constexpr", 1
                else:
                    sig[arg] = "i32"
                    if ints[arg] % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            row = {"kernel": name, "config": " ".join(f"{kk}={v}" for kk, v in c.kwargs.items())
                   + f" w={c.num_warps} s={c.num_stages}"}
            try:
                kern = triton.compile(ASTSource(fn, sig, cx, attrs), target=target,
                                      options={"num_warps": c.num_warps, "num_stages": c.num_stages})
                row["smem"] = kern.metadata.shared
                # The tensor-core instruction the dots became: on sm_90, wgmma unless a tile is too small for
                # a warp group (then mma.sync, the Ampere path, at a lower rate); none for the combine.
                ptx = kern.asm.get("ptx", "")
                row["mma"] = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
                row["fits"] = row["smem"] <= SMEM_LIMIT.get(arch, 101376)
                if os.path.exists(cuobjdump):
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(kern.asm["cubin"])
                        f.flush()
                        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                    for tok in next((ln for ln in out.splitlines() if "REG:" in ln), "").split():
                        if tok.startswith("REG:"):
                            row["regs"] = int(tok[4:])
                        if tok.startswith("STACK:"):
                            row["spill"] = int(tok[6:])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            report.append(row)
    return report


def print_compile_report(arch: int, shape: Shape, report: list[dict]) -> int:
    print(f"Offline compile for sm_{arch}, shape {shape.name} ({str(shape.dtype).replace('torch.', '')}): "
          f"kernel, config, shared memory, registers, spilled bytes")
    bad = 0
    for r in report:
        if "error" in r:
            bad += 1
            print(f"  {r['kernel']:20s} {r['config']:40s} FAILED {r['error']}")
            continue
        note = "" if r["fits"] else "  (over the shared-memory limit: the autotuner skips it)"
        spill = r.get("spill")
        if spill:
            note += "  (spills)"
        print(f"  {r['kernel']:20s} {r['config']:40s} smem {r['smem']:6d}  regs {r.get('regs', '?')!s:>3}  "
              f"spill {spill if spill is not None else '?'}  mma {r.get('mma', '?')}{note}")
    return bad


# ----------------------------------------------------------------------------------------------------------
# Report


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(shape: Shape, rows: list[dict], markdown: bool) -> str:
    head = ["impl", "fwd ms", "fwd TFLOP/s", "fwd / dense", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd / dense",
            "rel err vs ref"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["impl"], "n/a", "", "", "", "", "", r["error"]])
            continue
        body.append([r["impl"], _fmt(r["fwd_ms"], ".3f"), _fmt(r["fwd_tflops"], ".1f"),
                     _fmt(r.get("fwd_frac"), ".1%"), _fmt(r["fwdbwd_ms"], ".3f"), _fmt(r["fwdbwd_tflops"], ".1f"),
                     _fmt(r.get("fwdbwd_frac"), ".1%"), _fmt(r.get("rel_err"), ".1e")])
    title = (f"{shape.name}: d={shape.d}, d_e={shape.de}, E={shape.E}, k={shape.k}, tokens={shape.tokens}, "
             f"{str(shape.dtype).replace('torch.', '')}")
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    else:
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        lines = [title, "  ".join(h.ljust(wd) for h, wd in zip(head, widths))]
        lines += ["  ".join(str(c).ljust(wd) for c, wd in zip(row, widths)) for row in body]
    lines += [""] + goal_lines(shape, rows) + [""]
    return "\n".join(lines)


def goal_lines(shape: Shape, rows: list[dict]) -> list[str]:
    by = {r["impl"]: r for r in rows if "error" not in r}
    t = by.get("triton")
    if t is None:
        return []
    out = []
    if "fwdbwd_frac" in t:
        ok = t["fwdbwd_frac"] >= GOAL_DENSE_FRACTION
        out.append(f"- triton fwd+bwd at {t['fwdbwd_frac']:.1%} of dense (goal >= {GOAL_DENSE_FRACTION:.0%}): "
                   f"{'met' if ok else 'not met'}")
    if "grouped_mm" in by:
        ratio = by["grouped_mm"]["fwdbwd_ms"] / t["fwdbwd_ms"]
        out.append(f"- triton vs grouped_mm peer, fwd+bwd: {ratio:.2f}x (goal >= 1x): "
                   f"{'met' if ratio >= 1 else 'not met'}")
    if "loop" in by:
        ratio = by["loop"]["fwdbwd_ms"] / t["fwdbwd_ms"]
        out.append(f"- triton vs per-expert loop, fwd+bwd: {ratio:.1f}x (goal >= {GOAL_LOOP_SPEEDUP:.0f}x): "
                   f"{'met' if ratio >= GOAL_LOOP_SPEEDUP else 'not met'}")
    if shape.name != "olmoe":
        out = [line.replace(": met", "").replace(": not met", "") for line in out]  # goals are for OLMoE only
    return out


def tuned_configs() -> str:
    """The configs the autotuner picked so far (per kernel and tuning key), for the record."""
    tm = sys.modules.get("moelab.kernels.triton_moe")
    if tm is None:
        return ""
    parts = []
    for name, fn in tm._TUNED.items():
        for key, cfg in getattr(fn, "cache", {}).items():
            dims = ",".join(str(v) for v in key if isinstance(v, int))
            parts.append(f"{name}[{dims}]: {cfg}")
    return "; ".join(parts)


def environment_line(device: torch.device) -> str:
    import importlib.metadata

    try:
        tv = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        tv = "missing"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a benchmark)"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {dev}, torch {torch.__version__}, "
            f"triton {tv}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m moelab.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma-separated, from {', '.join(SHAPES)} (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--tokens", type=int, default=0, help="override the number of tokens of every shape")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--markdown", action="store_true", help="markdown tables (for bench/RESULTS.md)")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-run on CPU (tests only; numbers meaningless)")
    p.add_argument("--compile-check", type=int, metavar="SM", default=0,
                   help="no GPU needed: compile every kernel config for sm_SM (e.g. 90, 80) and report shared "
                        "memory, registers and spills for the --shapes; exit 1 if any fails to compile")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    impls = [s for s in args.impls.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; allowed: {', '.join(SHAPES)}")
    for s in impls:
        if s not in IMPLS:
            p.error(f"--impls: unknown implementation {s!r}; allowed: {', '.join(IMPLS)}")
    if args.compile_check:
        bad = 0
        for s in shapes:
            shape = SHAPES[s] if not args.tokens else dataclasses.replace(SHAPES[s], tokens=args.tokens)
            bad += print_compile_report(args.compile_check, shape, compile_check(args.compile_check, shape))
        if bad:
            sys.exit(1)
        return []
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("moelab.kernels.bench: no CUDA device here; this benchmark needs a GPU (run `make bench-gpu` on a "
              "CUDA machine). Nothing was measured.", file=sys.stderr)
        sys.exit(2)
    print(("## " if args.markdown else "") + "MoE expert compute: " + environment_line(device))
    print()
    all_rows = []
    for s in shapes:
        shape = SHAPES[s]
        if args.tokens:
            shape = dataclasses.replace(shape, tokens=args.tokens)
        rows = bench_shape(shape, impls, device, args.warmup, args.iters)
        print(format_table(shape, rows, args.markdown), flush=True)
        tuned = tuned_configs()
        if tuned:
            print(("- " if args.markdown else "") + "triton autotuned configs: " + tuned + "\n", flush=True)
        all_rows += rows
    return all_rows


if __name__ == "__main__":
    main()
