"""Hugging Face checkpoints built offline with transformers, saved locally, loaded by moelab."""

import json

import pytest
import torch

import transformers  # noqa: E402  (dev extra)

from hf_configs import DEEPSEEK_V3, QWEN3_8B, QWEN3_30B_A3B  # noqa: E402
from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, UpcycleConfig  # noqa: E402
from moelab.trainers.hf import HFLoadError, load_hf, load_hf_dense  # noqa: E402
from moelab.trainers.upcycle import upcycle  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _save(tmp_path, config_cls, model_cls, spread_router=False, shard=None, **kw):
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if spread_router and name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)  # random routing that spreads the batch over every expert
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones, so a norm mapped to the wrong place changes the logits
    path = tmp_path / model_cls.__name__
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model, path


def _compare(hf_model, ours, rtol=1e-4):
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)
    return tokens


@pytest.mark.parametrize("family,kw", [("Llama", {}), ("Qwen2", {}),
                                       ("Qwen3", dict(head_dim=16))])  # per-head QK-norm, head_dim != d / heads
def test_dense_logits_match_and_upcycling_preserves_them(tmp_path, family, kw):
    cfg_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    hf_model, path = _save(tmp_path, cfg_cls, model_cls, shard="40KB", **kw)
    assert (path / "model.safetensors.index.json").exists()  # sharded
    cfg, ours = load_hf_dense(path)
    assert cfg.qkv_bias == (family == "Qwen2")
    assert cfg.qk_norm == ("head" if family == "Qwen3" else "none") and cfg.hd == kw.get("head_dim", 8)
    tokens = _compare(hf_model, ours)
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2, renormalize=True)
    m = upcycle(ours, moe, UpcycleConfig(router_init="virtual_group", router_std=0.5, scaling="nvidia"))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), hf_model(tokens).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,kw", [
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, norm_topk_prob=False)),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, norm_topk_prob=True)),
    ("Olmoe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
                      norm_topk_prob=True)),
    ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                      num_hidden_layers=3, mlp_only_layers=[1])),  # layer 1 a dense MLP of intermediate_size
])
def test_moe_logits_match(tmp_path, family, kw):
    cfg_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    hf_model, path = _save(tmp_path, cfg_cls, model_cls, spread_router=True, **kw)
    cfg, ours = load_hf(path)
    assert cfg.moe.n_experts == 4
    assert cfg.moe.dense_layers == tuple(kw.get("mlp_only_layers", ()))
    _compare(hf_model, ours)
    for _, layer in ours.moe_layers():
        assert (layer.stats["load"] > 0).all()  # every expert was exercised by the batch


def test_errors_name_the_file_or_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")
    hf_model, path = _save(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    cfg = json.loads((path / "config.json").read_text())
    with pytest.raises(HFLoadError, match="not a dense family"):
        _, mix = _save(tmp_path, transformers.MixtralConfig, transformers.MixtralForCausalLM, num_local_experts=2)
        load_hf_dense(mix)
    # a wrong width in config.json: the tensor shape check names the tensor and the file
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=40)))
    with pytest.raises(HFLoadError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_hf(path)
    # an unsupported architecture
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="model_type"):
        load_hf(path)
    # a missing tensor
    from safetensors.torch import load_file, save_file

    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(HFLoadError, match="'model.layers.1.self_attn.k_proj.weight' not found"):
        load_hf(path)


def test_qwen3_moe_attention_bias_needs_a_zero_output_bias(tmp_path):
    # attention_bias biases q, k, v and o; moelab has q/k/v biases only, so o's must be zero to load exactly
    kw = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, attention_bias=True)
    hf_model, path = _save(tmp_path, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                           spread_router=True, **kw)
    with torch.no_grad():
        for layer in hf_model.model.layers:  # transformers initialises biases at zero
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0, 0.5)
    hf_model.save_pretrained(path)
    with pytest.raises(HFLoadError, match=r"'model.layers.0.self_attn.o_proj.bias' is non-zero"):
        load_hf(path)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    hf_model.save_pretrained(path)
    cfg, ours = load_hf(path)
    assert cfg.qkv_bias and cfg.qk_norm == "head"
    _compare(hf_model, ours)


def test_a_tensor_without_a_place_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _save(tmp_path, transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=8)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(HFLoadError, match=r"'model.layers.0.self_attn.extra.weight'.* have no place"):
        load_hf(path)


