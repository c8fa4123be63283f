"""Triton kernels for routed SwiGLU experts: a drop-in for `reference.moe_experts` (the specification).

Shape legend as in `reference.py`: T tokens, k slots per token, S = T*k slots (flat slot id s = t*k + j),
E experts, d model width, d_e expert width, BM = BLOCK_M (slots per block).

Design (after the ScatterMoE and vLLM `moe_align_block_size` descriptions in ../shared/refs.md; own code):

* Routing metadata (`routing_metadata`), on the device with torch ops and no host synchronisation: a stable
  sort of the slots by expert (dropped slots, id -1, keyed last), per-expert offsets by `searchsorted` on the
  sorted keys (the histogram's prefix sum), and a block-aligned copy of the sorted *slot-id list* in which
  each expert's run is padded to a multiple of BM with the sentinel S, plus the expert of each block (-1 for
  unused blocks). Only the index list is padded; no activation is copied into a padded layout. The number
  of blocks is bounded without a sync by cdiv(S, BM) + E, so grids are sized from shapes alone.
* Forward: `_gate_up_kernel` gathers x rows by token id, computes the gate and up tiles of one expert in
  two fp32 accumulators and applies SwiGLU in the epilogue; it writes `a = silu(g) * u` [S, d_e] and, when a
  backward will run, the pre-activations `h = [g, u]` [S, 2 d_e] (slot-indexed rows, like the reference's
  saved `h`). Memory trade: keeping h costs S*2*d_e elements per layer until backward (the reference keeps
  the same h plus y [S, d]); recomputing it would cost another gate/up GEMM (+2/9 of fwd+bwd FLOPs).
  `a` is also kept, so the backward never re-derives the forward's rounded activations.
  `_grouped_gemm_kernel` then runs the down projection per block, scales each row by its routing weight and
  either stores the weighted per-slot output y [S, d] (combine="gather", default: deterministic; the top-k
  sum is `_combine_kernel`, a masked sum over the k slots of each token in fp32) or atomically adds it into
  an fp32 [T, d] buffer (combine="atomic": no [S, d] buffer, order-dependent rounding).
* Backward: `_down_bwd_kernel` computes dA = w_s * dout[t] @ W_down[e] per block and d_e tile, the partial
  routing-weight gradient <dout[t] @ W_down[e], a_s> per tile (summed over tiles afterwards, deterministic),
  and the SwiGLU backward into dh = [dg, du] [S, 2 d_e]. `_grouped_xty_kernel` computes the weight
  gradients per expert as a grouped X^T dY over that expert's run of sorted slots (dW_down = (w dout)^T a,
  dW_gate_up = dh^T x). dx reuses `_grouped_gemm_kernel` (dh @ W_gate_up[e]) and the same combine.
* fp32 accumulation everywhere; bf16 or fp32 inputs (x, w_gate_up, w_down of one dtype). fp32 dots use
  TF32 only when `torch.backends.cuda.matmul.allow_tf32` is set, as torch.mm does.
* GPU launch: BLOCK_M comes from the average slots per expert (`block_m_for`; at least 64 on sm_90+, where
  a 32-row tile would run on mma.sync rather than wgmma); the other tile sizes, warps
  and stages are autotuned per shape from small config lists checked offline for register spills
  (`python -m moelab.kernels.bench --compile-check 90`). Environment: MOELAB_TRITON_AUTOTUNE=0 uses fixed
  configs; MOELAB_TRITON_COMBINE=gather|atomic picks the default combine.

Interpreter (TRITON_INTERPRET=1, CPU): Triton reads the variable when a kernel is *decorated*, i.e. when this
module is imported, so it must be set before the import (`INTERPRETED` records what happened). The interpreter
stores bf16 as raw uint16 and does arithmetic / tl.dot on those integers, so every kernel converts loaded
tiles explicitly: to fp32 for arithmetic, and to DOT_T for dots (bf16 on GPU, fp32 in the interpreter: the
products of bf16 values are exact in fp32, so this equals a bf16 tensor-core dot with fp32 accumulation
except where an operand is computed in-kernel, e.g. the weight-scaled dout, which the GPU rounds to bf16).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_ids(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") program order: GROUP_M row blocks share each column sweep (L2 reuse of W[e])."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, a_ptr, slots_ptr, block_expert_ptr,
    S, K_TOP, D, DE, n_blocks,
    stride_xt, stride_xd,
    stride_we, stride_wn, stride_wk,
    stride_hs, stride_hn,
    stride_as, stride_an,
    SAVE_H: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """a[s, n] = silu(x[t_s] . Wg[e, n]) * (x[t_s] . Wu[e, n]) for the BM slots of one block (one expert e)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), n_blocks, tl.cdiv(DE, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    slot = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slot < S
    slot = tl.where(valid, slot, 0)
    tok = slot // K_TOP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < DE
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + rk[None, :] * stride_xd
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn[None, :] * stride_wn + rk[:, None] * stride_wk
    wu_ptrs = wg_ptrs + DE * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = rk < D - kk * BLOCK_K
        xt = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0).to(DOT_T)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_T)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_T)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    out_t = a_ptr.dtype.element_ty
    # SwiGLU on the values as stored (rounded to the activation dtype), as the reference does.
    g = acc_g.to(out_t).to(tl.float32)
    u = acc_u.to(out_t).to(tl.float32)
    mask = valid[:, None] & n_ok[None, :]
    if SAVE_H:
        h_ptrs = h_ptr + slot[:, None] * stride_hs + rn[None, :] * stride_hn
        tl.store(h_ptrs, g.to(out_t), mask=mask)
        tl.store(h_ptrs + DE * stride_hn, u.to(out_t), mask=mask)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + slot[:, None] * stride_as + rn[None, :] * stride_an, a.to(out_t), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr, slots_ptr, block_expert_ptr,
    S, K_TOP, N, K, n_blocks,
    stride_as, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cr, stride_cn,
    SCALE: tl.constexpr, ATOMIC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[row, :] (+)= w_s * A[s, :] @ B[e] for the slots s of one block (expert e).

    A rows are slot-indexed. ATOMIC=False: C is [S, N] and row = s (plain store). ATOMIC=True: C is fp32
    [T, N] and row = token of s (atomic add: the top-k combine happens here)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), n_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    slot = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slot < S
    slot = tl.where(valid, slot, 0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + slot[:, None] * stride_as + rk[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kk * BLOCK_K
        at = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0).to(DOT_T)
        bt = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_T)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE:
        ws = tl.load(w_ptr + slot, mask=valid, other=0.0).to(tl.float32)
        acc = acc * ws[:, None]
    mask = valid[:, None] & n_ok[None, :]
    if ATOMIC:
        tok = slot // K_TOP
        tl.atomic_add(c_ptr + tok[:, None] * stride_cr + rn[None, :] * stride_cn, acc, mask=mask, sem="relaxed")
    else:
        c_ptrs = c_ptr + slot[:, None] * stride_cr + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr, idx_ptr, out_ptr, T, K_TOP, N,
    stride_ys, stride_yn, stride_ot, stride_on,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, :] = sum over kept slots j of y[t*k + j, :] (fp32 sum; dropped slots' rows are never read)."""
    rt = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = rt < T
    n_ok = rn < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, K_TOP):
        s = rt * K_TOP + j
        keep = (tl.load(idx_ptr + s, mask=t_ok, other=-1) >= 0) & t_ok
        v = tl.load(y_ptr + s[:, None] * stride_ys + rn[None, :] * stride_yn, mask=keep[:, None] & n_ok[None, :],
                    other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + rt[:, None] * stride_ot + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_bwd_kernel(
    dout_ptr, w2_ptr, h_ptr, a_ptr, w_ptr, dh_ptr, dwp_ptr, slots_ptr, block_expert_ptr,
    S, K_TOP, D, DE, n_blocks,
    stride_dt, stride_dd,
    stride_we, stride_wd, stride_wn,
    stride_hs, stride_hn,
    stride_as, stride_an,
    stride_gs, stride_gn,
    stride_pp,
    COMPUTE_DW: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Per block (expert e) and d_e tile: g_s = dout[t_s] @ W_down[e] (the grad of a_s before the weight),
    dw_partial[tile, s] = <g_s, a_s>, dA = w_s g_s, dh = [dA * u * silu'(g), dA * silu(g)]."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), n_blocks, tl.cdiv(DE, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    slot = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slot < S
    slot = tl.where(valid, slot, 0)
    tok = slot // K_TOP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < DE
    rk = tl.arange(0, BLOCK_K)
    d_ptrs = dout_ptr + tok[:, None] * stride_dt + rk[None, :] * stride_dd
    w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wd + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = rk < D - kk * BLOCK_K
        dt = tl.load(d_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0).to(DOT_T)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_T)
        acc = tl.dot(dt, wt, acc, input_precision=PREC)
        d_ptrs += BLOCK_K * stride_dd
        w_ptrs += BLOCK_K * stride_wd
    mask = valid[:, None] & n_ok[None, :]
    if COMPUTE_DW:
        a = tl.load(a_ptr + slot[:, None] * stride_as + rn[None, :] * stride_an, mask=mask, other=0.0)
        part = tl.sum(acc * a.to(tl.float32), axis=1)
        tl.store(dwp_ptr + pid_n * stride_pp + slot, part, mask=valid)
    ws = tl.load(w_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    da = acc * ws[:, None]
    h_ptrs = h_ptr + slot[:, None] * stride_hs + rn[None, :] * stride_hn
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + DE * stride_hn, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    dg = da * u * sg * (1.0 + g * (1.0 - sg))  # d silu(g)/dg = sg * (1 + g (1 - sg))
    du = da * silu
    out_t = dh_ptr.dtype.element_ty
    dh_ptrs = dh_ptr + slot[:, None] * stride_gs + rn[None, :] * stride_gn
    tl.store(dh_ptrs, dg.to(out_t), mask=mask)
    tl.store(dh_ptrs + DE * stride_gn, du.to(out_t), mask=mask)


@triton.jit
def _grouped_xty_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr, order_ptr, offsets_ptr,
    K_TOP, M, N,
    stride_ar, stride_am,
    stride_br, stride_bn,
    stride_ce, stride_cm, stride_cn,
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, SCALE_A: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[e] = sum over the slots s of expert e of (w_s?) A[row_a(s)]^T B[row_b(s)]  ->  [M, N] per expert.

    The reduction runs over the expert's contiguous run of the sorted slot list (order[offsets[e]:
    offsets[e+1]]); row_x(s) is s (slot-indexed tensors) or s // k (token-indexed). An expert with no
    slots stores zeros."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_n
    pid_n = pid % n_n
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_K):
        r = s0 + rk
        ok = r < end
        slot = tl.load(order_ptr + r, mask=ok, other=0).to(tl.int64)
        if A_BY_TOKEN:
            ra = slot // K_TOP
        else:
            ra = slot
        if B_BY_TOKEN:
            rb = slot // K_TOP
        else:
            rb = slot
        at = tl.load(a_ptr + ra[None, :] * stride_ar + rm[:, None] * stride_am, mask=m_ok[:, None] & ok[None, :],
                     other=0.0)
        if SCALE_A:
            ws = tl.load(w_ptr + slot, mask=ok, other=0.0).to(tl.float32)
            at = at.to(tl.float32) * ws[None, :]
        bt = tl.load(b_ptr + rb[:, None] * stride_br + rn[None, :] * stride_bn, mask=ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc = tl.dot(at.to(DOT_T), bt.to(DOT_T), acc, input_precision=PREC)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# True when the kernels above were built by the interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_gate_up_kernel).__name__ == "InterpretedFunction"

# ----------------------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # slots per block: fixes the routing metadata's padding granularity
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The interpreter runs one program at a time in numpy: 32 keeps tl.dot fast there and the padding small.
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=32, block_k=32, group_m=4, num_warps=1, num_stages=1)


