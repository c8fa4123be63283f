"""moelab -> Hugging Face export: every format through transformers and back through load_hf with equal
logits, runs and checkpoints as sources, the features a format cannot hold, and the output directory."""

import dataclasses
import json
import os

import pytest
import torch

import transformers  # noqa: E402  (dev extra)

from moelab.trainers import hf_export  # noqa: E402
from moelab.trainers.config import ModelConfig, MoEConfig, UpcycleConfig, load_run_config  # noqa: E402
from moelab.trainers.hf import load_hf  # noqa: E402
from moelab.trainers.hf_export import FORMATS, ExportError, export, load_model  # noqa: E402
from moelab.trainers.loop import train  # noqa: E402
from moelab.trainers.model import build_model  # noqa: E402
from moelab.trainers.upcycle import load_source, upcycle  # noqa: E402

VOCAB = 61
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
MOE = dict(n_experts=4, top_k=2, granularity=2)
# DeepSeek-V3: MLA (per head 8 + 8 rope query/key features, values of 6, a KV latent of 16; q_lora_rank per
# case). Rope width 8: the interleaved <-> half-split permutation is not its own inverse (at 4 it is).
MLA = dict(BASE, n_kv_heads=0, norm_eps=1e-6, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=6)
# and its routing: sigmoid scores with the aux-loss-free bias, 2 of 4 groups, renormalised gates x 2.5, one
# ungated shared expert, layer 0 dense
DSV3_MOE = dict(n_experts=8, top_k=2, d_expert=12, n_shared=1, score_func="sigmoid", n_group=4, topk_group=2,
                routed_scaling_factor=2.5, dense_layers=(0,), aux_loss_coef=0.0, bias_update_rate=1e-3)

# (expected format under auto, config): each family's own features, at tiny sizes
CASES = {
    "llama": ("llama", ModelConfig(**BASE, rope_theta=5e5, norm_eps=1e-6)),
    "llama-qkv-bias": ("qwen2", ModelConfig(**BASE, qkv_bias=True)),  # exported as llama: zero o bias
    "qwen2": ("qwen2", ModelConfig(**BASE, qkv_bias=True, tie_embeddings=True, head_dim=16)),
    "qwen3": ("qwen3", ModelConfig(**BASE, qk_norm="head", head_dim=16)),
    "mixtral": ("mixtral", ModelConfig(**BASE, tie_embeddings=True, moe=MoEConfig(**MOE))),
    "qwen2_moe": ("qwen2_moe", ModelConfig(**BASE, qkv_bias=True, moe=MoEConfig(
        **MOE, n_shared=2, d_shared=16, shared_gate=True, renormalize=False, dense_layers=(1,)))),
    "qwen3_moe": ("qwen3_moe", ModelConfig(**BASE, qk_norm="head", head_dim=16, qkv_bias=True, moe=MoEConfig(
        **MOE, dense_layers=(0,)))),
    "olmoe": ("olmoe", ModelConfig(**BASE, qk_norm="full", tie_embeddings=True, moe=MoEConfig(
        **MOE, renormalize=False))),
    "deepseek_v3": ("deepseek_v3", ModelConfig(**MLA, q_lora_rank=12, moe=MoEConfig(**DSV3_MOE))),
    # no query latent, no shared expert (transformers builds one of width 0), gates not renormalised, tied
    "deepseek_v3-plain": ("deepseek_v3", ModelConfig(**MLA, tie_embeddings=True, moe=MoEConfig(
        **dict(DSV3_MOE, n_shared=0, renormalize=False, n_group=1, topk_group=1, dense_layers=(0, 1))))),
    "deepseek_v3-dense": ("deepseek_v3", ModelConfig(**MLA, q_lora_rank=12)),  # first_k_dense_replace = all
}
FORMAT_OF = {"llama-qkv-bias": "llama"}  # the case exported to another format than auto's


