"""Export a moelab model to a Hugging Face directory: `config.json` + `model.safetensors` (sharded, with
`model.safetensors.index.json`, past `max_shard_bytes`) that `transformers.AutoModelForCausalLM
.from_pretrained(out_dir)` loads with the same logits, and `moelab.trainers.hf.load_hf` loads back.

Formats (`FORMATS`): llama, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe (MoE). Each holds a
fixed set of features, and a model with a feature its format cannot hold is refused with an `ExportError`
naming the feature and the formats that can hold it. Nothing is approximated:

| format | QK-norm | q/k/v bias | shared expert | top-k renormalised | dense layers | head_dim |
| --- | --- | --- | --- | --- | --- | --- |
| llama | none | yes (+ zero o bias) | - | - | - | any |
| qwen2 | none | always (zero if none) | - | - | - | any |
| qwen3 | per head | yes (+ zero o bias) | - | - | - | any |
| mixtral | none | no | no | always | no | any |
| qwen2_moe | none | yes | exactly one, gated | flag | yes | any |
| qwen3_moe | per head | yes (+ zero o bias) | no | flag | yes | any |
| olmoe | full | yes (+ zero o bias) | no | flag | no | d_model / n_heads |

All: softmax router scores, plain RoPE, untied or tied embeddings. In no format: sigmoid scores,
aux-loss-free expert biases that are non-zero, group-limited routing, a routed scaling factor, a capacity
limit (HF models drop no tokens), forced balanced routing, shared experts without a gate, MLA, MTP. Those
are DeepSeek-V3 features, and the `deepseek_v3` format is not supported yet (it needs MLA).
LLaMA / Qwen3 / OLMoE have one `attention_bias` flag for q, k, v *and* o: a model with q/k/v biases is
written with a zero o bias, which leaves the function unchanged (`load_hf` accepts only a zero o bias).

`auto` picks from the model's features: dense -> qwen3 (QK-norm per head), qwen2 (q/k/v bias), llama;
MoE -> qwen3_moe (QK-norm per head), qwen2_moe (shared expert), olmoe (full QK-norm), mixtral.

Names written (moelab -> HF) are `hf.py`'s mapping read backwards, in the per-expert layout of published
checkpoints (Mixtral: block_sparse_moe.experts.j.w1/w3/w2; the others: mlp.experts.j.gate/up/down_proj),
which transformers 4 and 5 both read. The directory appears whole or not at all: it is written next to
`out_dir` under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moelab.trainers.config import ModelConfig, MoEConfig, from_dict
from moelab.trainers.model import Transformer

DENSE_FORMATS = ("llama", "qwen2", "qwen3")
MOE_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FORMATS = DENSE_FORMATS + MOE_FORMATS
NOT_YET = {"deepseek_v3": "it needs multi-head latent attention (MLA), which moelab does not have yet"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config fields the exporter reads (the model's function) or may ignore (training only). Any other field,
# e.g. one added to ModelConfig later, must keep its default: the exporter would not know how to write it.
_MODEL_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
                 "rope_theta", "norm_eps", "qkv_bias", "qk_norm", "tie_embeddings", "moe", "init_std"}
_MOE_FIELDS = {"n_experts", "top_k", "granularity", "d_expert", "n_shared", "d_shared", "shared_gate",
               "score_func", "renormalize", "capacity_factor", "dense_layers", "force_balanced", "n_group",
               "topk_group", "routed_scaling_factor",
               # training only: losses and the bias step (the biases themselves are checked as tensors)
               "aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate"}


class ExportError(ValueError):
    """The model cannot be written in the asked format, the source is not a model, or the output directory
    is not usable. The message names the feature, file or flag, and what is allowed."""


@dataclass(frozen=True)
class _Holds:
    """What one format can represent (see the module docstring's table)."""

    moe: bool
    qk_norm: str  # the one QK-norm the architecture has: "none", "full", "head"
    qkv_bias: str  # "always" (zero biases if the model has none), "flag", "with_o" (zero o bias), "never"
    shared: str  # "none" or "gated" (Qwen2-MoE: always one gated shared expert)
    renorm_flag: bool  # False: top-k always renormalised (Mixtral)
    dense_layers: bool
    free_head_dim: bool  # False: head_dim is hidden_size / heads (OLMoE's QK-norm spans hidden_size)


HOLDS = {
    "llama": _Holds(False, "none", "with_o", "none", False, False, True),
    "qwen2": _Holds(False, "none", "always", "none", False, False, True),
    "qwen3": _Holds(False, "head", "with_o", "none", False, False, True),
    "mixtral": _Holds(True, "none", "never", "none", False, False, True),
    "qwen2_moe": _Holds(True, "none", "flag", "gated", True, True, True),
    "qwen3_moe": _Holds(True, "head", "with_o", "none", True, True, True),
    "olmoe": _Holds(True, "full", "with_o", "none", True, False, False),
}


# ----------------------------------------------------------------------------------------------------------
# Which format: features and what holds them


def _shared_kind(m: MoEConfig) -> str:
    if not m.n_shared:
        return "none"
    return "gated" if m.shared_gate else "ungated"


def _features(cfg: ModelConfig, model: Transformer | None) -> list[tuple[str, Callable[[str], bool], bool]]:
    """The model's features that some format might not hold: (description, holds(format) -> bool, whether
    the DeepSeek-V3 format, once supported, would hold it)."""
    m, h, out = cfg.moe, HOLDS, []
    never = lambda f: False  # noqa: E731  (no supported format holds it)
    if m.enabled:
        out.append((f"model.moe.n_experts={m.n_experts} (an MoE)", lambda f: h[f].moe, False))
    else:
        out.append(("model.moe.n_experts=0 (a dense model)", lambda f: not h[f].moe, False))
    out.append((f"model.qk_norm={cfg.qk_norm!r}", lambda f: h[f].qk_norm == cfg.qk_norm, False))
    if cfg.qkv_bias:
        out.append(("model.qkv_bias=True", lambda f: h[f].qkv_bias != "never", False))
    if cfg.hd != cfg.d_model // cfg.n_heads:
        out.append((f"model.head_dim={cfg.hd} (not d_model / n_heads = {cfg.d_model // cfg.n_heads})",
                    lambda f: h[f].free_head_dim, False))
    for name, default in _defaults(ModelConfig).items():  # e.g. MLA attention, MTP modules
        if name not in _MODEL_FIELDS and getattr(cfg, name) != default:
            out.append((f"model.{name}={getattr(cfg, name)!r} (the exporter does not write it)", never, True))
    if not m.enabled:
        return out
    shared = _shared_kind(m)
    out.append(({"none": "no shared expert", "gated": f"model.moe.n_shared={m.n_shared} with shared_gate",
                 "ungated": f"model.moe.n_shared={m.n_shared} without shared_gate"}[shared],
                lambda f: h[f].shared == shared, shared == "ungated"))
    if not m.renormalize:
        out.append(("model.moe.renormalize=False", lambda f: h[f].renorm_flag, False))
    if m.dense_layers:
        out.append((f"model.moe.dense_layers={list(m.dense_layers)}", lambda f: h[f].dense_layers, False))
    if m.score_func != "softmax":
        out.append((f"model.moe.score_func={m.score_func!r}", never, True))
    if m.capacity_factor > 0:
        out.append((f"model.moe.capacity_factor={m.capacity_factor} (Hugging Face models drop no tokens)",
                    never, False))
    if m.force_balanced:
        out.append(("model.moe.force_balanced=True (round-robin routing)", never, False))
    if m.n_group > 1:
        out.append((f"model.moe.n_group={m.n_group} (group-limited routing)", never, True))
    if m.routed_scaling_factor != 1.0:
        out.append((f"model.moe.routed_scaling_factor={m.routed_scaling_factor}", never, True))
    for name, default in _defaults(MoEConfig).items():
        if name not in _MOE_FIELDS and getattr(m, name) != default:
            out.append((f"model.moe.{name}={getattr(m, name)!r} (the exporter does not write it)", never, False))
    if model is not None:
        biased = [i for i, layer in model.moe_layers() if layer.router.expert_bias.count_nonzero()]
        if biased:
            out.append((f"non-zero router expert_bias in layers {biased} (aux-loss-free balancing steers "
                        f"top-k selection)", never, True))
    return out


def _defaults(cls: type) -> dict[str, Any]:
    """name -> default value of every field of config dataclass `cls` (all of them have defaults)."""
    fresh = cls()
    return {f.name: getattr(fresh, f.name) for f in dataclasses.fields(cls)}


def auto_format(cfg: ModelConfig) -> str:
    """The format `auto` means for this model (it may still be refused by `check_format`)."""
    if not cfg.moe.enabled:
        return "qwen3" if cfg.qk_norm == "head" else "qwen2" if cfg.qkv_bias else "llama"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.moe.n_shared:
        return "qwen2_moe"
    return "olmoe" if cfg.qk_norm == "full" else "mixtral"


def check_format(cfg: ModelConfig, fmt: str, model: Transformer | None = None) -> str:
    """`fmt` ("auto" or one of FORMATS) resolved, or ExportError listing every feature it cannot hold and,
    for each, the formats that can. `model`: also check its tensors (non-zero expert biases)."""
    if fmt in NOT_YET:
        raise ExportError(f"format {fmt!r}: not yet supported: {NOT_YET[fmt]}; allowed: auto, {', '.join(FORMATS)}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ExportError(f"format: got {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    chosen = auto_format(cfg) if fmt == "auto" else fmt
    problems = []
    for what, holds, deepseek_v3 in _features(cfg, model):
        if holds(chosen):
            continue
        others = [f for f in FORMATS if holds(f)]
        where = (f"formats that can: {', '.join(others)}" if others else
                 f"no supported format can ({', '.join(FORMATS)})"
                 + ("; deepseek_v3 could, and is not supported yet" if deepseek_v3 else ""))
        problems.append(f"{what}: {where}")
    if problems:
        how = f"auto chose {chosen!r}" if fmt == "auto" else f"format {chosen!r}"
        raise ExportError(f"{how} cannot hold this model: " + "; ".join(problems))
    return chosen


# ----------------------------------------------------------------------------------------------------------
# config.json and tensors


def hf_config(cfg: ModelConfig, fmt: str, dtype: torch.dtype = torch.float32,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """The `config.json` dict of `cfg` in format `fmt` (assumed checked: see `check_format`)."""
    m, h = cfg.moe, HOLDS[fmt]
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[fmt]], "model_type": fmt, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."), "intermediate_size": cfg.d_ff,
    }
    if h.qkv_bias == "with_o":
        out["attention_bias"] = cfg.qkv_bias
    if fmt == "llama":
        out["mlp_bias"] = False
    if fmt.startswith("qwen"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if not m.enabled:
        return out
    out.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False)
    if fmt == "mixtral":
        out.update(num_local_experts=m.n_experts, intermediate_size=cfg.d_expert, router_jitter_noise=0.0)
    elif fmt == "olmoe":
        out.update(num_experts=m.n_experts, intermediate_size=cfg.d_expert, norm_topk_prob=m.renormalize,
                   clip_qkv=None)
    else:  # qwen2_moe, qwen3_moe: dense layers keep intermediate_size = d_ff
        out.update(num_experts=m.n_experts, moe_intermediate_size=cfg.d_expert, norm_topk_prob=m.renormalize,
                   decoder_sparse_step=1, mlp_only_layers=sorted(m.dense_layers))
        if fmt == "qwen2_moe":
            out.update(shared_expert_intermediate_size=cfg.d_shared_total, qkv_bias=cfg.qkv_bias)
    return out


def hf_tensors(model: Transformer, fmt: str) -> dict[str, torch.Tensor]:
    """HF name -> tensor (views into the model's parameters: clone before saving). Raises ExportError when a
    moelab tensor finds no place (a feature this exporter does not know)."""
    cfg, h = model.cfg, HOLDS[fmt]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    taken: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def put(hf_name: str, ours: str, t: torch.Tensor | None = None) -> None:
        taken.add(ours)
        out[hf_name] = sd[ours] if t is None else t

    put("model.embed_tokens.weight", "embed.weight")
    put("model.norm.weight", "norm.weight")
    if cfg.tie_embeddings:
        taken.add("lm_head.weight")  # the same tensor as the embedding: transformers ties it back
    else:
        put("lm_head.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        put(dst + "input_layernorm.weight", src + "attn_norm.weight")
        put(dst + "post_attention_layernorm.weight", src + "ffn_norm.weight")
        for p in "qkvo":
            put(dst + f"self_attn.{p}_proj.weight", src + f"attn.w{p}.weight")
        for p in "qkv":
            w = sd[src + f"attn.w{p}.weight"]
            if cfg.qkv_bias:
                put(dst + f"self_attn.{p}_proj.bias", src + f"attn.w{p}.bias")
            elif h.qkv_bias == "always":  # Qwen2 always has q/k/v biases: zero ones leave the function as is
                out[dst + f"self_attn.{p}_proj.bias"] = w.new_zeros(w.shape[0])
        if cfg.qkv_bias and h.qkv_bias == "with_o":  # attention_bias biases o_proj too
            out[dst + "self_attn.o_proj.bias"] = sd[src + "attn.wo.weight"].new_zeros(cfg.d_model)
        if cfg.qk_norm != "none":
            put(dst + "self_attn.q_norm.weight", src + "attn.q_norm.weight")
            put(dst + "self_attn.k_norm.weight", src + "attn.k_norm.weight")
        if not cfg.is_moe_layer(i):
            gate, up = sd[src + "ffn.gate_up.weight"].chunk(2)  # gate rows first
            put(dst + "mlp.gate_proj.weight", src + "ffn.gate_up.weight", gate)
            out[dst + "mlp.up_proj.weight"] = up
            put(dst + "mlp.down_proj.weight", src + "ffn.down.weight")
            continue
        mlp = dst + ("block_sparse_moe." if fmt == "mixtral" else "mlp.")
        names = ("w1", "w3", "w2") if fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        put(mlp + "gate.weight", src + "ffn.router.weight")
        taken.add(src + "ffn.router.expert_bias")  # checked to be zero by check_format
        w_gate_up, w_down = sd[src + "ffn.w_gate_up"], sd[src + "ffn.w_down"]  # [E, 2 d_e, d], [E, d, d_e]
        taken.update({src + "ffn.w_gate_up", src + "ffn.w_down"})
        for j in range(cfg.moe.n_experts):
            gate, up = w_gate_up[j].chunk(2)
            out[mlp + f"experts.{j}.{names[0]}.weight"] = gate
            out[mlp + f"experts.{j}.{names[1]}.weight"] = up
            out[mlp + f"experts.{j}.{names[2]}.weight"] = w_down[j]
        if cfg.moe.n_shared:  # one SwiGLU of width n_shared * d_shared (see ModelConfig.d_shared_total)
            gate, up = sd[src + "ffn.shared.gate_up.weight"].chunk(2)
            put(mlp + "shared_expert.gate_proj.weight", src + "ffn.shared.gate_up.weight", gate)
            out[mlp + "shared_expert.up_proj.weight"] = up
            put(mlp + "shared_expert.down_proj.weight", src + "ffn.shared.down.weight")
            put(mlp + "shared_expert_gate.weight", src + "ffn.shared_gate.weight")
    left = sorted(set(sd) - taken)
    if left:
        raise ExportError(f"format {fmt!r}: moelab tensors {left[:3]}{' ...' if len(left) > 3 else ''} have no "
                          f"place in it (a model feature this exporter does not write)")
    return out


# ----------------------------------------------------------------------------------------------------------
# Sources: a model, a run directory, a checkpoint


def load_model(source: str | Path | Transformer) -> tuple[Transformer, dict | None]:
    """(model, the run's config dict or None) from a Transformer, a moelab run directory (its newest
    checkpoint: `checkpoint.pt` or a sharded `ckpt-<step>/`), a checkpoint file or DCP directory, or a local
    Hugging Face directory (to convert it to another format). Loads no pickled code."""
    if isinstance(source, Transformer):
        return source, None
    from moelab.trainers.loop import CheckpointError, find_checkpoint

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint")
    cfg_file = path / "config.json"
    if path.is_dir() and cfg_file.is_file() and "model_type" in _read_json(cfg_file, "config.json"):
        from moelab.trainers.hf import load_hf

        return load_hf(path)[1], None
    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint.pt and no complete ckpt-<step>/ directory (meta.json) in "
                                f"it; allowed: a moelab run directory, a checkpoint, or a Hugging Face "
                                f"directory") from None
    try:
        if ckpt.is_dir():
            return _load_dcp(ckpt)
        return _load_file(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: {what} is not a JSON object")
    return data


def _model_config(run: dict | None, where: str) -> ModelConfig:
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise ExportError(f"{where}: no model config stored with the checkpoint (its 'config' entry or the run's "
                          f"config.json)")
    return from_dict(ModelConfig, run["model"], "model").validate()


def _load_file(ckpt: Path) -> tuple[Transformer, dict | None]:
    from moelab.trainers.loop import _torch_load, check_state_dict

    where = f"export {ckpt}"
    state = _torch_load(ckpt, where)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ExportError(f"{where}: not a moelab checkpoint (no 'model' entry)")
    run = state.get("config")
    if run is None and (ckpt.parent / "config.json").is_file():  # the run's resolved config, written at start
        run = _read_json(ckpt.parent / "config.json", "run config")
    model = Transformer(_model_config(run, where))
    check_state_dict(state["model"], model.state_dict(), where)
    model.load_state_dict(state["model"])
    return model, run


def _load_dcp(ckpt: Path) -> tuple[Transformer, dict | None]:
    """A sharded checkpoint, gathered whole on this one process (DCP reshards to any layout, one included)."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from moelab.trainers.loop import DCP_META, _dcp_classes, check_state_dict

    where = f"export {ckpt}"
    run = _read_json(ckpt / DCP_META, DCP_META).get("config")
    model = Transformer(_model_config(run, where))
    SafeReader, SafePlanner = _dcp_classes()  # no pickled code runs, as for --resume
    try:
        stored = SafeReader(ckpt).read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, ValueError) as e:
        raise ExportError(f"{where}: unreadable or refused .metadata ({type(e).__name__}: {e})") from None
    got = {k[len("model."):]: torch.Size(v.size) for k, v in stored.items()
           if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    check_state_dict(got, model.state_dict(), where)
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            dcp.load(state, storage_reader=SafeReader(ckpt), planner=SafePlanner(), no_dist=True)
    except (dcp.CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        raise ExportError(f"{where}: could not load ({type(e).__name__}: {str(e).splitlines()[-1][:300]})") from None
    model.load_state_dict(state["model"])
    return model, run


# ----------------------------------------------------------------------------------------------------------
# Writing


def export(source: str | Path | Transformer, out_dir: str | Path, format: str = "auto", *, force: bool = False,
           dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write `source` (see `load_model`) to `out_dir` as a Hugging Face model of `format`.

    format: "auto" or one of FORMATS; dtype: None (the model's own) or one of DTYPES; force: replace a
    non-empty `out_dir`; max_shard_bytes: above this the weights are split into shards with an index.
    Returns {"format", "out_dir", "files", "params", "dtype"}. Raises ExportError (format, source, output
    directory), FileNotFoundError (no source), ConfigError (a stored config that does not validate).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype: got {dtype!r}; allowed: {', '.join(DTYPES)} (or none: the model's own)")
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes: got {max_shard_bytes}; allowed: a positive number of bytes")
    if format != "auto" and format not in FORMATS:
        check_format(ModelConfig(), format)  # raises the "not yet" / "allowed" error before any loading
    out = Path(out_dir)
    _check_out_dir(out, force, None if isinstance(source, Transformer) else Path(source))
    model, run = load_model(source)
    fmt = check_format(model.cfg, format, model)
    torch_dtype = DTYPES[dtype] if dtype else model.embed.weight.dtype
    eos = 256 if run and run.get("data", {}).get("tokenizer", "byte") == "byte" and model.cfg.vocab_size > 256 else None
    config = hf_config(model.cfg, fmt, torch_dtype, eos)
    tensors = hf_tensors(model, fmt)
    files = _publish(out, force, lambda tmp: _write(tmp, config, tensors, torch_dtype, max_shard_bytes))
    params = sum(p.numel() for p in model.parameters())
    return {"format": fmt, "out_dir": str(out), "files": files, "params": params,
            "dtype": str(torch_dtype).removeprefix("torch.")}


def _check_out_dir(out: Path, force: bool, source: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; allowed: a new or empty directory")
    if source is not None and source.exists():
        src, dst = source.resolve(), out.resolve()
        if dst == src or dst in src.parents:  # --force would delete the very model being exported
            raise ExportError(f"{out}: holds the source {source}; allowed: an output directory outside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: not empty; allowed: a new or empty directory, or --force (force=True) to "
                          f"replace it")


def _publish(out: Path, force: bool, write: Callable[[Path], list[str]]) -> list[str]:
    """Run `write(tmp)` in a fresh sibling directory, then rename it to `out`: a crash leaves no half-written
    export at `out` (only a hidden `.NAME.tmp-*` sibling, removed on any Python exception)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    old = None
    try:
        files = write(tmp)
        if out.is_dir() and any(out.iterdir()):
            if not force:  # someone wrote there meanwhile
                raise ExportError(f"{out}: became non-empty during the export; allowed: --force to replace it")
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)  # an empty `out` directory is replaced atomically too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return files


def _write(root: Path, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
           max_shard_bytes: int) -> list[str]:
    """config.json, then the weights: one model.safetensors, or shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[list[str]] = [[]]
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, t in tensors.items():
        n = t.numel() * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(t.numel() * itemsize for t in tensors.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, keys in zip(names, shards):
        # clone: gate and up rows are views of one moelab matrix, and safetensors refuses shared storage
        save_file({k: tensors[k].to("cpu", dtype).contiguous().clone() for k in keys}, str(root / file),
                  metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return ["config.json", *names]
