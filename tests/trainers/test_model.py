import math

import pytest
import torch
import torch.nn.functional as F

from moelab.trainers.config import ModelConfig, MoEConfig, preset
from moelab.trainers.model import Attention, RMSNorm, apply_rope, build_model, rope_tables


def _cfg(**kw):
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base).validate()


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(n_experts=4, top_k=2, n_shared=1)])
def test_logits_shape_and_causality(moe):
    model = build_model(_cfg(moe=moe), seed=0)
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 50)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    # MoE routing is per token, so earlier positions cannot see later tokens either way.
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_attention_equals_explicit_gqa_softmax():
    cfg = _cfg(qkv_bias=True)
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_tables(cfg.hd, 64, cfg.rope_theta)
    B, S, nh, nkv, hd = 2, 9, 4, 2, 8
    q = apply_rope(attn.wq(x).view(B, S, nh, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(B, S, nkv, hd).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(B, S, nkv, hd).transpose(1, 2)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, nh * hd)
    torch.testing.assert_close(attn(x, cos, sin), attn.wo(y), atol=1e-5, rtol=1e-5)


def test_rope_is_relative():
    # <rope(q, m), rope(k, n)> depends only on m - n
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def at(v, pos):
        x = v.expand(1, 1, 32, 8)
        return apply_rope(x, cos, sin)[0, 0, pos]

    assert torch.dot(at(q, 5), at(k, 2)).item() == pytest.approx(torch.dot(at(q, 13), at(k, 10)).item(), rel=1e-5)


def test_rmsnorm():
    n = RMSNorm(6, 1e-6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(n(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_tied_embeddings_and_qk_norm_variants():
    m = build_model(_cfg(tie_embeddings=True, qk_norm="full"))
    assert m.lm_head.weight is m.embed.weight
    assert m.layers[0].attn.q_norm.weight.shape == (32,)
    m2 = build_model(_cfg(qk_norm="head"))
    assert m2.layers[0].attn.q_norm.weight.shape == (8,)
    assert m2(torch.randint(0, 50, (1, 5))).isfinite().all()


def test_same_seed_same_weights_and_dense_layers():
    cfg = _cfg(moe=MoEConfig(n_experts=4, top_k=1, dense_layers=(0,)))
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert [i for i, _ in a.moe_layers()] == [1]
    c = build_model(cfg, seed=4)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_moe_losses_summed_over_layers():
    model = build_model(preset("moe-tiny").model)
    model(torch.randint(0, 257, (2, 8)))
    losses = model.moe_losses()
    want = sum(m.aux_loss for _, m in model.moe_layers())
    torch.testing.assert_close(losses["aux_loss"], want)
    dense = build_model(preset("tiny").model)
    dense(torch.randint(0, 257, (2, 8)))
    assert dense.moe_losses()["aux_loss"].item() == 0.0


def test_init_scales_residual_outputs():
    model = build_model(_cfg(n_layers=8, d_model=64, d_ff=256, n_heads=4, n_kv_heads=4), seed=0)
    wo = model.layers[0].attn.wo.weight
    wq = model.layers[0].attn.wq.weight
    assert wq.std().item() == pytest.approx(0.02, rel=0.05)
    assert wo.std().item() == pytest.approx(0.02 / 4, rel=0.05)
