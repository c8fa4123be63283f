"""Hugging Face checkpoints built offline with transformers, saved locally, loaded by moelab."""

import json

import pytest
import torch

import transformers  # noqa: E402  (dev extra)

from hf_configs import QWEN3_8B, QWEN3_30B_A3B  # noqa: E402
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
    (dict(model_type="deepseek_v3"), r"deepseek_v3 needs multi-head latent attention"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="qwen4"), r"allowed: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe"),
])
def test_qwen3_import_refusals_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config(dict(QWEN3_30B_A3B, **change))


def test_qwen3_moe_expert_count_under_either_key():
    # transformers >= 5 saves Qwen3-MoE's num_experts as num_local_experts (an attribute_map alias)
    alias = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"} | {"num_local_experts": 128}
    assert ModelConfig.from_hf_config(alias) == ModelConfig.from_hf_config(QWEN3_30B_A3B)
