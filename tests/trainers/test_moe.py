import math

import pytest
import torch
import torch.nn.functional as F

from moelab.trainers.config import ModelConfig, MoEConfig, load_run_config
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


# -- DeepSeek-V3 routing: group-limited top-k, routed scaling factor, sequence-wise balance loss ------------


def _router_with_scores(scores, bias=None, **moe):
    """A sigmoid router whose scores for input torch.logit(scores) are `scores` (weight = identity)."""
    T, E = scores.shape
    m = _moe(d=E, d_ff=8, n_experts=E, score_func="sigmoid", **moe)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(E))
        if bias is not None:
            m.router.expert_bias.copy_(bias)
    return m.router, torch.logit(scores)


def test_group_limited_topk_hand_computed():
    # 6 experts in 3 groups of 2: {0,1} {2,3} {4,5}; a group scores the sum of its two best (biased) scores.
    s = torch.tensor([[0.9, 0.1, 0.7, 0.6, 0.5, 0.4],     # groups 1.0, 1.3, 0.9 -> group 1
                      [0.2, 0.3, 0.1, 0.15, 0.95, 0.05]])  # groups 0.5, 0.25, 1.0 -> group 2
    plain, x = _router_with_scores(s, top_k=2, renormalize=False)
    _, _, idx, _ = plain(x)
    assert [sorted(r) for r in idx.tolist()] == [[0, 2], [1, 4]]  # plain top-2 crosses groups
    grouped, x = _router_with_scores(s, top_k=2, renormalize=False, n_group=3, topk_group=1)
    _, _, idx, w = grouped(x)
    assert idx.tolist() == [[2, 3], [4, 5]]  # the best expert 0 is outside token 0's best group
    torch.testing.assert_close(w, torch.tensor([[0.7, 0.6], [0.95, 0.05]]))
    # two groups allowed: token 0 keeps groups {1, 0}, so plain top-2 again; token 1 keeps {2, 0}
    two, x = _router_with_scores(s, top_k=2, renormalize=False, n_group=3, topk_group=2)
    assert [sorted(r) for r in two(x)[2].tolist()] == [[0, 2], [1, 4]]
    # The bias enters the group score (group 2 of token 0: 0.5 + (0.4 + 0.5) = 1.4 > 1.3) but not the gates.
    biased, x = _router_with_scores(s, bias=torch.tensor([0, 0, 0, 0, 0, 0.5]), top_k=2, renormalize=False,
                                    n_group=3, topk_group=1)
    _, _, idx, w = biased(x)
    assert idx[0].tolist() == [5, 4]  # biased selection scores 0.9 and 0.5
    torch.testing.assert_close(w[0], torch.tensor([0.4, 0.5]))


@pytest.mark.parametrize("E,k,G,TG,norm,rsf", [(16, 4, 4, 2, True, 2.5), (12, 3, 3, 1, False, 1.0),
                                               (8, 2, 1, 1, True, 1.0), (32, 8, 8, 4, True, 2.5)])