def _gpu_configs(kind: str) -> list:
    """A small search space for H100/A100-class GPUs (bf16). BLOCK_M is fixed by the routing metadata and
    not tuned. Configs that exceed a GPU's shared memory are dropped by the autotuner (OutOfResources)."""
    C = triton.Config
    # Chosen so that none spills registers on sm90 (checked offline with the bundled ptxas/cuobjdump).
    if kind == "gate_up":  # two fp32 accumulators per program: BLOCK_N 64 at 8 warps
        return [C({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
                C({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
                C({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=5),
                C({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
                C({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4)]
    if kind == "down_bwd":  # BLOCK_N fixed: it sets the row count of the routing-weight partials buffer
        return [C({"BLOCK_N": DOWN_BWD_BLOCK_N, "BLOCK_K": 64}, num_warps=8, num_stages=4),
                C({"BLOCK_N": DOWN_BWD_BLOCK_N, "BLOCK_K": 64}, num_warps=8, num_stages=3),
                C({"BLOCK_N": DOWN_BWD_BLOCK_N, "BLOCK_K": 32}, num_warps=8, num_stages=5),
                C({"BLOCK_N": DOWN_BWD_BLOCK_N, "BLOCK_K": 128}, num_warps=8, num_stages=3),
                C({"BLOCK_N": DOWN_BWD_BLOCK_N, "BLOCK_K": 64}, num_warps=8, num_stages=2)]
    return [C({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            C({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            C({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            C({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            C({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3)]


DOWN_BWD_BLOCK_N = 64


def _gpu_xty_configs() -> list:
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ]


# Autotuned wrappers, installed on GPU builds (and by the tests, in the interpreter, with a stand-in timer).
# Every tuned kernel only *stores* (never accumulates), so running several configs while tuning is harmless;
# the atomic combine variant always runs the untuned kernel.
_TUNED: dict = {}


def install_autotuning(gate_up: list, gemm: list, down_bwd: list, xty: list, do_bench=None) -> None:
    """Wrap the kernels in `triton.autotune` over these config lists (see `_gpu_configs`). All `down_bwd`
    configs must share BLOCK_N: it fixes the row count of the routing-weight partials buffer."""
    widths = {c.kwargs["BLOCK_N"] for c in down_bwd}
    if len(widths) != 1:
        raise ValueError(f"down_bwd configs must share BLOCK_N; got {sorted(widths)}")

    def tuned(kernel, configs, key):
        return triton.autotune(configs=configs, key=key, do_bench=do_bench)(kernel)

    _TUNED.clear()
    _TUNED.update(gate_up=tuned(_gate_up_kernel, gate_up, ["D", "DE", "BLOCK_M"]),
                  gemm=tuned(_grouped_gemm_kernel, gemm, ["N", "K", "BLOCK_M"]),
                  down_bwd=tuned(_down_bwd_kernel, down_bwd, ["D", "DE", "BLOCK_M"]),
                  xty=tuned(_grouped_xty_kernel, xty, ["M", "N"]),
                  down_bwd_block_n=widths.pop())


if not INTERPRETED:
    install_autotuning(_gpu_configs("gate_up"), _gpu_configs("gemm"), _gpu_configs("down_bwd"), _gpu_xty_configs())


def _cuda_arch() -> int:
    """Compute capability of the current CUDA device as major*10 + minor (90 for H100); 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def block_m_for(n_slots: int, n_experts: int, arch: int | None = None) -> int:
    """Slots per block: big enough for tensor-core tiles, small enough that padding stays a few percent.
    `arch`: the compute capability it is for (default: the current CUDA device's)."""
    if INTERPRETED:
        return INTERPRETER_CONFIG.block_m
    per_expert = n_slots / max(n_experts, 1)
    if per_expert >= 1024:
        return 128
    if per_expert >= 128:
        return 64
    # Hopper's warp-group MMA (wgmma) takes 64-row tiles per warp group; Triton compiles a 32-row tile to
    # the Ampere-style mma.sync instead, which cannot reach the wgmma rate. So on sm_90 and later the
    # smallest tile is 64 rows: at few slots per expert more of each block is padding, but the padding
    # costs a share of a launch that is bound by weight loads, not by its MMA rate.
    return 64 if (_cuda_arch() if arch is None else arch) >= 90 else 32


def _autotune_enabled() -> bool:
    """Autotuned launches unless MOELAB_TRITON_AUTOTUNE=0 (then the fixed `_config`)."""
    return bool(_TUNED) and os.environ.get("MOELAB_TRITON_AUTOTUNE", "1") != "0"


def _dot_types(dtype: torch.dtype):
    if INTERPRETED:
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # 16-bit operands: the precision flag only matters for fp32; pass Triton's default.
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype], "tf32"


def _launch_rows(kernel, tuned, grid_fn, args, consts, cfg: KernelConfig, tune: bool):
    """Launch a per-block kernel: tuned (BLOCK_N/BLOCK_K/warps/stages from the autotuner) or fixed config."""
    if tune:
        tuned[lambda meta: grid_fn(meta["BLOCK_N"])](*args, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, **consts)
    else:
        kernel[grid_fn(cfg.block_n)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                         GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                         **consts)


def _grid_rows(n_blocks: int, n: int):
    return lambda block_n: (n_blocks * triton.cdiv(n, block_n),)


# ----------------------------------------------------------------------------------------------------------
# Allocation (the tests poison it)

_POISON = False


def set_poison(on: bool) -> bool:
    """Fill every buffer the kernels are meant to overwrite with NaN (floats) so an unwritten element shows.
    Returns the previous setting. For tests; costs a fill per buffer."""
    global _POISON
    prev, _POISON = _POISON, bool(on)
    return prev


def _empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan"))
    return t


# ----------------------------------------------------------------------------------------------------------
# Routing metadata


@dataclass
class RoutingMeta:
    order: torch.Tensor  # [S] int32 flat slot ids sorted by expert (stable); kept slots first, dropped last
    offsets: torch.Tensor  # [E+1] int32: expert e's slots are order[offsets[e]:offsets[e+1]]
    padded_slots: torch.Tensor  # [n_blocks*BM] int32 sorted slot ids, each expert's run padded to BM with S
    block_expert: torch.Tensor  # [n_blocks] int32 expert of each block; -1 = unused block
    n_blocks: int  # upper bound cdiv(S, BM) + E (from shapes: no sync)
    block_m: int


def routing_metadata(topk_idx: torch.Tensor, n_experts: int, block_m: int) -> RoutingMeta:
    """Device-side routing metadata for `topk_idx` [T, k] (-1 = dropped slot); no host synchronisation."""
    dev = topk_idx.device
    E = n_experts
    flat = topk_idx.reshape(-1)
    S = flat.numel()
    key = torch.where(flat < 0, E, flat).to(torch.int32)  # dropped slots sort after every expert
    sorted_key, order = torch.sort(key, stable=True)
    order = order.to(torch.int32)
    # Histogram + prefix sum in one step: ends[e] = #slots with key <= e.
    ends = torch.searchsorted(sorted_key, torch.arange(E, dtype=torch.int32, device=dev), right=True)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offsets[1:] = ends.to(torch.int32)
    counts = offsets[1:] - offsets[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0, dtype=torch.int32)
    padded_start = padded_end - padded
    n_blocks = triton.cdiv(S, block_m) + E
    n_pad = n_blocks * block_m
    # Sorted position i of a kept slot of expert e lands at padded_start[e] + (i - offsets[e]).
    kept = sorted_key < E
    e_safe = torch.where(kept, sorted_key, 0).long()
    pos = torch.arange(S, dtype=torch.int32, device=dev) - offsets[e_safe] + padded_start[e_safe]
    pos = torch.where(kept, pos, n_pad).long()  # dropped -> one trash element past the end
    padded_slots = torch.full((n_pad + 1,), S, dtype=torch.int32, device=dev)
    padded_slots.scatter_(0, pos, order)
    padded_slots = padded_slots[:n_pad]
    block_start = torch.arange(n_blocks, dtype=torch.int32, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < E, block_expert, -1)
    return RoutingMeta(order, offsets, padded_slots.contiguous(), block_expert.contiguous(), n_blocks, block_m)


# ----------------------------------------------------------------------------------------------------------
# Launch wrappers


def _combine(y: torch.Tensor, idx_flat: torch.Tensor, T: int, k: int, out: torch.Tensor) -> torch.Tensor:
    N = y.shape[1]
    BT, BN = (32, 32) if INTERPRETED else (32, 128)
    _combine_kernel[(triton.cdiv(T, BT), triton.cdiv(N, BN))](
        y, idx_flat, out, T, k, N, y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=BT, BLOCK_N=BN, num_warps=4)
    return out


def _rows_gemm(a, b, b_strides, meta: RoutingMeta, w, S, k, N, K, cfg, out_T: int, out_dtype, combine,
               idx_flat, dot_t, prec):
    """Per-block grouped GEMM (A slot-rows @ B[e]) followed by the top-k combine into [T, N]."""
    dev = a.device
    scale = w is not None
    w_arg = w if scale else a
    if combine == "atomic":
        c = torch.zeros(out_T, N, dtype=torch.float32, device=dev)
        _launch_rows(_grouped_gemm_kernel, None, _grid_rows(meta.n_blocks, N),
                     (a, b, c, w_arg, meta.padded_slots, meta.block_expert, S, k, N, K, meta.n_blocks,
                      a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1)),
                     dict(SCALE=scale, ATOMIC=True, DOT_T=dot_t, PREC=prec), cfg, tune=False)
        return c.to(out_dtype)
    y = _empty(S, N, dtype=out_dtype, device=dev)
    _launch_rows(_grouped_gemm_kernel, _TUNED.get("gemm"),
                 _grid_rows(meta.n_blocks, N),
                 (a, b, y, w_arg, meta.padded_slots, meta.block_expert, S, k, N, K, meta.n_blocks,
                  a.stride(0), a.stride(1), *b_strides, y.stride(0), y.stride(1)),
                 dict(SCALE=scale, ATOMIC=False, DOT_T=dot_t, PREC=prec), cfg, tune=_autotune_enabled())
    return _combine(y, idx_flat, out_T, k, _empty(out_T, N, dtype=out_dtype, device=dev))


def _xty(a, b, out, meta: RoutingMeta, w, k, a_by_token, b_by_token, dot_t, prec):
    """out[e] = sum_{s in e} (w_s) a[row(s)]^T b[row(s)]."""
    E, M, N = out.shape
    args = (a, b, out, w if w is not None else a, meta.order, meta.offsets, k, M, N,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2))
    consts = dict(A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=w is not None, DOT_T=dot_t, PREC=prec)
    if _autotune_enabled():
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), E)  # noqa: E731
        _TUNED["xty"][grid](*args, **consts)
    else:
        c = INTERPRETER_CONFIG if INTERPRETED else KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8)
        grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n), E)
        _grouped_xty_kernel[grid](*args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                  num_warps=c.num_warps, num_stages=c.num_stages, **consts)
    return out


def _config(S: int, E: int) -> KernelConfig:
    if INTERPRETED:
        return INTERPRETER_CONFIG
    return KernelConfig(block_m=block_m_for(S, E), block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3)


COMBINES = ("gather", "atomic")


def forward(x, w_gate_up, w_down, topk_idx, topk_weight, combine: str, save: bool):
    """The forward launches. x [T, d], w_gate_up [E, 2 d_e, d], w_down [E, d, d_e] contiguous, of one dtype;
    topk_idx / topk_weight [T, k], T*k > 0 -> out [T, d], and for the backward (`save`): h [S, 2 d_e], a [S, d_e]
    (slot-indexed), the routing metadata and the launch config (both functions of topk_idx and the shapes)."""
    T, d = x.shape
    E, two_de, _ = w_gate_up.shape
    de = two_de // 2
    k = topk_idx.shape[1]
    S = T * k
    dev = x.device
    cfg = _config(S, E)
    dot_t, prec = _dot_types(x.dtype)
    meta = routing_metadata(topk_idx, E, cfg.block_m)
    idx_flat = topk_idx.reshape(-1).contiguous()
    w_flat = topk_weight.reshape(-1).contiguous()
    a = _empty(S, de, dtype=x.dtype, device=dev)
    h = _empty(S, two_de, dtype=x.dtype, device=dev) if save else a
    tune = _autotune_enabled()
    _launch_rows(_gate_up_kernel, _TUNED.get("gate_up"), _grid_rows(meta.n_blocks, de),
                 (x, w_gate_up, h, a, meta.padded_slots, meta.block_expert, S, k, d, de, meta.n_blocks,
                  x.stride(0), x.stride(1), *w_gate_up.stride(), h.stride(0), h.stride(1),
                  a.stride(0), a.stride(1)),
                 dict(SAVE_H=save, DOT_T=dot_t, PREC=prec), cfg, tune)
    # Down projection: B[e] = w_down[e]^T viewed as [d_e (K), d (N)].
    sd = w_down.stride()
    out = _rows_gemm(a, w_down, (sd[0], sd[2], sd[1]), meta, w_flat, S, k, d, de, cfg, T, x.dtype, combine,
                     idx_flat, dot_t, prec)
    return out, h, a, meta, cfg


def backward(dout, x, w_gate_up, w_down, topk_idx, topk_weight, h, a, meta: RoutingMeta, cfg: KernelConfig,
             combine: str, needs: tuple[bool, bool, bool, bool]):
    """Gradients from the residuals of `forward`. dout [T, d]; needs: whether dx, dw_gate_up, dw_down and
    d topk_weight are wanted -> those four (None where not wanted), shapes and dtypes of the inputs."""
    need_x, need_w1, need_w2, need_tw = needs
    idx_flat = topk_idx.reshape(-1).contiguous()
    w_flat = topk_weight.reshape(-1).contiguous()
    T, d = x.shape
    two_de = w_gate_up.shape[1]
    de = two_de // 2
    k = idx_flat.numel() // max(T, 1)
    S = T * k
    dev = x.device
    dot_t, prec = _dot_types(x.dtype)
    tune = _autotune_enabled()
    dout = dout.to(x.dtype).contiguous()
    dx = dw1 = dw2 = dtw = None
    if need_x or need_w1 or need_tw:
        dh = _empty(S, two_de, dtype=x.dtype, device=dev)
        # Partial routing-weight grads, one row per d_e tile of the launch (BLOCK_N fixed for this kernel).
        if tune:
            cfg_b = dataclasses.replace(cfg, block_n=_TUNED["down_bwd_block_n"])
        else:
            cfg_b = cfg if INTERPRETED else dataclasses.replace(cfg, block_n=DOWN_BWD_BLOCK_N, num_warps=8)
        dwp = _empty(triton.cdiv(de, cfg_b.block_n), S, dtype=torch.float32, device=dev) if need_tw else w_flat
        sw = w_down.stride()
        _launch_rows(_down_bwd_kernel, _TUNED.get("down_bwd"), _grid_rows(meta.n_blocks, de),
                     (dout, w_down, h, a, w_flat, dh, dwp, meta.padded_slots, meta.block_expert,
                      S, k, d, de, meta.n_blocks, dout.stride(0), dout.stride(1), sw[0], sw[1], sw[2],
                      h.stride(0), h.stride(1), a.stride(0), a.stride(1), dh.stride(0), dh.stride(1),
                      dwp.stride(0) if need_tw else 0),
                     dict(COMPUTE_DW=bool(need_tw), DOT_T=dot_t, PREC=prec), cfg_b, tune)
        if need_tw:
            g = dwp.sum(0)
            g = torch.where(idx_flat >= 0, g, torch.zeros((), dtype=g.dtype, device=dev))
            dtw = g.to(topk_weight.dtype).view(topk_weight.shape)
        if need_w1:
            dw1 = _xty(dh, x, _empty(*w_gate_up.shape, dtype=w_gate_up.dtype, device=dev), meta, None, k,
                       False, True, dot_t, prec)
        if need_x:
            s1 = w_gate_up.stride()  # B[e] = w_gate_up[e] as [2 d_e (K), d (N)]
            dx = _rows_gemm(dh, w_gate_up, (s1[0], s1[1], s1[2]), meta, None, S, k, d, two_de, cfg, T,
                            x.dtype, combine, idx_flat, dot_t, prec)
    if need_w2:
        dw2 = _xty(dout, a, _empty(*w_down.shape, dtype=w_down.dtype, device=dev), meta, w_flat, k,
                   True, False, dot_t, prec)
    return dx, dw1, dw2, dtw


class _TritonMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, topk_idx, topk_weight, combine, save):
        T, d = x.shape
        ctx.tw_shape, ctx.tw_dtype = topk_weight.shape, topk_weight.dtype
        if T * topk_idx.shape[1] == 0:  # empty batch (or k = 0): nothing to launch; zeros out, zero grads
            ctx.empty = True
            ctx.save_for_backward(x, w_gate_up, w_down)
            return x.new_zeros(T, d)
        ctx.empty = False
        out, h, a, meta, cfg = forward(x, w_gate_up, w_down, topk_idx, topk_weight, combine, save)
        if save:
            ctx.save_for_backward(x, w_gate_up, w_down, topk_idx, topk_weight, h, a, meta.order, meta.offsets,
                                  meta.padded_slots, meta.block_expert)
            ctx.meta_static = (meta.n_blocks, meta.block_m)
            ctx.cfg = cfg
            ctx.combine = combine
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        if ctx.empty:
            x, w_gate_up, w_down = ctx.saved_tensors
            return (torch.zeros_like(x), torch.zeros_like(w_gate_up), torch.zeros_like(w_down), None,
                    torch.zeros(ctx.tw_shape, dtype=ctx.tw_dtype, device=x.device), None, None)
        x, w_gate_up, w_down, topk_idx, topk_weight, h, a, order, offsets, padded_slots, block_expert = \
            ctx.saved_tensors
        meta = RoutingMeta(order, offsets, padded_slots, block_expert, *ctx.meta_static)
        need_x, need_w1, need_w2, _, need_tw = ctx.needs_input_grad[:5]
        dx, dw1, dw2, dtw = backward(dout, x, w_gate_up, w_down, topk_idx, topk_weight, h, a, meta, ctx.cfg,
                                     ctx.combine, (need_x, need_w1, need_w2, need_tw))
        return dx, dw1, dw2, None, dtw, None, None


def check_runnable(device: torch.device) -> None:
    """Raise RuntimeError (with the reason) if these kernels cannot run on `device`."""
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if INTERPRETED:
            return
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise RuntimeError("moe_experts backend 'triton': TRITON_INTERPRET was set after "
                               "moelab.kernels.triton_moe was imported; Triton reads it when kernels are "
                               "defined, so set it before the first import (e.g. at the top of conftest.py)")
        raise RuntimeError("moe_experts backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 (set before "
                           "import) to run the Triton interpreter on CPU; got a CPU tensor. Use "
                           "backend='reference' or MOELAB_KERNELS=reference")
    raise RuntimeError(f"moe_experts backend 'triton': unsupported device {device}")


def check_shapes(x, w_gate_up, w_down, topk_idx, topk_weight) -> None:
    """ValueError unless x [T, d], w_gate_up [E, 2 d_e, d], w_down [E, d, d_e], topk_idx / topk_weight [T, k]."""
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3 or topk_idx.dim() != 2:
        raise ValueError("moe_experts: expected x [T, d], w_gate_up [E, 2 d_e, d], w_down [E, d, d_e], "
                         "topk_idx [T, k]")
    if topk_idx.shape != topk_weight.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: topk_idx {tuple(topk_idx.shape)} / topk_weight "
                         f"{tuple(topk_weight.shape)} must both be [T={x.shape[0]}, k]")


def check_dtypes(x, w_gate_up, w_down) -> None:
    """TypeError unless x and both weights share one of the dtypes the kernels take (after autocast)."""
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(f"moe_experts: x, w_gate_up, w_down must share a dtype; got {x.dtype}, "
                        f"{w_gate_up.dtype}, {w_down.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"moe_experts backend 'triton': dtype {x.dtype} unsupported (float32, bfloat16, float16)")


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_idx: torch.Tensor,
                topk_weight: torch.Tensor, *, combine: str | None = None) -> torch.Tensor:
    """Triton version of `reference.moe_experts` (same shapes, semantics and autocast handling).

    combine: "gather" (default; per-slot outputs summed over k, deterministic) or "atomic" (fp32 atomic add
    into the output); $MOELAB_TRITON_COMBINE sets the default."""
    combine = combine or os.environ.get("MOELAB_TRITON_COMBINE", "gather")
    if combine not in COMBINES:
        raise ValueError(f"combine: got {combine!r}; allowed: {', '.join(COMBINES)}")
    check_runnable(x.device)
    check_shapes(x, w_gate_up, w_down, topk_idx, topk_weight)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return moe_experts(x.to(dt), w_gate_up.to(dt), w_down.to(dt), topk_idx, topk_weight, combine=combine)
    check_dtypes(x, w_gate_up, w_down)
    # Keep h for the backward only when one will run (inside Function.forward grad mode is always off).
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, topk_weight))
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    if x.is_cuda:
        with torch.cuda.device(x.device):
            return _TritonMoE.apply(x, w_gate_up, w_down, topk_idx, topk_weight, combine, save)
    return _TritonMoE.apply(x, w_gate_up, w_down, topk_idx, topk_weight, combine, save)


__all__ = ["moe_experts", "routing_metadata", "RoutingMeta", "check_runnable", "set_poison", "INTERPRETED",
           "COMBINES", "block_m_for"]
