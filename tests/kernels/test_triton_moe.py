"""Triton MoE kernels against the reference computed in float64 (forward and all four gradients).

On CPU this runs the Triton interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1 before the kernel
module is imported); on a CUDA machine the same tests run the compiled kernels. Every buffer the kernels
must overwrite is poisoned with NaN (`triton_moe.set_poison`), so an element left unwritten fails the
comparison; `test_poison_catches_an_unwritten_block` shows that it does.

bf16 in the interpreter: Triton's interpreter keeps bf16 as raw uint16 and computes on those integers, so
the kernels convert every loaded tile explicitly (fp32 for arithmetic; the dot type, fp32 in the
interpreter, bf16 on GPU). What the bf16 tests check on CPU is therefore the bf16 storage path (inputs,
h, a, per-slot outputs and dh rounded to bf16, fp32 accumulation); the bf16 tensor-core dot itself is only
exercised on a GPU, where products of bf16 values are exact in fp32 anyway.
"""

from __future__ import annotations

import os

import pytest
import torch

import triton  # noqa: E402,F401  (dev extra)

from moelab import kernels  # noqa: E402
from moelab.kernels import reference  # noqa: E402
from moelab.kernels import triton_moe as tm  # noqa: E402

if torch.cuda.is_available() and not tm.INTERPRETED:
    DEV = torch.device("cuda")
elif tm.INTERPRETED:
    DEV = torch.device("cpu")
else:
    pytest.skip("no GPU and TRITON_INTERPRET was not set before triton_moe was imported",
                allow_module_level=True)

NAMES = ("x", "w_gate_up", "w_down", "topk_weight")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison():
    prev = tm.set_poison(True)
    yield
    tm.set_poison(prev)