def test_router_matches_hf_deepseek_v3(E, k, G, TG, norm, rsf):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    d, T = 24, 200
    hf_cfg = DeepseekV3Config(hidden_size=d, n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=TG,
                              norm_topk_prob=norm, routed_scaling_factor=rsf)
    hf = DeepseekV3TopkRouter(hf_cfg)
    ours = _moe(d=d, d_ff=8, n_experts=E, top_k=k, n_group=G, topk_group=TG, score_func="sigmoid",
                renormalize=norm, routed_scaling_factor=rsf).router
    gen = torch.Generator().manual_seed(E * 100 + k)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, d, generator=gen) * 0.3)
        hf.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        ours.weight.copy_(hf.weight)
        ours.expert_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(T, d, generator=gen)
    with torch.no_grad():
        _, hf_w, hf_idx = hf(x)
        _, _, idx, w = ours(x)
    hf_idx, hf_perm = hf_idx.sort(-1)  # HF's topk is unsorted: compare as sets, weights in index order
    idx, perm = idx.sort(-1)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w.gather(-1, perm), hf_w.gather(-1, hf_perm))
    if G > 1:  # the group limit binds on this input: plain top-k would choose differently somewhere
        plain = torch.topk(torch.sigmoid(x @ ours.weight.t()) + ours.expert_bias, k).indices.sort(-1).values
        assert not torch.equal(plain, idx)
        groups = (idx // (E // G)).tolist()
        assert max(len(set(r)) for r in groups) <= TG


@pytest.mark.parametrize("shared", [0, 1])
def test_routed_scaling_factor_scales_routed_output_exactly(shared):
    kw = dict(n_experts=6, top_k=2, score_func="sigmoid", n_shared=shared, seed=3)
    one, scaled = _moe(**kw), _moe(routed_scaling_factor=2.5, **kw)
    scaled.load_state_dict(one.state_dict())
    x = torch.randn(2, 7, 16)
    y1, y25 = one(x), scaled(x)
    xt = x.reshape(-1, 16)
    base = one.shared(xt).view_as(x) if shared else torch.zeros_like(x)
    torch.testing.assert_close(y25 - base, 2.5 * (y1 - base), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y25, y1)
    w1, w25 = one.router(xt)[3], scaled.router(xt)[3]
    torch.testing.assert_close(w25, 2.5 * w1)
    torch.testing.assert_close(w25.sum(-1), torch.full((14,), 2.5))  # renormalised, then scaled
    # The balance statistics do not see the gates.
    for name in ("aux_loss", "z_loss", "seq_aux_loss"):
        assert torch.equal(getattr(one, name), getattr(scaled, name)), name
    assert torch.equal(one.stats["load"], scaled.stats["load"])


def test_seq_aux_loss_hand_computed():
    m = _moe(d=2, d_ff=4, n_experts=2, top_k=1, renormalize=False)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    # logits = x. Sequence 0: tokens choose experts 0 and 1; sequence 1: both choose expert 0.
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 0.0]]])
    m(x)
    # f_i = E / (k S) * count = count; P_i = mean softmax; loss_b = sum_i f_i P_i
    seq0 = 1.0  # f = [1, 1]: the sum of the mean probabilities
    p0 = (1 / (1 + math.exp(-3)) + 1 / (1 + math.exp(-1))) / 2  # mean P_0 of sequence 1
    seq1 = 2 * p0  # f = [2, 0]
    assert m.seq_aux_loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # The batch-level loss sees 3 of 4 slots on expert 0: a different number.
    assert m.aux_loss.item() != pytest.approx(m.seq_aux_loss.item(), rel=1e-3)


def test_seq_aux_loss_loop_reference_with_sigmoid_and_drops():
    # Sigmoid scores are normalised per token (s' = s / sum s); capacity drops do not change the loss.
    m = _moe(n_experts=6, top_k=2, score_func="sigmoid", capacity_factor=0.5, n_group=3, topk_group=2)
    B, S, E, k = 3, 5, 6, 2
    x = torch.randn(B, S, 16)
    m(x)
    assert m.stats["dropped"] > 0
    _, scores, idx, _ = m.router(x.reshape(-1, 16))
    want = 0.0
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        for i in range(E):
            f = E / (k * S) * sum(i in idx[t].tolist() for t in rows)
            P = sum((scores[t, i] / scores[t].sum()).item() for t in rows) / S
            want += f * P / B
    assert m.seq_aux_loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_seq_aux_loss_equals_batch_aux_loss_for_one_sequence(score_func):
    m = _moe(n_experts=8, top_k=3, score_func=score_func)
    m(torch.randn(1, 13, 16))
    torch.testing.assert_close(m.seq_aux_loss, m.aux_loss)
    m(torch.randn(4, 13, 16))  # many sequences: the per-sequence loss is at least as large here
    assert m.seq_aux_loss > m.aux_loss


def test_seq_aux_loss_gradient_reaches_router():
    m = _moe(n_experts=4, top_k=2, score_func="sigmoid")
    m(torch.randn(2, 5, 16))
    m.seq_aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


# Ops that make the host wait for the device: a scalar read, or an output whose size depends on values.
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "repeat_interleave")