def _model(cfg: ModelConfig, seed: int = 2):
    """Random weights where the default init would hide a mapping error: norms not all ones, biases not zero,
    a router that spreads the batch over every expert (seed 2: one whose routers reach every expert of every
    case under the name-keyed init; the round-trip test asserts it, so a change of init shows); with sigmoid scores (DeepSeek-V3) non-zero aux-loss-free
    expert biases too (+-0.1 alternately: they change which experts are picked, and every expert still gets
    tokens)."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
        if cfg.moe.score_func == "sigmoid":
            for _, layer in model.moe_layers():
                layer.router.expert_bias.copy_(0.1 * torch.tensor([1.0, -1.0]).repeat(cfg.moe.n_experts // 2))
    return model


def _tokens(seed=1):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, tokens, extra_layers=()):
    """transformers' logits for `tokens` from the export at `path`. extra_layers: layer indices whose tensors
    transformers may leave unread (DeepSeek-V3's MTP modules: its model has none)."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # every tensor written has its place, none is left to transformers' initialisation
    skipped = tuple(f"model.layers.{i}." for i in extra_layers)
    unexpected = {k for k in info["unexpected_keys"] if not k.startswith(skipped)}
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"], info
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # deepseek_v3's width-0 shared expert
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_round_trips_through_transformers_and_load_hf(tmp_path, case):
    auto, cfg = CASES[case]
    fmt = FORMAT_OF.get(case, auto)
    model = _model(cfg.validate())
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
    for _, layer in model.moe_layers():
        assert (layer.stats["load"] > 0).all()  # every expert took part, so every expert's mapping is checked
    assert hf_export.check_format(cfg, "auto") == auto
    r = export(model, tmp_path / "out", fmt)
    assert r["format"] == fmt and r["files"] == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == fmt and written["tie_word_embeddings"] == cfg.tie_embeddings
    _same(_hf_logits(tmp_path / "out", tokens), want)
    back_cfg, back = load_hf(tmp_path / "out")
    with torch.no_grad():
        _same(back(tokens), want)
    assert back_cfg.param_counts()["total"] == sum(p.numel() for p in back.parameters())


def test_sharded_export_has_an_index_that_both_loaders_read(tmp_path):
    model = _model(CASES["qwen2_moe"][1])
    r = export(model, tmp_path / "out", max_shard_bytes=20_000)
    shards = [f for f in r["files"] if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in r["files"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
        _same(load_hf(tmp_path / "out")[1](tokens), want)
    _same(_hf_logits(tmp_path / "out", tokens), want)


def test_bfloat16_export_writes_bfloat16(tmp_path):
    from safetensors import safe_open

    r = export(_model(CASES["llama"][1]), tmp_path / "out", dtype="bfloat16")
    assert r["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def _cfg(case, **model_kw):
    """CASES[case]'s config with model fields (and `moe` as a dict of MoE fields) changed."""
    cfg = CASES[case][1]
    moe = model_kw.pop("moe", {})
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe), **model_kw).validate()


@pytest.mark.parametrize("cfg,fmt,match", [
    (_cfg("qwen2_moe"), "mixtral", r"n_shared=2 with shared_gate: formats that can: qwen2_moe"),
    (_cfg("mixtral", qkv_bias=True), "mixtral",
     r"qkv_bias=True: formats that can: llama, qwen2, qwen3, qwen2_moe, qwen3_moe, olmoe"),
    (_cfg("mixtral", moe=dict(renormalize=False)), "mixtral",
     r"renormalize=False: formats that can: qwen2_moe, qwen3_moe, olmoe"),
    (_cfg("mixtral", moe=dict(dense_layers=(1,))), "auto",
     r"auto chose 'mixtral' .*dense_layers=\[1\] \(not the first k layers\): formats that can: qwen2_moe, qwen3_moe"),
    (_cfg("mixtral", moe=dict(score_func="sigmoid")), "mixtral",
     r"score_func='sigmoid': formats that can: deepseek_v3$"),
    (_cfg("mixtral", moe=dict(capacity_factor=1.25)), "auto",  # not a DeepSeek-V3 feature either
     r"capacity_factor=1.25 \(Hugging Face models drop no tokens\): no format can \([a-z0-9_, ]+\)$"),
    (_cfg("mixtral", moe=dict(force_balanced=True)), "auto", r"force_balanced=True"),
    (_cfg("mixtral", moe=dict(n_group=2, topk_group=1)), "mixtral",
     r"n_group=2 \(group-limited routing\): formats that can: deepseek_v3"),
    (_cfg("mixtral", moe=dict(routed_scaling_factor=2.5)), "mixtral", r"routed_scaling_factor=2.5: formats that can: "
     r"deepseek_v3"),
    # DeepSeek-style routing picks deepseek_v3 under auto, which holds MLA attention only (and sigmoid scores)
    (_cfg("mixtral", moe=dict(n_shared=1)), "auto", r"auto chose 'deepseek_v3' cannot hold this model: "
     r"model.attention='gqa': formats that can: llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe; "
     r"model.moe.score_func='softmax': formats that can: mixtral, qwen2_moe, qwen3_moe, olmoe$"),
    (_cfg("qwen2_moe"), "deepseek_v3", r"n_shared=2 with shared_gate: formats that can: qwen2_moe"),
    (_cfg("qwen3_moe"), "deepseek_v3", r"model.qk_norm='head': formats that can: qwen3, qwen3_moe"),
    (_cfg("llama-qkv-bias"), "deepseek_v3", r"model.qkv_bias=True: formats that can: llama, qwen2, qwen3, "),
    (_cfg("deepseek_v3"), "mixtral", r"model.attention='mla': formats that can: deepseek_v3; .*n_shared=1 without "
     r"shared_gate: formats that can: deepseek_v3; .*dense_layers=\[0\]: formats that can: qwen2_moe, qwen3_moe, "
     r"deepseek_v3; model.moe.score_func='sigmoid': formats that can: deepseek_v3; model.moe.n_group=4"),
    (_cfg("deepseek_v3-dense"), "llama", r"model.attention='mla': formats that can: deepseek_v3$"),
    (_cfg("deepseek_v3", norm_eps=1e-5), "auto", r"model.norm_eps=1e-05 with MLA \(transformers normalises the MLA "
     r"latents with eps 1e-06 .*\): no format can"),
    (_cfg("deepseek_v3", moe=dict(dense_layers=(1,))), "auto",
     r"dense_layers=\[1\] \(not the first k layers\): formats that can: qwen2_moe, qwen3_moe$"),
    (_cfg("deepseek_v3", moe=dict(d_shared=8)), "auto",
     r"ungated shared experts of total width 8 .*not a multiple of the expert width 12: no format can"),
    (_cfg("deepseek_v3-dense", mtp_depth=1), "auto", r"mtp_depth=1 with a dense last layer .*: no format can"),
    (_cfg("olmoe", head_dim=16), "olmoe", r"head_dim=16 \(not d_model / n_heads = 8\): formats that can: llama"),
    (_cfg("llama"), "qwen3", r"qk_norm='none': formats that can: llama, qwen2, mixtral, qwen2_moe"),
    (_cfg("llama"), "mixtral", r"a dense model\): formats that can: llama, qwen2, qwen3"),
    (_cfg("mixtral"), "llama", r"\(an MoE\): formats that can: mixtral, qwen2_moe, qwen3_moe, olmoe"),
    (_cfg("mixtral"), "deepseek_v3", r"format 'deepseek_v3' cannot hold this model: model.attention='gqa': "),
    (_cfg("mixtral"), "gpt2", r"format: got 'gpt2'; allowed: auto, llama, qwen2, qwen3, mixtral, qwen2_moe, "
     r"qwen3_moe, olmoe, deepseek_v3$"),
])
def test_a_feature_the_format_cannot_hold_is_refused_naming_it(tmp_path, cfg, fmt, match):
    with pytest.raises(ExportError, match=match):
        export(build_model(cfg), tmp_path / "out", fmt)
    assert not tmp_path.joinpath("out").exists() and list(tmp_path.iterdir()) == []  # nothing written


def test_non_zero_aux_loss_free_biases_are_refused_zero_ones_export(tmp_path):
    cfg = _cfg("mixtral", moe=dict(bias_update_rate=1e-3))  # a training knob: the function has no bias yet
    model = _model(cfg)
    assert export(model, tmp_path / "fresh")["format"] == "mixtral"
    with torch.no_grad():
        model.layers[2].ffn.router.expert_bias[1] = 0.5  # what training with bias_update_rate leaves
    with pytest.raises(ExportError, match=r"non-zero router expert_bias in layers \[2\] \(aux-loss-free balancing "
                                          r"steers top-k selection\): formats that can: deepseek_v3"):
        export(model, tmp_path / "biased", "mixtral")
    assert hf_export.auto_format(cfg, model) == "deepseek_v3"  # the biases alone send auto there


def test_a_config_field_the_exporter_does_not_know_is_refused(tmp_path, monkeypatch):
    # Stands for a field added to ModelConfig later (MLA, MTP, ...): at its default it changes nothing; set,
    # the exporter must not write a model without it
    monkeypatch.setattr(hf_export, "_MODEL_FIELDS", hf_export._MODEL_FIELDS - {"rope_theta"})
    export(build_model(_cfg("llama", rope_theta=10000.0)), tmp_path / "default")
    with pytest.raises(ExportError, match=r"model.rope_theta=500000.0 \(the exporter does not write it\): no "):
        export(build_model(_cfg("llama")), tmp_path / "set")


def test_output_directory_rules(tmp_path, monkeypatch):
    model = _model(CASES["llama"][1])
    out = tmp_path / "out"
    out.mkdir()
    export(model, out)  # an empty directory is fine
    with pytest.raises(ExportError, match=r"out: not empty; allowed: .*--force"):
        export(model, out)
    (out / "stale.txt").write_text("from an earlier export")
    export(model, out, "qwen2", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # replaced, not merged
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        export(model, tmp_path / "file")

    def crash(root, *a, **k):  # dies after writing part of the export
        (root / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_write", crash)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        export(model, out, force=True)
    assert not (tmp_path / "new").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"  # the old export survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]  # no temporary directories left


def _rc(preset, **kw):
    base = {"train.steps": 3, "train.batch_size": 2, "train.seq_len": 16, "train.log_every": 1,
            "train.eval_every": 0, "train.eval_batches": 1, "model.vocab_size": VOCAB, "data.n_symbols": 16}
    return load_run_config(preset, {**base, **kw})


def test_a_trained_run_directory_exports(tmp_path):
    run = tmp_path / "run"
    train(_rc("moe-tiny"), run, progress=False)
    r = export(run, tmp_path / "hf")
    assert r["format"] == "mixtral"  # moe-tiny: softmax, renormalised, no shared expert, no QK-norm
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["eos_token_id"] is None  # vocab 61 < 257: not the byte tokenizer's eos
    ours, run_cfg = load_model(run)
    assert run_cfg["preset"] == "moe-tiny"
    assert ours.cfg == load_run_config("moe-tiny", {"model.vocab_size": VOCAB}).model
    tokens = _tokens()
    with torch.no_grad():
        want = ours(tokens)
    _same(_hf_logits(tmp_path / "hf", tokens), want)
    with pytest.raises(ExportError, match="holds the source"):
        export(run, run, force=True)  # would delete the run


def test_an_upcycled_run_exports_with_the_dense_function(tmp_path):
    dense_run, moe_run = tmp_path / "dense", tmp_path / "moe"
    train(_rc("tiny"), dense_run, progress=False)
    dense = load_source(dense_run).eval()
    tokens = _tokens()
    # virtual-group router, renormalised gates, nvidia scaling: the upcycled MoE computes the dense function
    # (README's preservation table), and Mixtral renormalises, so the export must too
    moe_cfg = MoEConfig(n_experts=8, top_k=2, granularity=2, renormalize=True)
    ucfg = UpcycleConfig(router_init="virtual_group", router_std=0.5, scaling="nvidia")
    export(upcycle(dense, moe_cfg, ucfg), tmp_path / "hf0")
    with torch.no_grad():
        _same(_hf_logits(tmp_path / "hf0", tokens), dense(tokens))
    # the same upcycling as a run, trained two more steps, exported from its run directory
    train(_rc("moe-tiny", **{"train.steps": 2, "upcycle.source": str(dense_run), "upcycle.router_init":
                             "virtual_group", "upcycle.router_std": 0.5, "upcycle.scaling": "nvidia"}),
          moe_run, progress=False)
    assert export(moe_run, tmp_path / "hf1")["format"] == "mixtral"
    ours = load_model(moe_run)[0]
    with torch.no_grad():
        want = ours(tokens)
        assert (want - dense(tokens)).abs().max() > 1e-4  # trained on: no longer the dense function
        _same(load_hf(tmp_path / "hf1")[1](tokens), want)
    _same(_hf_logits(tmp_path / "hf1", tokens), want)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process saving on purpose
def test_a_sharded_checkpoint_directory_exports(tmp_path):
    import torch.distributed.checkpoint as dcp

    rc = _rc("moe-tiny")
    model = _model(rc.model)
    ckpt = tmp_path / "run" / "ckpt-00000003"
    dcp.save({"model": model.state_dict()}, checkpoint_id=ckpt, no_dist=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "config": {"model": dataclasses.asdict(rc.model)}}))
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
    export(tmp_path / "run", tmp_path / "hf")
    _same(_hf_logits(tmp_path / "hf", tokens), want)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "config": {"model": dict(
        dataclasses.asdict(rc.model), d_ff=64)}}))
    with pytest.raises(ExportError, match=r"does not fit this model: tensor 'layers.0.ffn.w_gate_up' has shape"):
        export(ckpt, tmp_path / "hf2")


