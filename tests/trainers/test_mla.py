"""Multi-head Latent Attention (DeepSeek-V2/V3): against explicit per-head float64 math, against HF transformers'
DeepseekV3Attention with the same weights, causality, parameter and FLOP accounting, config validation."""

import math

import pytest
import torch

from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, load_run_config
from moelab.trainers.model import MLA, build_model, rope_tables

# 4 heads; per head 8 nope + 4 rope query/key features, values of 6; KV latent 16.
D, H, NOPE, ROPE, V, KV = 32, 4, 8, 4, 6, 16


def _cfg(**kw):
    base = dict(vocab_size=50, d_model=D, n_layers=2, n_heads=H, d_ff=48, max_seq_len=64, norm_eps=1e-6,
                attention="mla", kv_lora_rank=KV, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V)
    base.update(kw)
    return ModelConfig(**base).validate()


def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_ref(x, pos, theta=10000.0):
    """Rotate the pairs (i, i + r/2) of a vector x [r] at position pos by pos * theta^(-2i/r)."""
    r = x.shape[-1]
    out = x.clone()
    for i in range(r // 2):
        a = pos * theta ** (-2 * i / r)
        c, s = math.cos(a), math.sin(a)
        out[i] = x[i] * c - x[i + r // 2] * s
        out[i + r // 2] = x[i + r // 2] * c + x[i] * s
    return out


def _reference(attn: MLA, x: torch.Tensor, q_lora: int) -> torch.Tensor:
    """MLA written out per token and per head in float64: latents, one shared rope key, explicit softmax."""
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    x = x.double()
    B, S, _ = x.shape
    out = torch.zeros(B, S, D, dtype=torch.float64)
    for b in range(B):
        q, k, v = {}, {}, {}
        for t in range(S):
            xt = x[b, t]
            qt = W["wq_b.weight"] @ _rms(W["wq_a.weight"] @ xt, W["q_norm.weight"]) if q_lora else W["wq.weight"] @ xt
            lat = W["wkv_a.weight"] @ xt
            c_kv, k_pe = lat[:KV], _rope_ref(lat[KV:], t)
            kv = W["wkv_b.weight"] @ _rms(c_kv, W["kv_norm.weight"])
            for h in range(H):
                qh = qt[h * (NOPE + ROPE):(h + 1) * (NOPE + ROPE)]
                q[t, h] = torch.cat([qh[:NOPE], _rope_ref(qh[NOPE:], t)])
                kvh = kv[h * (NOPE + V):(h + 1) * (NOPE + V)]
                k[t, h] = torch.cat([kvh[:NOPE], k_pe])  # the same rotary key for every head
                v[t, h] = kvh[NOPE:]
        for t in range(S):
            heads = []
            for h in range(H):
                scores = torch.stack([q[t, h] @ k[u, h] for u in range(t + 1)]) / math.sqrt(NOPE + ROPE)
                p = torch.softmax(scores, 0)
                heads.append(sum(p[u] * v[u, h] for u in range(t + 1)))
            out[b, t] = W["wo.weight"] @ torch.cat(heads)
    return out


@pytest.mark.parametrize("q_lora", [0, 12])
def test_mla_equals_per_head_float64_reference(q_lora):
    cfg = _cfg(q_lora_rank=q_lora)
    torch.manual_seed(0)
    attn = MLA(cfg).double()
    for n, p in attn.named_parameters():  # norms away from 1 so that a missing norm shows
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)
    assert hasattr(attn, "wq_a") == bool(q_lora) and hasattr(attn, "wq") == (not q_lora)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    cos, sin = rope_tables(ROPE, 64, cfg.rope_theta)
    # RoPE runs in fp32 whatever the input dtype (as the model does), hence fp32-level tolerance.
    torch.testing.assert_close(attn(x, cos, sin), _reference(attn, x, q_lora), atol=2e-6, rtol=1e-5)


def _hf_attention(q_lora: int, interleave: bool):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=50, hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora or None,
        kv_lora_rank=KV, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, rope_interleave=interleave,
        rms_norm_eps=1e-6, max_position_embeddings=64, num_hidden_layers=1, attention_bias=False,
        attn_implementation="sdpa")
    torch.manual_seed(1)
    hf = DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "proj" in n else 1.0) + (1.0 if "layernorm" in n else 0.0))
    return hf, DeepseekV3RotaryEmbedding(hf_cfg)