def _sync_sites(fn) -> list[tuple[str, int]]:
    """Run fn; for each op that syncs (and each boolean-mask index), the innermost (function, line) of
    moelab/trainers/moe.py on the Python stack."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import moelab.trainers.moe as moe_module

    sites = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__
            sync = any(s in name for s in _SYNC_OPS)
            if name.startswith(("index.", "index_put")) and len(args) > 1:
                sync |= any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
            if sync:
                frames = [f for f in traceback.extract_stack() if f.filename == moe_module.__file__]
                sites.append((frames[-1].name, frames[-1].lineno) if frames else ("?", 0))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return sites


def test_deepseek_v3_options_add_no_host_sync():
    """Whatever a forward + backward syncs on already (the logged load statistics, the CPU reference expert
    kernel), the DeepSeek-V3 options add nothing, and no sync comes from the router, the group limit or the
    sequence-wise loss."""
    import inspect

    from moelab.trainers.moe import Router

    x = torch.randn(2, 8, 16)
    base = _moe(n_experts=8, top_k=2, score_func="sigmoid")
    dsv3 = _moe(n_experts=8, top_k=2, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                seq_aux_loss_coef=1e-2, bias_update_rate=1e-3)
    dsv3.load_state_dict(base.state_dict())

    def run(m):
        return lambda: (m(x).sum() + m.seq_aux_loss + m.aux_loss).backward()

    sites = _sync_sites(run(dsv3))
    assert sites == _sync_sites(run(base))
    banned = set()
    for fn in (Router.forward, Router.group_limit, MoE.sequence_balance_loss):
        lines, first = inspect.getsourcelines(fn)
        banned |= set(range(first, first + len(lines)))
    lines, first = inspect.getsourcelines(MoE.forward)
    banned |= {first + i for i, l in enumerate(lines) if "self.router(" in l or "seq_aux_loss" in l}
    assert not [s for s in sites if s[1] in banned], sites
    # the recorder does see a sync when there is one
    assert _sync_sites(lambda: base.seq_aux_loss.item()) == [("?", 0)]


def test_dsv3_options_validated_naming_the_field():
    from moelab.trainers.config import ConfigError

    def cfg(**moe):
        return ModelConfig(d_model=16, d_ff=24, n_heads=1, head_dim=2, moe=MoEConfig(**moe)).validate()

    cfg(n_experts=8, top_k=4, n_group=4, topk_group=2)  # 2 groups of 2 hold 4 experts: fine
    bad = [({"n_experts": 8, "n_group": 3}, "model.moe.n_group", "a divisor of model.moe.n_experts=8"),
           ({"n_experts": 8, "n_group": 8, "topk_group": 2}, "model.moe.n_group", ">= 2 experts"),
           ({"n_experts": 8, "n_group": 0}, "model.moe.n_group", "a divisor"),
           ({"n_experts": 8, "n_group": 4, "topk_group": 5}, "model.moe.topk_group", "1..model.moe.n_group=4"),
           ({"n_experts": 8, "n_group": 4, "topk_group": 0}, "model.moe.topk_group", "1..model.moe.n_group=4"),
           ({"n_experts": 8, "top_k": 3, "n_group": 4, "topk_group": 1}, "model.moe.topk_group", ">= 2"),
           ({"n_experts": 8, "routed_scaling_factor": 0.0}, "model.moe.routed_scaling_factor", "positive"),
           ({"n_experts": 8, "seq_aux_loss_coef": -1e-4}, "model.moe.seq_aux_loss_coef", ">= 0")]
    for moe, field, allowed in bad:
        with pytest.raises(ConfigError) as e:
            cfg(**moe)
        assert field in str(e.value) and allowed in str(e.value), (moe, str(e.value))


def test_dsv3_preset_keeps_moe_1b_active_params():
    rc = load_run_config("moe-1b-dsv3")
    m = rc.model.moe
    assert (m.score_func, m.renormalize, m.routed_scaling_factor, m.n_group, m.topk_group) == ("sigmoid", True,
                                                                                              2.5, 8, 4)
    assert m.n_shared == 1 and m.dense_layers == (0,) and m.aux_loss_coef == 0 and m.bias_update_rate > 0
    assert 0 < m.seq_aux_loss_coef <= 1e-3
    ref = load_run_config("moe-1b").model.param_counts()["active"]
    assert abs(rc.model.param_counts()["active"] / ref - 1) < 0.02
    assert rc.model.d_expert < load_run_config("moe-1b").model.d_expert  # finer-grained experts


def test_seq_aux_loss_in_objective_and_logged(tmp_path):
    import json

    from moelab.trainers.loop import Trainer, train
    from moelab.trainers.model import build_model

    over = {"train.log_every": 1, "train.eval_every": 0, "train.batch_size": 4, "train.seq_len": 32,
            "train.steps": 3, "train.ckpt_every": 0, "model.moe.seq_aux_loss_coef": 0.5,
            "model.moe.score_func": "sigmoid", "model.moe.n_group": 2, "model.moe.topk_group": 1,
            "model.moe.routed_scaling_factor": 2.5, "model.moe.bias_update_rate": 1e-3}
    rc = load_run_config("moe-tiny", over)
    # the objective adds alpha x (sum over layers of the per-layer loss)
    tr = Trainer(rc, tmp_path / "obj", progress=False)
    tokens = tr.source.batch("train", 0, 4, 32).tokens
    obj, ce, moe = tr._loss(tokens)
    layers = [l for _, l in tr.model.moe_layers()]
    torch.testing.assert_close(moe["seq_aux_loss"], sum(l.seq_aux_loss for l in layers))
    mc = rc.model.moe
    torch.testing.assert_close(obj, ce + mc.aux_loss_coef * moe["aux_loss"] + mc.z_loss_coef * moe["z_loss"]
                               + 0.5 * moe["seq_aux_loss"])
    # the model's own sum agrees
    model = build_model(rc.model, seed=0)
    model(tokens[:, :-1])
    torch.testing.assert_close(model.moe_losses()["seq_aux_loss"],
                               sum(l.seq_aux_loss for _, l in model.moe_layers()))
    train(rc, tmp_path / "run", progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["seq_aux_loss"]) and r["seq_aux_loss"] > 0 for r in rows)


_EP = {"train.batch_size": 4, "train.seq_len": 16, "model.moe.score_func": "sigmoid", "model.moe.n_group": 2,
       "model.moe.topk_group": 1, "model.moe.routed_scaling_factor": 2.5, "model.moe.seq_aux_loss_coef": 0.5,
       "model.moe.aux_loss_coef": 0.0, "model.moe.z_loss_coef": 0.0}


def _ep_objective(model, tokens, coef):
    """Cross-entropy + coef x the sequence-wise loss, summed over layers, on `tokens` [B, S+1]."""
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    seq = sum(l.seq_aux_loss for _, l in model.moe_layers())
    return ce + coef * seq, seq


def _ep_batch(rc):
    from moelab.trainers.data import build_source

    return build_source(rc.data, 0).batch("train", 0, rc.train.batch_size, rc.train.seq_len).tokens


def _ep_seq_loss_rank(rank, world_size, ep):
    from moelab.trainers.model import build_model
    from moelab.trainers.parallel import full_tensor, init_parallel, parallelize

    rc = load_run_config("moe-tiny", _EP)
    par = init_parallel(ep, rc.model.moe.n_experts)
    model = build_model(rc.model, seed=0)
    parallelize(model, par)
    obj, seq = _ep_objective(model, par.local_rows(_ep_batch(rc)), rc.model.moe.seq_aux_loss_coef)
    obj.backward()
    return {"seq": float(par.all_reduce(seq.detach(), "mean")),
            "grads": {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}}


def test_seq_aux_loss_under_ep_needs_no_communication():
    """On 2 EP ranks each holding half the sequences, the mean of the rank-local sequence-wise losses and the
    data-parallel mean of the gradients equal one process on the whole batch (group-limited routing on)."""
    from distributed import run_distributed

    from moelab.trainers.model import build_model

    rc = load_run_config("moe-tiny", _EP)
    ref = build_model(rc.model, seed=0)
    obj, seq = _ep_objective(ref, _ep_batch(rc), rc.model.moe.seq_aux_loss_coef)
    obj.backward()
    for res in run_distributed(_ep_seq_loss_rank, 2, 2):
        assert res["seq"] == pytest.approx(float(seq.detach()), rel=1e-5)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=0, msg=name)