class Payload:
    """Unpickles to os.mkdir(marker): code execution that leaves a trace to check."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoints_that_are_not_moelab_models_are_refused(tmp_path):
    (tmp_path / "run").mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "step": 1, "extra": Payload(marker)}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ExportError, match="refused: the file holds pickled Python objects"):
        export(tmp_path / "run", tmp_path / "hf")
    assert not marker.exists()
    torch.save({"weights": {}}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ExportError, match=r"not a moelab checkpoint \(no 'model' entry\)"):
        export(tmp_path / "run", tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt and no complete ckpt-<step>/"):
        export(tmp_path / "empty", tmp_path / "hf")


def test_a_hugging_face_directory_converts_to_another_format(tmp_path):
    model = _model(CASES["llama"][1])
    export(model, tmp_path / "llama")
    assert export(tmp_path / "llama", tmp_path / "qwen2", "qwen2")["format"] == "qwen2"  # zero q/k/v biases
    tokens = _tokens()
    with torch.no_grad():
        _same(_hf_logits(tmp_path / "qwen2", tokens), model(tokens))


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V3: MTP modules in DeepSeek's layout, an upcycled MLA model


def test_deepseek_v3_mtp_modules_round_trip_in_deepseeks_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    from moelab.trainers.hf import HFLoadError

    model = _model(_cfg("deepseek_v3", mtp_depth=2))  # 3 layers: the MTP modules are layers 3 and 4
    assert len(model.moe_layers()) == 4  # two main MoE layers and the two MTP blocks, each with biases
    export(model, tmp_path / "out")
    out = tmp_path / "out"
    written = json.loads((out / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 2 and written["first_k_dense_replace"] == 1
    tensors = load_file(out / "model.safetensors")
    for j in (3, 4):
        for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{j}.{name}" + ("" if name.endswith("bias") else ".weight") in tensors
        assert torch.equal(tensors[f"model.layers.{j}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
        assert torch.equal(tensors[f"model.layers.{j}.shared_head.head.weight"], tensors["lm_head.weight"])
    tokens, targets = _tokens(1), _tokens(2)
    with torch.no_grad():
        want = model(tokens, targets)
    want_mtp = [ce.item() for ce in model.mtp_ce]
    _same(_hf_logits(out, tokens, extra_layers=(3, 4)), want)  # transformers' model has no MTP module: skipped
    cfg, back = load_hf(out)
    assert cfg.mtp_depth == 2
    with torch.no_grad():
        _same(back(tokens, targets), want)
    assert [ce.item() for ce in back.mtp_ce] == pytest.approx(want_mtp, rel=1e-5)
    # moelab shares the embedding with its MTP modules: a stored copy that differs cannot be loaded
    changed = dict(tensors, **{"model.layers.4.embed_tokens.weight": tensors["model.embed_tokens.weight"] + 1})
    save_file(changed, out / "model.safetensors")
    with pytest.raises(HFLoadError, match=r"'model.layers.4.embed_tokens.weight' differs from 'model.embed_tokens"):
        load_hf(out)
    # the second module missing altogether: named, not silently dropped
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.4.")}, out / "model.safetensors")
    with pytest.raises(HFLoadError, match=r"announces num_nextn_predict_layers=2 MTP modules but no tensor of module "
                                          r"1 \(model.layers.4.\*\)"):
        load_hf(out)


def test_deepseek_v3_mtp_layout_is_what_transformers_own_mtp_reader_loads(tmp_path):
    """transformers' MtpModel (its speculative-decoding MTP) reads DeepSeek's layout, for layer 61 only (the
    pattern DeepseekV3ForCausalLM registers): a 61-layer model at tiny widths. Given moelab's h^0 (the last
    block's output before the final norm, `Transformer._mtp`) it computes moelab's MTP logits. (Its generation
    loop itself passes the final-normed hidden state instead.)"""
    mtp_model = getattr(__import__("transformers.modeling_layers", fromlist=["MtpModel"]), "MtpModel", None)
    if mtp_model is None:
        pytest.skip("this transformers has no MtpModel")
    cfg = dataclasses.replace(_cfg("deepseek_v3"), n_layers=61, d_model=16, n_heads=2, d_ff=16, kv_lora_rank=8,
                              qk_nope_head_dim=4, v_head_dim=4, q_lora_rank=0, mtp_depth=1,
                              moe=MoEConfig(**dict(DSV3_MOE, n_experts=4, d_expert=8, n_group=2, topk_group=1)))
    model = _model(cfg.validate())
    export(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    mtp = mtp_model.from_pretrained(hf).eval()  # raises when a tensor of its layer is missing
    tokens = _tokens()
    S = tokens.shape[1]
    with torch.no_grad():
        emb = model.embed(tokens)
        h = emb
        for layer in model.layers:
            h = layer(h, model.rope_cos, model.rope_sin)
        _, normed = model.mtp[0](h[:, : S - 1], emb[:, 1:], model.rope_cos, model.rope_sin)
        pos = torch.arange(1, S)[None]  # the positions of the tokens it reads; RoPE is relative, any offset works
        got = mtp.layers[0](emb[:, 1:], h[:, : S - 1], position_embeddings=hf.model.rotary_emb(emb[:, 1:], pos),
                            attention_mask=None, position_ids=pos, cache=None)
        _same(mtp._project_to_logits(got), model.lm_head(normed))


def test_an_upcycled_mla_model_exports_as_deepseek_v3(tmp_path):
    dense = _model(_cfg("deepseek_v3-dense"))  # MLA with a query latent, every FFN dense
    moe = MoEConfig(**dict(DSV3_MOE, dense_layers=(0,)))  # 8 experts of 12 from d_ff 48 (G = 4), one shared
    model = upcycle(dense, moe, UpcycleConfig(router_std=1.0)).eval()
    assert model.cfg.attention == "mla" and model.layers[1].attn.wq_b.weight.equal(dense.layers[1].attn.wq_b.weight)
    with torch.no_grad():  # as aux-loss-free training leaves them
        for _, layer in model.moe_layers():
            layer.router.expert_bias.copy_(0.1 * torch.tensor([1.0, -1.0]).repeat(4))
    assert export(model, tmp_path / "hf")["format"] == "deepseek_v3"
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
        _same(load_hf(tmp_path / "hf")[1](tokens), want)
    _same(_hf_logits(tmp_path / "hf", tokens), want)
