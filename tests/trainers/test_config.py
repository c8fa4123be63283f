import dataclasses

import pytest
import torch

from hf_configs import ALL, shrink
from moelab.trainers.config import (PRESETS, ConfigError, ModelConfig, MoEConfig, RunConfig, apply_overrides,
                                    from_dict, load_run_config, preset)
from moelab.trainers.model import build_model

# Published parameter totals (exact where the model card gives them) and active counts.
PUBLISHED = {
    "llama": (6_738_415_616, None), "mistral": (7_241_732_096, None), "qwen2": (494_032_768, None),
    "mixtral": (46_702_792_704, 12.9e9), "qwen2_moe": (14.3e9, 2.7e9), "olmoe": (6.9e9, 1.3e9),
    "deepseek": (16.4e9, 2.8e9),
}


def _numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_equal_built_model(name):
    rc = preset(name)
    if rc.model.param_counts()["total"] > 50e6:  # GPU presets: build the same architecture on meta
        with torch.device("meta"):
            from moelab.trainers.model import Transformer
            model = Transformer(rc.model)
    else:
        model = build_model(rc.model)
    assert rc.model.param_counts()["total"] == _numel(model)


@pytest.mark.parametrize("family", list(ALL))
def test_hf_import_matches_published_counts(family):
    pc = ModelConfig.from_hf_config(ALL[family]).param_counts()
    total, active = PUBLISHED[family]
    assert pc["total"] == pytest.approx(total, rel=0.005)
    if active:
        assert pc["active"] == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("family", list(ALL))
def test_hf_import_counts_equal_built_model(family):
    cfg = ModelConfig.from_hf_config(shrink(ALL[family]))
    assert cfg.param_counts()["total"] == _numel(build_model(cfg))


def test_hf_import_families_features():
    ds = ModelConfig.from_hf_config(ALL["deepseek"])
    assert ds.moe.dense_layers == (0,) and ds.moe.n_shared == 2 and ds.d_shared_total == 2 * 1408
    qm = ModelConfig.from_hf_config(ALL["qwen2_moe"])
    assert qm.moe.shared_gate and qm.qkv_bias and not qm.moe.renormalize
    assert ModelConfig.from_hf_config(ALL["olmoe"]).qk_norm == "full"
    assert ModelConfig.from_hf_config(ALL["qwen2"]).tie_embeddings
    assert ModelConfig.from_hf_config(ALL["mixtral"]).moe.renormalize
    sparse_step = dict(ALL["qwen2_moe"], decoder_sparse_step=2, mlp_only_layers=[1])
    assert ModelConfig.from_hf_config(sparse_step).moe.dense_layers == tuple(i for i in range(24) if i % 2 == 0 or i == 1)


@pytest.mark.parametrize("bad,match", [
    (dict(model_type="gpt2"), "model_type.*llama"),
    (dict(ALL["llama"], hidden_act="gelu"), "hidden_act"),
    (dict(ALL["deepseek"], kv_lora_rank=512), "MLA"),
    (dict(ALL["llama"], rope_scaling={"rope_type": "yarn", "factor": 4}), "rope_scaling"),
])
def test_hf_import_rejects_unsupported(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config(bad)


def test_active_counts_top_k_experts_only():
    m = preset("moe-tiny").model
    pc = m.param_counts()
    per_expert = 3 * m.d_model * m.d_expert
    assert pc["total"] - pc["active"] == m.n_layers * (m.moe.n_experts - m.moe.top_k) * per_expert
    assert pc["embedding"] + pc["non_embedding"] == pc["total"]


def test_flops_per_token_convention():
    m = preset("tiny").model
    pc = m.param_counts()
    s = 64
    want = 6 * (pc["non_embedding"] + m.vocab_size * m.d_model) + 12 * m.n_layers * s * m.n_heads * m.hd
    assert m.flops_per_token(s) == want


@pytest.mark.parametrize("overrides,match", [
    ({"model.moe.top_k": 9}, r"model.moe.top_k.*1\.\.model.moe.n_experts=8"),
    ({"model.moe.granularity": 5}, r"model.moe.granularity.*divisor of model.d_ff=192"),
    ({"model.n_heads": 3}, r"model.n_heads.*divisor"),
    ({"model.n_kv_heads": 3}, r"model.n_kv_heads"),
    ({"model.moe.score_func": "relu"}, r"model.moe.score_func.*'softmax', 'sigmoid'"),
    ({"model.moe.dense_layers": "5"}, r"model.moe.dense_layers.*0\.\.1"),
    ({"model.moe.capacity_factor": -1}, r"capacity_factor"),
    ({"model.moe.shared_gate": True}, r"shared_gate.*n_shared"),
    ({"model.moe.colour": 1}, r"model.moe.colour.*one of.*top_k"),
    ({"model.moe.top_k": "two"}, r"model.moe.top_k.*an integer"),
    ({"model.moe.renormalize": "maybe"}, r"renormalize.*true or false"),
    ({"optim.schedule": "linear"}, r"optim.schedule.*cosine"),
    ({"optim.lr": 0}, r"optim.lr"),
    ({"optim.expert_lr_fraction": 0}, r"expert_lr_fraction"),
    ({"train.batch_size": 10, "train.micro_batch_size": 4}, r"micro_batch_size.*divisor"),
    ({"train.seq_len": 100000}, r"train.seq_len.*max_seq_len"),
    ({"train.steps": 0}, r"train.steps"),
    ({"train.device": "tpu"}, r"train.device"),
    ({"data.source": "web"}, r"data.source.*synthetic"),
    ({"data.source": "files"}, r"data.paths"),
    ({"data.n_symbols": 1000}, r"data.n_symbols.*vocab_size"),
    ({"trian.steps": 3}, r"trian.*one of.*train"),
    ({"model.moe.top_k.x": 3}, r"is a value, not a section"),
])
def test_bad_config_names_field_and_allowed(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("moe-tiny", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset.*moe-tiny"):
        preset("moe-huge")


def test_overrides_are_typed_and_copy():
    base = preset("moe-tiny")
    rc = apply_overrides(base, {"model.moe.top_k": "1", "optim.lr": "1e-3", "model.moe.dense_layers": "0"})
    assert rc.model.moe.top_k == 1 and rc.optim.lr == 1e-3 and rc.model.moe.dense_layers == (0,)
    assert base.model.moe.top_k == 2  # the original is untouched
    assert preset("moe-tiny").model.moe.top_k == 2  # presets are fresh copies


def test_from_dict_round_trip():
    rc = load_run_config("moe-tiny", {"model.moe.n_shared": 1})
    again = from_dict(RunConfig, dataclasses.asdict(rc))
    assert again == rc
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        from_dict(RunConfig, {"model": {"moe": {"top_k": [1]}}})


def test_token_budget_sets_steps():
    rc = load_run_config("tiny", {"train.max_tokens": 10_000})
    assert rc.total_steps() == -(-10_000 // (16 * 64))


def test_moe_config_granularity_width():
    cfg = ModelConfig(d_ff=192, moe=MoEConfig(n_experts=8, top_k=2, granularity=4)).validate()
    assert cfg.d_expert == 48
