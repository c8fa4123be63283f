"""Hugging Face checkpoints built offline with transformers, saved locally, loaded by moelab."""

import json

import pytest
import torch

import transformers  # noqa: E402  (dev extra)

from moelab.trainers.config import MoEConfig, UpcycleConfig  # noqa: E402
from moelab.trainers.hf import HFLoadError, load_hf, load_hf_dense  # noqa: E402
from moelab.trainers.upcycle import upcycle  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _save(tmp_path, config_cls, model_cls, spread_router=False, shard=None, **kw):
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if spread_router and name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)  # random routing that spreads the batch over every expert
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


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_dense_logits_match_and_upcycling_preserves_them(tmp_path, family):
    cfg_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    hf_model, path = _save(tmp_path, cfg_cls, model_cls, shard="40KB")
    assert (path / "model.safetensors.index.json").exists()  # sharded
    cfg, ours = load_hf_dense(path)
    assert cfg.qkv_bias == (family == "Qwen2")
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
])
def test_moe_logits_match(tmp_path, family, kw):
    cfg_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    hf_model, path = _save(tmp_path, cfg_cls, model_cls, spread_router=True, **kw)
    cfg, ours = load_hf(path)
    assert cfg.moe.n_experts == 4
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
