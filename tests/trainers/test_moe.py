import math

import pytest
import torch
import torch.nn.functional as F

from moelab.trainers.config import ModelConfig, MoEConfig
from moelab.trainers.moe import MoE, SwiGLU, capacity_mask, domain_expert_counts


def _moe(d=16, d_ff=24, seed=0, **moe):
    cfg = ModelConfig(d_model=d, d_ff=d_ff, n_heads=1, head_dim=2, moe=MoEConfig(**moe)).validate()
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def test_one_expert_top1_equals_dense_swiglu():
    m = _moe(n_experts=1, top_k=1, renormalize=True)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.gate_up.weight.copy_(m.w_gate_up[0])
        dense.down.weight.copy_(m.w_down[0])
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(m(x), dense(x))


def test_topk_routing_matches_explicit_formula():
    m = _moe(n_experts=5, top_k=2, renormalize=False)
    x = torch.randn(2, 7, 16)
    out = m(x)
    xt = x.reshape(-1, 16)
    probs = F.linear(xt, m.router.weight).softmax(-1)
    want = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        top = probs[t].topk(2)
        for p, e in zip(top.values, top.indices):
            g, u = (m.w_gate_up[e] @ xt[t]).split(m.d_expert)
            want[t] += p * (m.w_down[e] @ (F.silu(g) * u))
    torch.testing.assert_close(out.reshape(-1, 16), want, atol=1e-5, rtol=1e-5)


def test_renormalize_and_sigmoid_gates():
    m = _moe(n_experts=6, top_k=3, renormalize=True, score_func="sigmoid")
    x = torch.randn(11, 16)
    _, scores, idx, w = m.router(x)
    torch.testing.assert_close(scores, torch.sigmoid(x @ m.router.weight.t()))
    torch.testing.assert_close(w.sum(-1), torch.ones(11))
    torch.testing.assert_close(w, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True))


def test_shared_experts_add_a_swiglu_and_gate():
    m = _moe(n_experts=4, top_k=1, n_shared=2, d_shared=8, shared_gate=True)
    assert m.shared.d_ff == 16  # two shared experts of 8 == one SwiGLU of 16
    x = torch.randn(1, 6, 16)
    routed_only = _moe(n_experts=4, top_k=1)
    routed_only.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared")})
    xt = x.reshape(-1, 16)
    want = routed_only(x).reshape(-1, 16) + torch.sigmoid(m.shared_gate(xt)) * m.shared(xt)
    torch.testing.assert_close(m(x).reshape(-1, 16), want)


def test_aux_and_z_loss_hand_computed():
    m = _moe(d=2, d_ff=4, n_experts=2, top_k=1, renormalize=False)
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])  # logits = x itself
    m(x)
    logits = x[0]
    p = logits.softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])  # tokens 0 and 2 pick expert 0, token 1 picks expert 1
    assert m.aux_loss.item() == pytest.approx(2 * (f * p.mean(0)).sum().item(), rel=1e-6)
    lse = torch.log(torch.exp(logits).sum(-1))
    assert m.z_loss.item() == pytest.approx((lse**2).mean().item(), rel=1e-6)
    # perfectly uniform routing and probabilities give the minimum, 1.0
    m2 = _moe(d=2, d_ff=4, n_experts=2, top_k=1)
    with torch.no_grad():
        m2.router.weight.zero_()
    m2.router.force_balanced = True
    m2(torch.randn(1, 4, 2))
    assert m2.aux_loss.item() == pytest.approx(1.0)
    assert m2.z_loss.item() == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_bias_update_hand_computed_and_selection_only():
    m = _moe(n_experts=3, top_k=1, bias_update_rate=0.1)
    m.load_accum.copy_(torch.tensor([5.0, 1.0, 3.0]))  # mean 3
    m.update_bias()
    torch.testing.assert_close(m.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0]))
    assert m.load_accum.sum() == 0
    # The bias changes which expert is chosen, never the gate value.
    x = torch.randn(8, 16)
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    _, scores, idx, w = m.router(x)
    assert (idx == 0).all()
    torch.testing.assert_close(w[:, 0], torch.ones(8))  # renormalised top-1
    m.router.renormalize = False
    _, scores, idx, w = m.router(x)
    torch.testing.assert_close(w[:, 0], scores[:, 0])