@pytest.mark.parametrize("published,total,active", [(QWEN3_30B_A3B, 30.5e9, 3.3e9), (QWEN3_8B, 8.2e9, None)])
def test_qwen3_published_counts(published, total, active):
    """Qwen3-30B-A3B: 30.5B total, 3.3B activated; Qwen3-8B: 8.2B (the model cards). The total also equals
    the count of transformers' own model built from the same config (on the meta device: no memory)."""
    cfg = ModelConfig.from_hf_config(published)
    pc = cfg.param_counts()
    assert pc["total"] == pytest.approx(total, rel=0.01)
    if active:
        # 3,353,032,704 counted (both embedding matrices included, as in the total): the card's 3.3B agrees to
        # the one decimal it gives when cut rather than rounded (1.6% below); without the input embedding (a
        # lookup) it would be 3.04B, so the card counts it
        assert 3.3e9 <= pc["active"] < 3.4e9
        assert cfg.moe.renormalize and cfg.moe.n_shared == 0 and cfg.moe.dense_layers == ()
    assert cfg.qk_norm == "head" and cfg.hd == 128 and cfg.kv_heads == (4 if active else 8)
    family = "Qwen3Moe" if active else "Qwen3"
    hf_cfg = getattr(transformers, f"{family}Config")(**{k: v for k, v in published.items() if k != "model_type"})
    with torch.device("meta"):
        hf_model = getattr(transformers, f"{family}ForCausalLM")(hf_cfg)
    assert pc["total"] == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("change,match", [
    # a GQA config read as DeepSeek-V3: MLA has a key and a value per head
    (dict(model_type="deepseek_v3"), r"config.json num_key_value_heads: got 4; allowed: num_attention_heads=32"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="qwen4"), r"allowed: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, "
                               r"deepseek, deepseek_v2, deepseek_v3$"),
])
def test_qwen3_import_refusals_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config(dict(QWEN3_30B_A3B, **change))


def test_qwen3_moe_expert_count_under_either_key():
    # transformers >= 5 saves Qwen3-MoE's num_experts as num_local_experts (an attribute_map alias)
    alias = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"} | {"num_local_experts": 128}
    assert ModelConfig.from_hf_config(alias) == ModelConfig.from_hf_config(QWEN3_30B_A3B)


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V2 / V3: multi-head latent attention, DeepSeek routing, dense first layers

# rope width 8: its interleaved -> half-split permutation (0 2 4 6 1 3 5 7) is not its own inverse (at 4 it is)
MLA_COMMON = dict(COMMON, num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6, moe_intermediate_size=16,
                  n_routed_experts=8, num_experts_per_tok=2)
# DeepSeek-V3 routing at its most general: 4 groups of 2 experts of which a token may use 2, scaled gates
V3 = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1)


def _save_deepseek(tmp_path, family, **kw):
    """A random transformers DeepSeek model saved to tmp_path/family: spread routers, norms away from one, and
    (V3) an explicit non-zero e_score_correction_bias, which transformers initialises at zero. `kw`: config fields."""
    cfg_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**MLA_COMMON, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
            elif "norm" in name:  # input/post-attention norms and the q / kv latent norms
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # +-0.1 alternately: large enough to change which experts are picked, and (unlike random draws,
                # which starve some expert of this small batch) every expert still gets tokens
                b.copy_(0.1 * torch.tensor([1.0, -1.0]).repeat(b.numel() // 2))
    path = tmp_path / family
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("q_lora,interleave", [(None, True), (12, True), (12, False)],
                         ids=["q_proj", "q_lora", "q_lora-half-split"])
def test_deepseek_v3_logits_match(tmp_path, q_lora, interleave):
    hf_model, path = _save_deepseek(tmp_path, "DeepseekV3", q_lora_rank=q_lora, rope_interleave=interleave, **V3)
    cfg, ours = load_hf(path)
    assert cfg.attention == "mla" and cfg.q_lora_rank == (q_lora or 0)
    assert (cfg.kv_rank, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_dim) == (16, 8, 8, 6)
    m = cfg.moe
    routing = (m.score_func, m.renormalize, m.n_group, m.topk_group, m.routed_scaling_factor)
    assert routing == ("sigmoid", True, 4, 2, 2.5)
    assert m.dense_layers == (0,) and m.n_shared == 1 and cfg.d_shared_total == 16
    # transformers writes num_nextn_predict_layers (its default 1) but has no MTP module to save: main model only
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1 and cfg.mtp_depth == 0
    tokens = _compare(hf_model, ours)
    for _, layer in ours.moe_layers():
        assert (layer.stats["load"] > 0).all()  # every expert took part
        assert layer.router.expert_bias.abs().min() > 0  # e_score_correction_bias arrived
    with torch.no_grad():  # the bias matters: without it other experts are picked
        for _, layer in ours.moe_layers():
            layer.router.expert_bias.zero_()
        assert (ours(tokens) - hf_model(tokens).logits).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora", [None, 12])
def test_deepseek_v2_logits_match(tmp_path, q_lora):
    # V2-Lite's routing: softmax, greedy top-k, gates not renormalised; scaled here so the factor shows
    hf_model, path = _save_deepseek(tmp_path, "DeepseekV2", q_lora_rank=q_lora, n_shared_experts=2,
                                    routed_scaling_factor=2.0, topk_method="greedy")
    cfg, ours = load_hf(path)
    m = cfg.moe
    assert (m.score_func, m.renormalize, m.n_group, m.routed_scaling_factor) == ("softmax", False, 1, 2.0)
    assert cfg.attention == "mla" and cfg.d_shared_total == 32 and m.dense_layers == (0,) and cfg.mtp_depth == 0
    _compare(hf_model, ours)
    for _, layer in ours.moe_layers():
        assert (layer.stats["load"] > 0).all()


def test_deepseek_v3_attention_bias_must_be_zero_and_quantized_weights_are_refused(tmp_path):
    # attention_bias biases q_a_proj, kv_a_proj_with_mqa and o_proj; moelab's MLA has none of them
    hf_model, path = _save_deepseek(tmp_path, "DeepseekV3", q_lora_rank=12, attention_bias=True, **V3)
    cfg, ours = load_hf(path)  # transformers initialises the biases at zero: exact
    _compare(hf_model, ours)
    with torch.no_grad():
        hf_model.model.layers[1].self_attn.kv_a_proj_with_mqa.bias.normal_()
    hf_model.save_pretrained(path)
    with pytest.raises(HFLoadError, match=r"'model.layers.1.self_attn.kv_a_proj_with_mqa.bias' is non-zero; moelab's "
                                          r"MLA has no bias on kv_a_proj_with_mqa"):
        load_hf(path)
    written = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(written, quantization_config=DEEPSEEK_V3["quantization_config"])))
    with pytest.raises(HFLoadError, match=r"quantization_config \(quant_method 'fp8'\): quantized checkpoints are not "
                                          r"supported; allowed: absent"):
        load_hf(path)