HF_NAMES = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
            "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


def _deinterleave_rope_rows(w: torch.Tensor, block: int, offset: int) -> torch.Tensor:
    """Rows [offset, offset + ROPE) of every `block` rows reordered (0, 2, .., 1, 3, ..): interleaved pairs
    (2i, 2i+1) -> half-split pairs (i, i + ROPE/2), the permutation an importer of DeepSeek weights applies."""
    perm = torch.cat([torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)])
    w = w.clone()
    for start in range(0, w.shape[0], block):
        rows = w[start + offset:start + offset + ROPE].clone()
        w[start + offset:start + offset + ROPE] = rows[perm]
    return w


@pytest.mark.parametrize("q_lora", [0, 12])
@pytest.mark.parametrize("interleave", [False, True], ids=["half-split", "interleaved+permuted"])
def test_mla_matches_hf_deepseek_v3_attention(q_lora, interleave):
    hf, rotary = _hf_attention(q_lora, interleave)
    ours = MLA(_cfg(q_lora_rank=q_lora)).eval()
    state = {}
    for name, p in hf.state_dict().items():
        module, leaf = name.split(".")
        w = p
        if interleave and module in ("q_proj", "q_b_proj"):
            w = _deinterleave_rope_rows(w, NOPE + ROPE, NOPE)  # per head: [nope | rope]
        elif interleave and module == "kv_a_proj_with_mqa":
            w = _deinterleave_rope_rows(w, KV + ROPE, KV)  # [latent | rope key]
        state[f"{HF_NAMES[module]}.{leaf}"] = w
    ours.load_state_dict(state)  # strict: every tensor maps 1:1
    x = torch.randn(2, 11, D)
    cos_hf, sin_hf = rotary(x, torch.arange(11)[None])
    want, _ = hf(x, (cos_hf, sin_hf), None)
    cos, sin = rope_tables(ROPE, 64, 10000.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), want, atol=1e-5, rtol=1e-4)


def test_mla_model_is_causal_and_uses_rope_width_tables():
    model = build_model(_cfg(q_lora_rank=12), seed=0)
    assert model.rope_cos.shape == (64, ROPE // 2)  # tables for the rope part only
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    after = model(changed)
    torch.testing.assert_close(after[:, :7], logits[:, :7])
    assert not torch.allclose(after[:, 7:], logits[:, 7:])


def _numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kw", [
    dict(), dict(q_lora_rank=12), dict(tie_embeddings=True),
    dict(q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0),  # derived widths
    dict(q_lora_rank=12, moe=MoEConfig(n_experts=4, top_k=2, n_shared=1, dense_layers=(0,)), mtp_depth=2),
], ids=["plain", "q_lora", "tied", "derived", "moe+mtp"])
def test_mla_param_counts_equal_built_model(kw):
    cfg = _cfg(**kw)
    model = build_model(cfg)
    assert cfg.param_counts()["total"] == _numel(model)
    attn = model.layers[0].attn
    assert cfg.attention_params() == _numel(attn)


def test_mla_derived_widths_follow_deepseek_ratios():
    cfg = ModelConfig(d_model=64, n_heads=4, attention="mla").validate()  # head_dim 16
    assert (cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_dim, cfg.kv_rank) == (16, 8, 16, 64)
    assert cfg.qk_dim == 24