def _routing(kind: str, T: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    """topk_idx [T, k] for a routing pattern; distinct experts per token unless the pattern says otherwise."""
    if kind == "one_expert":  # every slot of every token on expert E-1 (k == 1), or slot 0 always on it
        idx = torch.stack([torch.randperm(E - 1, generator=g)[: k - 1] for _ in range(T)]) if k > 1 else None
        first = torch.full((T, 1), E - 1)
        return first if idx is None else torch.cat([first, idx], 1)
    if kind == "zero_experts":  # only experts 1 and E-2 receive tokens
        pool = torch.tensor([1, E - 2])
        return torch.stack([pool[torch.randperm(2, generator=g)[:k]] for _ in range(T)])
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if kind == "dropped":  # ~30% of slots dropped, and tokens 0 and 3 lose every slot
        idx[torch.rand(T, k, generator=g) < 0.3] = -1
        idx[0] = -1
        idx[3] = -1
    return idx


def _inputs(T, d, de, E, k, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    wgu = torch.randn(E, 2 * de, d, generator=g) / d**0.5
    wd = torch.randn(E, d, de, generator=g) / de**0.5
    w = torch.rand(T, k, generator=g)
    dout = torch.randn(T, d, generator=g)
    return x, wgu, wd, _routing(kind, T, E, k, g), w, dout


def _run(fn, x, wgu, wd, idx, w, dout, dtype, w_dtype=torch.float32):
    """Forward + all four grads of fn on fresh leaves of `dtype` on DEV (topk_weight in `w_dtype`)."""
    leaves = [t.to(DEV, dtype).requires_grad_() for t in (x, wgu, wd)] + [w.to(DEV, w_dtype).requires_grad_()]
    out = fn(leaves[0], leaves[1], leaves[2], idx.to(DEV), leaves[3])
    grads = torch.autograd.grad(out, leaves, dout.to(DEV, out.dtype))
    return out, grads


def _reference64(x, wgu, wd, idx, w, dout, dtype, w_dtype=torch.float32):
    """The reference in float64 on the inputs as the kernel sees them (rounded to `dtype` first)."""
    xs = [t.to(dtype).double() for t in (x, wgu, wd)] + [w.to(w_dtype).double()]
    leaves = [t.requires_grad_() for t in xs]
    out = reference.moe_experts(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    grads = torch.autograd.grad(out, leaves, dout.to(dtype).double())
    return out, grads


def _assert_matches(got, want, dtype, what):
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten element?)"
    tol = TOL[dtype]
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _check(T, d, de, E, k, kind="random", dtype=torch.float32, combine="gather", seed=0, w_dtype=torch.float32):
    x, wgu, wd, idx, w, dout = _inputs(T, d, de, E, k, kind, seed)
    out, grads = _run(lambda *a: tm.moe_experts(*a, combine=combine), x, wgu, wd, idx, w, dout, dtype, w_dtype)
    assert out.dtype == dtype and out.shape == (T, d)
    ref, ref_grads = _reference64(x, wgu, wd, idx, w, dout, dtype, w_dtype)
    _assert_matches(out, ref, dtype, "forward")
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert a.dtype == (w_dtype if name == "topk_weight" else dtype), name
        _assert_matches(a, b, dtype, f"grad {name}")
    # Exact zeros where nothing flows: dropped slots' gate grads, experts that got no slot.
    dtw = grads[3].cpu()
    assert (dtw[idx < 0] == 0).all()
    unused = torch.ones(E, dtype=torch.bool)
    unused[idx[idx >= 0].unique()] = False
    assert (grads[1].cpu()[unused] == 0).all() and (grads[2].cpu()[unused] == 0).all()
    return out, grads


# -- fp32 against float64 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,d,de,E,k,kind",
    [
        (37, 48, 40, 5, 2, "random"),  # T, d, d_e not multiples of the block; d_e not a power of two
        (29, 32, 24, 8, 2, "zero_experts"),  # six of eight experts get no token
        (40, 32, 24, 6, 1, "one_expert"),  # one expert takes every token
        (33, 32, 24, 6, 3, "one_expert"),  # ... and every token's first slot
        (45, 32, 24, 6, 3, "dropped"),  # -1 slots, two tokens with every slot dropped
        (40, 32, 24, 64, 8, "random"),  # E = 64, k = 8
    ],
)
def test_matches_reference_fp32(T, d, de, E, k, kind):
    _check(T, d, de, E, k, kind)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_top_k_1_to_8(k):
    _check(19, 32, 40, 9, k, "random", seed=k)


@pytest.mark.parametrize("kind", ["random", "dropped"])
def test_atomic_combine(kind):
    _check(37, 40, 24, 6, 3, kind, combine="atomic", seed=5)


def test_atomic_and_gather_agree_on_one_expert_taking_all():
    a, ga = _check(64, 32, 24, 4, 1, "one_expert", combine="atomic", seed=6)
    b, gb = _check(64, 32, 24, 4, 1, "one_expert", combine="gather", seed=6)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# -- bf16 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,combine,w_dtype", [("random", "gather", torch.float32),
                                                  ("dropped", "atomic", torch.float32),
                                                  ("zero_experts", "gather", torch.bfloat16)])
def test_bf16_within_bf16_tolerance(kind, combine, w_dtype):
    # The MoE layer passes bf16 gate weights under bf16 training; fp32 ones must work too.
    _check(37, 48, 40, 8, 2, kind, dtype=torch.bfloat16, combine=combine, seed=7, w_dtype=w_dtype)


def test_bf16_is_not_computed_on_raw_bits():
    # Guards the explicit tile conversions: without them the interpreter's bf16 results are garbage.
    x, wgu, wd, idx, w, _ = _inputs(33, 32, 24, 4, 2, seed=8)
    with torch.no_grad():
        out = tm.moe_experts(x.to(DEV, torch.bfloat16), wgu.to(DEV, torch.bfloat16), wd.to(DEV, torch.bfloat16),
                             idx.to(DEV), w.to(DEV))
        ref = reference.moe_experts(x.double(), wgu.double(), wd.double(), idx, w.double())
    rel = (out.cpu().double() - ref).norm() / ref.norm()
    assert rel < 2e-2


# -- partial grads, inference, layouts, autocast -----------------------------------------------------------