def test_bias_update_reduces_imbalance_on_skewed_router():
    m = _moe(n_experts=8, top_k=2, bias_update_rate=0.001)
    with torch.no_grad():
        m.router.weight[0] += 0.1  # experts 0 and 1 take most tokens
        m.router.weight[1] += 0.05
    g = torch.Generator().manual_seed(0)
    imbalance = []
    for _ in range(400):
        with torch.no_grad():
            m(torch.randn(1, 256, 16, generator=g).abs())
        load = m.stats["load"]
        imbalance.append((load.max() / load.mean()).item())
        m.update_bias()
    late = sum(imbalance[-50:]) / 50
    assert imbalance[0] > 3.0
    assert late < 1.5
    assert m.router.expert_bias[0] < 0 < m.router.expert_bias[2:].mean()


def test_capacity_drops_exactly_the_slots_over_capacity():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]])
    keep = capacity_mask(idx, 3, capacity=2)
    # expert 0 slots in (token, k) order: (0,0) (1,0) (2,0) (3,1) -> the last two dropped
    # expert 1: (0,1) (2,1) (3,0) (4,1) -> last two dropped; expert 2: (1,1) (4,0) -> kept
    want = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 0], [1, 0]], dtype=torch.bool)
    assert torch.equal(keep, want)


def test_capacity_in_layer_drops_and_reports():
    m = _moe(n_experts=4, top_k=2, capacity_factor=1.0)
    m.router.force_balanced = False
    with torch.no_grad():
        m.router.weight[0] += 5.0  # expert 0 wanted by nearly everyone
    x = torch.randn(1, 40, 16).abs()
    out = m(x)
    capacity = math.ceil(1.0 * 40 * 2 / 4)
    assert m.stats["load"].max() <= capacity
    assert m.stats["dropped"] > 0
    assert m.stats["load"].sum() + m.stats["dropped"] == 80
    # a token with both slots dropped gets a zero routed output
    m2 = _moe(n_experts=4, top_k=1, capacity_factor=0.25)
    with torch.no_grad():
        m2.router.weight.zero_()
        m2.router.weight[0, 0] = 1.0
    x2 = torch.zeros(1, 8, 16)
    x2[..., 0] = 1.0
    y = m2(x2)
    assert torch.count_nonzero(y[0, 2:]) == 0 and torch.count_nonzero(y[0, :2]) > 0


def test_force_balanced_spreads_evenly():
    m = _moe(n_experts=4, top_k=2, force_balanced=True)
    m(torch.randn(2, 8, 16))
    assert m.stats["load"].tolist() == [8.0, 8.0, 8.0, 8.0]


def test_gradients_reach_router_and_experts():
    m = _moe(n_experts=4, top_k=2)
    m(torch.randn(2, 5, 16)).sum().add(m.aux_loss + m.z_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_domain_expert_counts_hand_computed_with_drops():
    # A fresh random batch through a layer that drops slots: the counts are a per-slot tally by the row's domain.
    m = _moe(n_experts=4, top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight[1] += 3.0  # expert 1 over capacity, so some slots are -1
    B, S, K = 3, 7, 5
    gen = torch.Generator().manual_seed(1)
    m(torch.randn(B, S, 16, generator=gen).abs())
    domains = torch.randint(0, K, (B,), generator=gen)
    idx = m.stats["topk_idx"]
    assert (idx < 0).any()
    want = torch.zeros(K, 4, dtype=torch.int64)
    for t in range(B * S):
        for e in idx[t].tolist():
            if e >= 0:
                want[domains[t // S], e] += 1
    got = domain_expert_counts(idx, domains.repeat_interleave(S), K, 4)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(got.sum(0).float(), m.stats["load"])  # summed over domains: the layer's load