def test_deepseek_v3_published_counts():
    """DeepSeek-V3 (README, technical report): 671B total and 37B activated per token for the main model; the
    Hub checkpoint, 685B, adds the 14B MTP module. config.json's num_nextn_predict_layers becomes mtp_depth."""
    published = {k: v for k, v in DEEPSEEK_V3.items() if k != "rope_scaling"}  # YaRN changes no parameter count
    cfg = ModelConfig.from_hf_config(published)
    assert cfg.mtp_depth == 1 and cfg.mtp_is_moe and cfg.attention == "mla" and cfg.moe.dense_layers == (0, 1, 2)
    pc = cfg.param_counts()
    main, main_active = pc["total"] - pc["mtp"], pc["active"] - pc["mtp_active"]
    assert main == pytest.approx(671e9, rel=0.01)  # 671,026,404,352
    # 37.55B counting both embedding matrices, as `active` does (36.63B without the input embedding, a lookup):
    # the report's 37B is that figure cut rather than rounded, 1.5% below it, as for Qwen3-30B-A3B above
    assert 37e9 <= main_active < 38e9
    # The checkpoint: the main model, the MTP module (11.6B: an MoE block, eh_proj, three norms) and the copies of
    # the embedding and output head DeepSeek stores with it (1.85B; moelab shares the model's): 684.5B
    assert pc["total"] + 2 * cfg.vocab_size * cfg.d_model == pytest.approx(685e9, rel=0.01)
    # The main model is transformers' DeepseekV3ForCausalLM (which has no MTP module) to the parameter
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in published.items()
                                             if k not in ("model_type", "quantization_config")})
    with torch.device("meta"):
        hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    assert main == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("change,match", [
    ({}, r"config.json rope_scaling: got \{'type': 'yarn'.*allowed: plain RoPE"),  # the published config as is
    (dict(scoring_func="softmax"), r"config.json scoring_func: got 'softmax'; allowed: 'sigmoid'"),
    (dict(topk_method="greedy"), r"config.json topk_method: got 'greedy'; allowed: 'noaux_tc'"),
    (dict(rms_norm_eps=1e-5), r"config.json rms_norm_eps: got 1e-05; allowed: 1e-06 for deepseek_v3"),
    (dict(num_key_value_heads=16), r"config.json num_key_value_heads: got 16; allowed: num_attention_heads=128"),
    (dict(q_lora_rank=0), r"config.json q_lora_rank: got 0; allowed: null"),
    (dict(qk_nope_head_dim=0), r"config.json qk_nope_head_dim: got 0; allowed: a positive integer"),
    (dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy"),
     r"config.json topk_method: got 'group_limited_greedy'; allowed: 'greedy'"),
    (dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy"),  # norm_topk_prob true
     r"config.json norm_topk_prob: got True; allowed: false for deepseek_v2"),
    (dict(model_type="llama"), r"config.json kv_lora_rank: got 512; allowed: absent for model_type 'llama'"),
])
def test_deepseek_import_refusals_name_the_field(change, match):
    base = {k: v for k, v in DEEPSEEK_V3.items() if k != "rope_scaling"} if change else DEEPSEEK_V3
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config(dict(base, **change))