def test_no_grad_forward_and_partial_requires_grad():
    x, wgu, wd, idx, w, dout = _inputs(35, 32, 24, 5, 2, "dropped", seed=9)
    ref, ref_grads = _reference64(x, wgu, wd, idx, w, dout, torch.float32)
    with torch.no_grad():  # no h saved, no backward state
        _assert_matches(tm.moe_experts(x.to(DEV), wgu.to(DEV), wd.to(DEV), idx.to(DEV), w.to(DEV)), ref,
                        torch.float32, "no_grad forward")
    for which in range(4):  # only one input requires grad
        leaves = [t.to(DEV).clone() for t in (x, wgu, wd, w)]
        leaves[which].requires_grad_()
        out = tm.moe_experts(leaves[0], leaves[1], leaves[2], idx.to(DEV), leaves[3])
        (g,) = torch.autograd.grad(out, leaves[which], dout.to(DEV))
        _assert_matches(g, ref_grads[which], torch.float32, f"grad {NAMES[which]} alone")


def test_non_contiguous_inputs():
    x, wgu, wd, idx, w, dout = _inputs(21, 32, 24, 4, 2, seed=10)
    ref, _ = _reference64(x, wgu, wd, idx, w, dout, torch.float32)
    wide = torch.zeros(21, 64, device=DEV)
    wide[:, ::2] = x.to(DEV)
    wgu_t = wgu.to(DEV).transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides swapped
    idx_nc = torch.stack([idx, idx], 2)[:, :, 0].to(DEV)
    out = tm.moe_experts(wide[:, ::2], wgu_t, wd.to(DEV), idx_nc, w.to(DEV).t().contiguous().t())
    _assert_matches(out, ref, torch.float32, "non-contiguous")


def test_autocast_runs_in_the_autocast_dtype():
    x, wgu, wd, idx, w, _ = _inputs(20, 32, 24, 4, 2, seed=11)
    args = [t.to(DEV) for t in (x, wgu, wd, idx, w)]
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = tm.moe_experts(*args)
        ref = reference.moe_experts(*args)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2 * ref.float().abs().max().item(), rtol=3e-2)


def test_empty_batch():
    x, wgu, wd, idx, w, _ = _inputs(4, 32, 24, 4, 2, seed=12)
    leaves = [t.to(DEV).requires_grad_() for t in (x[:0], wgu, wd, w[:0])]
    out = tm.moe_experts(leaves[0], leaves[1], leaves[2], idx[:0].to(DEV), leaves[3])
    assert out.shape == (0, 32)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all((g == 0).all() for g in grads)


def test_rejects_mixed_and_unsupported_dtypes():
    x, wgu, wd, idx, w, _ = _inputs(4, 32, 24, 4, 2, seed=13)
    with pytest.raises(TypeError, match="share a dtype"):
        tm.moe_experts(x.to(DEV, torch.bfloat16), wgu.to(DEV), wd.to(DEV), idx.to(DEV), w.to(DEV))
    with pytest.raises(TypeError, match="unsupported"):
        tm.moe_experts(*(t.to(DEV, torch.float64) for t in (x, wgu, wd)), idx.to(DEV), w.to(DEV))
    with pytest.raises(ValueError, match="combine"):
        tm.moe_experts(x.to(DEV), wgu.to(DEV), wd.to(DEV), idx.to(DEV), w.to(DEV), combine="scatter")


# -- the autotuned (GPU) launch path ------------------------------------------------------------------------


@pytest.mark.skipif(not tm.INTERPRETED, reason="on GPU every test already runs the real autotuner")
def test_autotuned_launch_path(monkeypatch):
    """The GPU build launches through triton.autotune wrappers (grid lambdas, tuned meta-parameters). Run that
    path in the interpreter with a stand-in timer that executes every config and prefers the last one, so
    the final launch follows launches of other configs into the same buffers."""
    import triton

    def cfgs(*pairs):
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": kk}, num_warps=1, num_stages=1) for n, kk in pairs]

    benched = []

    def stand_in_bench(kernel_call, quantiles=None):
        kernel_call()
        benched.append(1)
        t = 1.0 / len(benched)
        return [t, t, t]

    monkeypatch.setattr(tm, "_TUNED", {})
    xty = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1) for m in (64, 32)]
    tm.install_autotuning(cfgs((64, 32), (32, 64)), cfgs((64, 64), (32, 32)), cfgs((32, 64), (32, 32)), xty,
                          do_bench=stand_in_bench)
    with pytest.raises(ValueError, match="share BLOCK_N"):
        tm.install_autotuning(cfgs((32, 32)), cfgs((32, 32)), cfgs((32, 32), (64, 32)), xty)
    assert tm._autotune_enabled()
    _check(37, 48, 40, 5, 2, "dropped", seed=17)
    assert len(benched) >= 8  # every kernel kind was tuned over its two configs
    from moelab.kernels import bench

    picked = bench.tuned_configs()
    assert all(f"{name}[" in picked for name in ("gate_up", "gemm", "down_bwd", "xty"))
    monkeypatch.setenv("MOELAB_TRITON_AUTOTUNE", "0")
    assert not tm._autotune_enabled()


