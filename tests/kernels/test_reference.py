"""moe_experts (sorted, hand-written backward) against the float64 per-token specification."""

import pytest
import torch

from moelab.kernels import moe_experts, resolve_backend
from moelab.kernels.reference import moe_experts_naive, route_slots


def _inputs(T, d, de, E, k, seed, idx=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    wgu = torch.randn(E, 2 * de, d, generator=g, dtype=dtype) / d**0.5
    wd = torch.randn(E, d, de, generator=g, dtype=dtype) / de**0.5
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, wgu, wd)] + [idx, w.requires_grad_()]


def _check(args, atol=1e-10):
    x, wgu, wd, idx, w = args
    out = moe_experts(x, wgu, wd, idx, w)
    ref = moe_experts_naive(x, wgu, wd, idx, w)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, wgu, wd, w), dout)
    want = torch.autograd.grad(ref, (x, wgu, wd, w), dout)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "topk_weight"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("T,d,de,E,k", [(37, 16, 12, 6, 2), (5, 8, 6, 4, 1), (64, 24, 20, 16, 4)])
def test_matches_per_token_reference(T, d, de, E, k):
    _check(_inputs(T, d, de, E, k, seed=T * E))


def test_experts_with_zero_tokens_and_one_expert_taking_all():
    T, E = 21, 8
    # experts 0 and 3 get everything; the other six receive zero tokens
    idx = torch.stack([torch.full((T,), 3), torch.zeros(T, dtype=torch.long)], 1)
    _check(_inputs(T, 10, 7, E, 2, seed=1, idx=idx))
    _check(_inputs(T, 10, 7, E, 1, seed=2, idx=torch.full((T, 1), E - 1)))


def test_dropped_slots_contribute_nothing():
    args = _inputs(19, 8, 6, 5, 3, seed=3)
    args[3] = args[3].clone()
    args[3][::2, 1] = -1
    _check(args)
    x, wgu, wd, idx, w = args
    all_dropped = moe_experts(x, wgu, wd, torch.full_like(idx, -1), w)
    assert torch.count_nonzero(all_dropped) == 0


def test_float32_close_to_float64():
    x, wgu, wd, idx, w = _inputs(50, 32, 24, 8, 2, seed=4)
    ref = moe_experts(x, wgu, wd, idx, w)
    out = moe_experts(*(t.detach().float() for t in (x, wgu, wd)), idx, w.detach().float())
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-4)


def test_route_slots_is_stable_and_counts():
    idx = torch.tensor([[2, 0], [0, -1], [2, 1]])
    order, token, counts = route_slots(idx, 4)
    assert order.tolist() == [1, 2, 5, 0, 4]  # expert 0: slots 1, 2; expert 1: slot 5; expert 2: slots 0, 4
    assert token.tolist() == [0, 1, 2, 0, 2]
    assert counts.tolist() == [2, 1, 2, 0]


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="allowed"):
        resolve_backend("cutlass")
    monkeypatch.setenv("MOELAB_KERNELS", "nope")
    with pytest.raises(ValueError, match="MOELAB_KERNELS"):
        resolve_backend(None)


def test_empty_batch():
    x, wgu, wd, idx, w = _inputs(4, 8, 6, 3, 2, seed=5)
    out = moe_experts(x[:0], wgu, wd, idx[:0], w[:0])
    assert out.shape == (0, 8)
    out.sum().backward()
    assert wgu.grad is not None and torch.count_nonzero(wgu.grad) == 0
