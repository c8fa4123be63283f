"""The expert compute as a torch.library custom op (`moelab.kernels.custom_op`), the path torch.compile takes.

Its eager numbers must be those of the autograd Functions the eager model runs (bit for bit: same functions,
same order of operations), its fake implementation must give the real shapes, and a compiled call through
`moelab.kernels.moe_experts` must neither break the graph nor change a bit. Triton runs on CUDA when present,
else in the interpreter (see conftest.py); the compile backend is "aot_eager" (AOTAutograd's forward and
backward graphs, run eagerly): what Inductor would receive, without its code generation.
"""

from __future__ import annotations

import pytest
import torch

import triton  # noqa: F401  (dev extra)

from moelab import kernels
from moelab.kernels import custom_op, reference
from moelab.kernels import triton_moe as tm

DEV = torch.device("cuda") if torch.cuda.is_available() and not tm.INTERPRETED else torch.device("cpu")
if DEV.type == "cpu" and not tm.INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET was not set before triton_moe was imported", allow_module_level=True)

EAGER = {"reference": reference.moe_experts, "triton": tm.moe_experts}


def _inputs(T=24, d=32, de=16, E=4, k=2, dropped=True, seed=0):
    """x [T, d], w_gate_up [E, 2 de, d], w_down [E, d, de], topk_idx [T, k] (distinct experts, ~1/4 of slots
    dropped and token 1 losing all), topk_weight [T, k], dout [T, d], on DEV."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    wgu = torch.randn(E, 2 * de, d, generator=g) / d**0.5
    wd = torch.randn(E, d, de, generator=g) / de**0.5
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if dropped:
        idx[torch.rand(T, k, generator=g) < 0.25] = -1
        idx[1] = -1
    w = torch.rand(T, k, generator=g)
    dout = torch.randn(T, d, generator=g)
    return [t.to(DEV) for t in (x, wgu, wd, idx, w, dout)]


def _fwd_bwd(fn, x, wgu, wd, idx, w, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wgu, wd, w)]
    out = fn(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def _op(backend):
    return lambda x, wgu, wd, idx, w: custom_op.moe_experts(x, wgu, wd, idx, w, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dropped", [False, True])
def test_op_equals_the_eager_path_bit_for_bit(backend, dropped):
    args = _inputs(dropped=dropped)
    want = _fwd_bwd(EAGER[backend], *args)
    got = _fwd_bwd(_op(backend), *args)
    for name, a, b in zip(("out", "dx", "dw_gate_up", "dw_down", "dtopk_weight"), got, want):
        assert torch.equal(a, b), f"{backend}: {name} differs from the eager autograd Function"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_under_autocast_runs_in_the_autocast_dtype(backend):
    x, wgu, wd, idx, w, dout = _inputs()
    dt = torch.bfloat16
    with torch.autocast(DEV.type, dtype=dt):
        want = _fwd_bwd(EAGER[backend], x, wgu, wd, idx, w, dout)
        got = _fwd_bwd(_op(backend), x, wgu, wd, idx, w, dout)
    assert got[0].dtype == dt
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_op_schema_fake_and_autograd_registration():
    """torch.library.opcheck: the schema matches what the op does (no mutation, no aliasing), the fake
    implementation gives the real shapes and dtypes, and the autograd formula is registered and traceable."""
    # No dropped slots: the Triton residuals' rows of dropped slots are never written (nor read), so two calls
    # would differ there and opcheck, which compares every output of two calls, would flag it.
    x, wgu, wd, idx, w, _ = _inputs(dropped=False)
    for backend in ("reference", "triton"):
        # save=False only ever comes with no input needing a gradient (custom_op.moe_experts decides)
        for save in (True, False):
            leaves = [t.detach().clone().requires_grad_(save) for t in (x, wgu, wd, w)]
            torch.library.opcheck(torch.ops.moelab.moe_experts_fwd.default,
                                  (*leaves[:3], idx, leaves[3], backend, "gather", save))


def test_fake_shapes_equal_real_shapes():
    """The residual shapes are the same function of the input shapes in the fake and the real op, also for an
    empty batch."""
    for T in (24, 0):
        x, wgu, wd, idx, w, _ = (t[:T] if i in (0, 3, 4) else t for i, t in enumerate(_inputs()))
        for backend in ("reference", "triton"):
            for save in (True, False):
                real = custom_op.moe_experts_fwd(x, wgu, wd, idx, w, backend, "gather", save)
                with torch._subclasses.FakeTensorMode() as mode:
                    fake = custom_op.moe_experts_fwd(*(mode.from_tensor(t) for t in (x, wgu, wd, idx, w)),
                                                     backend, "gather", save)
                assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake], (T, backend, save)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_call_is_one_graph_and_bit_identical(backend):
    """moelab.kernels.moe_experts inside torch.compile takes the custom op: no graph break at the kernel, and
    the forward and all four gradients equal the eager ones."""
    torch._dynamo.reset()
    args = _inputs()

    def fn(x, wgu, wd, idx, w):
        return kernels.moe_experts(x * 1.0, wgu, wd, idx, w, backend=backend) * 2.0

    explained = torch._dynamo.explain(fn)(*args[:5])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    want = _fwd_bwd(fn, *args)
    got = _fwd_bwd(torch.compile(fn, backend="aot_eager"), *args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_eager_calls_do_not_take_the_op(monkeypatch):
    """Outside torch.compile the dispatcher keeps the autograd Functions (what tests/kernels pins down)."""
    calls = []
    monkeypatch.setattr(custom_op, "moe_experts", lambda *a, **k: calls.append(1))
    x, wgu, wd, idx, w, _ = _inputs()
    kernels.moe_experts(x, wgu, wd, idx, w, backend="reference")
    assert calls == []