# -- poison canary ---------------------------------------------------------------------------------------------


def test_poison_catches_an_unwritten_block(monkeypatch):
    """Skip the first used block of the padded list: its slots are never written, so NaN reaches the output
    (and the comparison in `_check` would fail). Without this the poisoning could be silently inert."""
    real = tm.routing_metadata

    def broken(topk_idx, n_experts, block_m):
        meta = real(topk_idx, n_experts, block_m)
        meta.block_expert = meta.block_expert.clone()
        meta.block_expert[0] = -1
        return meta

    monkeypatch.setattr(tm, "routing_metadata", broken)
    x, wgu, wd, idx, w, _ = _inputs(40, 32, 24, 3, 2, seed=14)
    with torch.no_grad():
        out = tm.moe_experts(x.to(DEV), wgu.to(DEV), wd.to(DEV), idx.to(DEV), w.to(DEV))
    assert torch.isnan(out).any()


# -- routing metadata ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,E,k,block_m", [("random", 7, 3, 4), ("dropped", 16, 4, 8), ("zero_experts", 8, 2, 16),
                                              ("one_expert", 5, 1, 32), ("random", 64, 8, 16)])
def test_routing_metadata(kind, E, k, block_m):
    T = 53
    idx = _routing(kind, T, E, k, torch.Generator().manual_seed(E))
    meta = tm.routing_metadata(idx.to(DEV), E, block_m)
    order, offsets = meta.order.cpu().long(), meta.offsets.cpu().long()
    padded, blocks = meta.padded_slots.cpu().long(), meta.block_expert.cpu().long()
    S = T * k
    flat = idx.reshape(-1)
    assert meta.n_blocks == -(-S // block_m) + E and padded.numel() == meta.n_blocks * block_m
    # offsets: prefix sum of the per-expert histogram; order: stable sort of the kept slots
    counts = torch.bincount(flat[flat >= 0], minlength=E)
    assert offsets.tolist() == [0] + counts.cumsum(0).tolist()
    kept = offsets[-1].item()
    want = torch.cat([torch.nonzero(flat == e).flatten() for e in range(E)])
    assert order[:kept].tolist() == want.tolist()
    assert sorted(order[kept:].tolist()) == torch.nonzero(flat < 0).flatten().tolist()
    # padded list: every kept slot exactly once, in sorted order; sentinel S elsewhere; one expert per block
    real = padded[padded < S]
    assert real.tolist() == want.tolist()
    assert ((padded == S) | (padded < S)).all()
    for b in range(meta.n_blocks):
        rows = padded[b * block_m:(b + 1) * block_m]
        if blocks[b] < 0:
            assert (rows == S).all()
        else:
            assert (rows < S).any() and (flat[rows[rows < S]] == blocks[b]).all()
    used = (blocks >= 0).sum().item()
    assert used == sum(-(-c // block_m) for c in counts.tolist())
    assert (blocks[:used] >= 0).all() and (blocks[used:] == -1).all()


# -- backend choice ------------------------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("MOELAB_KERNELS", raising=False)
    assert kernels.resolve_backend(None, torch.device("cpu")) == "reference"
    assert kernels.resolve_backend(None, torch.device("cuda")) == "triton"  # triton importable here
    monkeypatch.setenv("MOELAB_KERNELS", "reference")
    assert kernels.resolve_backend(None, torch.device("cuda")) == "reference"
    monkeypatch.setenv("MOELAB_KERNELS", "triton")
    assert kernels.resolve_backend(None, DEV) == "triton"
    assert kernels.resolve_backend("reference", DEV) == "reference"  # the argument beats the variable
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.resolve_backend("reference", torch.device("cuda")) == "reference"
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.resolve_backend(None, torch.device("cuda"))
    monkeypatch.delenv("MOELAB_KERNELS")
    assert kernels.resolve_backend(None, torch.device("cuda")) == "reference"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tm, "INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="after"):
        kernels.moe_experts(torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 2),
                            torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), backend="triton")


def test_dispatch_uses_the_chosen_backend(monkeypatch):
    x, wgu, wd, idx, w, _ = _inputs(30, 32, 24, 4, 2, seed=15)
    args = [t.to(DEV) for t in (x, wgu, wd, idx, w)]
    calls = []
    real = tm._TritonMoE.apply
    monkeypatch.setattr(tm._TritonMoE, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("MOELAB_KERNELS", "triton")
    a = kernels.moe_experts(*args)
    assert calls == [1]
    b = kernels.moe_experts(*args, backend="reference")
    assert calls == [1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- the MoE layer trains the same with either backend ------------------------------------------------------


def test_moe_layer_trains_identically_with_either_backend():
    moe = pytest.importorskip("moelab.trainers.moe")
    from moelab.trainers.config import ModelConfig, MoEConfig

    cfg = ModelConfig(d_model=32, d_ff=48, n_heads=1, head_dim=2,
                      moe=MoEConfig(n_experts=8, top_k=2, granularity=1, capacity_factor=1.0)).validate()
    losses, params = {}, {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        layer = moe.MoE(cfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layer.to(DEV).kernel_backend = backend
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(4, 2, 24, 32, generator=g).to(DEV)
        ys = torch.randn(4, 2, 24, 32, generator=g).to(DEV)
        losses[backend] = []
        for step in range(4):
            loss = (layer(xs[step]) - ys[step]).pow(2).mean() + 0.01 * layer.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
        params[backend] = [p.detach().cpu() for p in layer.parameters()]
    torch.testing.assert_close(losses["triton"], losses["reference"], atol=1e-5, rtol=1e-5)
    assert losses["reference"][-1] < losses["reference"][0]
    for a, b in zip(params["triton"], params["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -- GPU only ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEV.type != "cuda", reason="host synchronisation can only be observed on CUDA")
def test_no_host_sync_in_forward_and_backward():
    x, wgu, wd, idx, w, dout = _inputs(512, 256, 128, 16, 4, "dropped", seed=16)
    leaves = [t.to(DEV, torch.bfloat16).requires_grad_() for t in (x, wgu, wd)] + [w.to(DEV).requires_grad_()]
    idx, dout = idx.to(DEV), dout.to(DEV, torch.bfloat16)
    tm.moe_experts(*leaves[:3], idx, leaves[3]).backward(dout)  # compile + autotune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tm.moe_experts(*leaves[:3], idx, leaves[3])
        torch.autograd.grad(out, leaves, dout)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_kernels_compile_for_hopper_offline():
    """Without a GPU: compile every kernel in every autotune config for sm_90 with Triton's bundled ptxas
    (a fresh process, since this one runs the interpreter) and require that all compile."""
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "moelab.kernels.bench", "--compile-check", "90", "--shapes", "olmoe"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and r.stdout.count("smem") >= 20


def test_bench_cpu_message():
    """The benchmark is GPU-only: on a machine without CUDA it says so and exits with status 2."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from moelab.kernels import bench

    with pytest.raises(SystemExit) as e:
        bench.main([])
    assert e.value.code == 2


def test_bench_smoke_on_a_tiny_shape(capsys):
    """Every bench column (reference, triton, per-expert loop, grouped_mm peer, dense) runs on a tiny shape."""
    from moelab.kernels import bench

    rows = bench.main(["--shapes", "tiny", "--markdown", "--allow-cpu", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "| triton |" in out and "| dense" in out
    names = {r["impl"] for r in rows}
    assert {"reference", "triton", "loop", "dense"} <= names