def test_mla_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=4, max_seq_len=16, attention="mla",
                      kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=3).validate()
    # attention: wq 8x(2 heads x 4) = 64, wkv_a 8x(4 + 2) = 48, kv_norm 4, wkv_b 4x(2 x (2 + 3)) = 40,
    # wo (2 x 3)x8 = 48 -> 204; two norms 16; SwiGLU 3x8x4 = 96; final norm 8: 324 non-embedding parameters
    assert cfg.param_counts()["non_embedding"] == 324
    # 6 x (324 + head 10x8) + attention 6 x 1 layer x seq 5 x 2 heads x (qk 2+2 + v 3)
    assert cfg.flops_per_token(5) == 6 * (324 + 80) + 6 * 5 * 2 * (4 + 3) == 2844
    # GQA keeps the old convention: 12 x layers x seq x heads x head_dim
    gqa = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=4, max_seq_len=16).validate()
    assert gqa.flops_per_token(5) == 6 * (gqa.param_counts()["active_non_embedding"] + 80) + 12 * 5 * 2 * 4


@pytest.mark.parametrize("over,field", [
    ({"model.attention": "mla"}, "model.n_kv_heads"),  # tiny has 2 kv heads for 4 heads
    ({"model.kv_lora_rank": 32}, "model.kv_lora_rank"),  # an MLA width under GQA
    ({"model.attention": "mla", "model.n_kv_heads": 0, "model.qk_rope_head_dim": 3}, "model.qk_rope_head_dim"),
    ({"model.attention": "mla", "model.n_kv_heads": 0, "model.qk_norm": "head"}, "model.qk_norm"),
    ({"model.attention": "mla", "model.n_kv_heads": 0, "model.qkv_bias": True}, "model.qkv_bias"),
    ({"model.attention": "mla", "model.n_kv_heads": 0, "model.q_lora_rank": -1}, "model.q_lora_rank"),
    ({"model.attention": "flash"}, "model.attention"),
])
def test_mla_config_errors_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_run_config("tiny", over)


def test_mla_preset_trains_a_step(tmp_path):
    from moelab.trainers.loop import StepStats, Trainer

    rc = load_run_config("mla-mtp-tiny", {"train.batch_size": 2, "train.seq_len": 16, "train.eval_batches": 1})
    tr = Trainer(rc, tmp_path, progress=False)
    row = tr.train_step(StepStats())
    assert math.isfinite(row["loss"]) and math.isfinite(row["mtp_loss"])


def test_plan_counts_mla_and_mtp():
    from moelab.trainers.config import preset
    from moelab.trainers.plan import PlanInputs, make_plan

    rc = preset("mla-mtp-tiny")  # d 64, 4 heads: nope 16, rope 8, v 16, KV latent 64, query latent 32; d_ff 192
    r = make_plan(rc, PlanInputs(gpus=2, seq=64, micro_batch=2, batch=8))
    pc = rc.model.param_counts()
    assert r["params_total"] == pc["total"] and pc["mtp"] > 0
    gib = 2**30
    # root = embedding + head + final norm (2 x 257 x 64 + 64); the largest unit is the MTP module
    assert r["mem_gathered_gib"] * gib == pytest.approx(2 * (32960 + 2 * pc["mtp"]))
    # per token (plan.py's table; N(n) = 6n + 4): MLA q, k 4 x 96, kv up-projection 2(4*16 + 64), output 2*64,
    # logsumexp 4*4, KV latent N(64) + 128, query latent N(32) + 64 = 1560; a block: attention norm N(64) + 128,
    # MLA, FFN norm N(64), dense FFN 128 + 8*192 = 4128, two; head 8 + N(64) + 128 + 4*257 + 8 = 1560; the MTP
    # depth: embedding and hidden norms 2 N(64), their concatenation 4*64, a block, its output norm N(64) + 128,
    # the head's 4*257 + 8 = 6712
    mla = 4 * 96 + 2 * (4 * 16 + 64) + 2 * 64 + 16 + (388 + 128) + (196 + 64)
    block = 516 + mla + 388 + 128 + 8 * 192
    assert (mla, block) == (1560, 4128)
    per_token = 2 * block + 1560 + (2 * 388 + 256 + block + 516 + 4 * 257 + 8)
    assert r["act_bytes_per_token"] == per_token == 16528
    assert r["mem_activations_gib"] * gib == pytest.approx(2 * 64 * per_token)
    assert r["flops_per_token"] == rc.model.flops_per_token(64)
