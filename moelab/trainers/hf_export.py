"""Export a moelab model to a Hugging Face directory: `config.json` + `model.safetensors` (sharded, with
`model.safetensors.index.json`, past `max_shard_bytes`) that `transformers.AutoModelForCausalLM
.from_pretrained(out_dir)` loads with the same logits, and `moelab.trainers.hf.load_hf` loads back.

Formats (`FORMATS`): llama, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe (MoE); deepseek_v3
(MLA attention; dense or MoE). Each holds a fixed set of features, and a model with a feature its format cannot
hold is refused with an `ExportError` naming the feature and the formats that can hold it. Nothing is
approximated:

| format | attention | QK-norm | q/k/v bias | shared expert | scores | top-k renormalised | dense layers | head_dim |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| llama | GQA | none | yes (+ zero o bias) | - | - | - | - | any |
| qwen2 | GQA | none | always (zero if none) | - | - | - | - | any |
| qwen3 | GQA | per head | yes (+ zero o bias) | - | - | - | - | any |
| mixtral | GQA | none | no | no | softmax | always | no | any |
| qwen2_moe | GQA | none | yes | exactly one, gated | softmax | flag | yes | any |
| qwen3_moe | GQA | per head | yes (+ zero o bias) | no | softmax | flag | yes | any |
| olmoe | GQA | full | yes (+ zero o bias) | no | softmax | flag | no | d_model / n_heads |
| deepseek_v3 | MLA | none | no | ungated, n x d_expert wide | sigmoid | flag | the first k | (MLA widths) |

deepseek_v3 alone also holds group-limited routing (n_group, topk_group), a routed scaling factor, non-zero
aux-loss-free expert biases (written as mlp.gate.e_score_correction_bias, kept in float32 as transformers
keeps them) and MTP modules (`mtp_depth`, written as layers num_hidden_layers + j in DeepSeek's layout with
`num_nextn_predict_layers`; transformers' DeepseekV3ForCausalLM skips them, moelab's load_hf reads them; the
MTP block must be an MoE block, as DeepSeek's is). A dense MLA model is written with first_k_dense_replace =
num_hidden_layers. MLA needs model.norm_eps = 1e-6: transformers normalises the MLA latents with that eps
whatever rms_norm_eps says. The rope rows are written in DeepSeek's interleaved layout (`rope_interleave`
true, as DeepSeek's own checkpoints), the inverse of `hf.rope_rows`' import permutation.
All formats: plain RoPE, untied or tied embeddings. In no format: a capacity limit (HF models drop no
tokens), forced balanced routing, softmax scores with group-limited routing / routed scaling / expert biases.
LLaMA / Qwen3 / OLMoE have one `attention_bias` flag for q, k, v *and* o: a model with q/k/v biases is
written with a zero o bias, which leaves the function unchanged (`load_hf` accepts only a zero o bias).

`auto` picks from the model's features: MLA attention, or routing only deepseek_v3 holds (sigmoid scores,
groups, routed scaling, non-zero expert biases, ungated shared experts, MTP) -> deepseek_v3; else dense ->
qwen3 (QK-norm per head), qwen2 (q/k/v bias), llama; MoE -> qwen3_moe (QK-norm per head), qwen2_moe (shared
expert), olmoe (full QK-norm), mixtral.

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

from moelab.trainers.config import MLA_LATENT_NORM_EPS, ModelConfig, MoEConfig, from_dict
from moelab.trainers.hf import rope_rows
from moelab.trainers.model import Transformer

DENSE_FORMATS = ("llama", "qwen2", "qwen3")
MOE_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
MLA_FORMATS = ("deepseek_v3",)  # dense or MoE
FORMATS = DENSE_FORMATS + MOE_FORMATS + MLA_FORMATS
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Written in float32 whatever the export dtype: transformers keeps DeepSeek-V3's router bias in float32
# (`_keep_in_fp32_modules_strict`), and rounding it to 8 bits would move which experts tie-close tokens pick.
FP32_TENSORS = (".mlp.gate.e_score_correction_bias",)

# Config fields the exporter reads (the model's function) or may ignore (training only). Any other field,
# e.g. one added to ModelConfig later, must keep its default: the exporter would not know how to write it.
_MODEL_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
                 "rope_theta", "norm_eps", "qkv_bias", "qk_norm", "tie_embeddings", "moe", "init_std",
                 "attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "mtp_depth"}
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

    models: tuple[str, ...]  # "dense", "moe"
    attention: str  # "gqa" or "mla"
    qk_norm: str  # the one QK-norm the architecture has: "none", "full", "head"
    qkv_bias: str  # "always" (zero biases if the model has none), "flag", "with_o" (zero o bias), "never"
    shared: tuple[str, ...]  # shared-expert kinds: "none", "gated" (Qwen2-MoE: one gated), "ungated" (DeepSeek)
    renorm_flag: bool  # False: top-k always renormalised (Mixtral)
    dense_layers: str  # "none", "any" (a list of layers), "prefix" (the first k layers: DeepSeek)
    free_head_dim: bool  # False: head_dim is hidden_size / heads (OLMoE's QK-norm spans hidden_size)
    score_func: str = "softmax"
    deepseek_routing: bool = False  # groups, routed scaling, expert biases, MTP


HOLDS = {
    "llama": _Holds(("dense",), "gqa", "none", "with_o", ("none",), False, "none", True),
    "qwen2": _Holds(("dense",), "gqa", "none", "always", ("none",), False, "none", True),
    "qwen3": _Holds(("dense",), "gqa", "head", "with_o", ("none",), False, "none", True),
    "mixtral": _Holds(("moe",), "gqa", "none", "never", ("none",), False, "none", True),
    "qwen2_moe": _Holds(("moe",), "gqa", "none", "flag", ("gated",), True, "any", True),
    "qwen3_moe": _Holds(("moe",), "gqa", "head", "with_o", ("none",), True, "any", True),
    "olmoe": _Holds(("moe",), "gqa", "full", "with_o", ("none",), True, "none", False),
    "deepseek_v3": _Holds(("dense", "moe"), "mla", "none", "never", ("none", "ungated"), True, "prefix", True,
                          "sigmoid", True),
}


# ----------------------------------------------------------------------------------------------------------
# Which format: features and what holds them


def _shared_kind(m: MoEConfig) -> str:
    if not m.n_shared:
        return "none"
    return "gated" if m.shared_gate else "ungated"


def _dense_prefix(m: MoEConfig) -> bool:
    """Whether the dense layers are exactly the first k (DeepSeek's first_k_dense_replace)."""
    return sorted(m.dense_layers) == list(range(len(m.dense_layers)))


def _features(cfg: ModelConfig, model: Transformer | None) -> list[tuple[str, Callable[[str], bool]]]:
    """The model's features that some format might not hold: (description, holds(format) -> bool)."""
    m, h, out = cfg.moe, HOLDS, []
    never = lambda f: False  # noqa: E731  (no format holds it)
    deepseek = lambda f: h[f].deepseek_routing  # noqa: E731
    kind = "moe" if m.enabled else "dense"
    out.append((f"model.moe.n_experts={m.n_experts} " + ("(an MoE)" if m.enabled else "(a dense model)"),
                lambda f: kind in h[f].models))
    out.append((f"model.attention={cfg.attention!r}", lambda f: h[f].attention == cfg.attention))
    out.append((f"model.qk_norm={cfg.qk_norm!r}", lambda f: h[f].qk_norm == cfg.qk_norm))
    if cfg.qkv_bias:
        out.append(("model.qkv_bias=True", lambda f: h[f].qkv_bias != "never"))
    if cfg.attention == "gqa" and cfg.hd != cfg.d_model // cfg.n_heads:
        out.append((f"model.head_dim={cfg.hd} (not d_model / n_heads = {cfg.d_model // cfg.n_heads})",
                    lambda f: h[f].free_head_dim))
    if cfg.attention == "mla" and cfg.norm_eps != MLA_LATENT_NORM_EPS:
        out.append((f"model.norm_eps={cfg.norm_eps} with MLA (transformers normalises the MLA latents with eps "
                    f"{MLA_LATENT_NORM_EPS} whatever rms_norm_eps says; train with model.norm_eps="
                    f"{MLA_LATENT_NORM_EPS})", never))
    if cfg.mtp_depth:
        if cfg.mtp_is_moe:
            out.append((f"model.mtp_depth={cfg.mtp_depth} (MTP modules)", deepseek))
        else:
            out.append((f"model.mtp_depth={cfg.mtp_depth} with a dense last layer (DeepSeek-V3's MTP block, which "
                        f"transformers and DeepSeek build as an MoE block, would be dense)", never))
    for name, default in _defaults(ModelConfig).items():
        if name not in _MODEL_FIELDS and getattr(cfg, name) != default:
            out.append((f"model.{name}={getattr(cfg, name)!r} (the exporter does not write it)", never))
    if not m.enabled:
        return out
    shared = _shared_kind(m)
    out.append(({"none": "no shared expert", "gated": f"model.moe.n_shared={m.n_shared} with shared_gate",
                 "ungated": f"model.moe.n_shared={m.n_shared} without shared_gate"}[shared],
                lambda f: shared in h[f].shared))
    if shared == "ungated" and cfg.d_shared_total % cfg.d_expert:
        # DeepSeek's shared experts are one SwiGLU of n_shared_experts x moe_intermediate_size
        out.append((f"ungated shared experts of total width {cfg.d_shared_total} (model.moe.n_shared x d_shared), "
                    f"not a multiple of the expert width {cfg.d_expert}", never))
    if not m.renormalize:
        out.append(("model.moe.renormalize=False", lambda f: h[f].renorm_flag))
    if m.dense_layers:
        prefix = _dense_prefix(m)
        out.append((f"model.moe.dense_layers={list(m.dense_layers)}" + ("" if prefix else " (not the first k layers)"),
                    lambda f: h[f].dense_layers == "any" or (h[f].dense_layers == "prefix" and prefix)))
    out.append((f"model.moe.score_func={m.score_func!r}",
                lambda f: "moe" in h[f].models and h[f].score_func == m.score_func))
    if m.capacity_factor > 0:
        out.append((f"model.moe.capacity_factor={m.capacity_factor} (Hugging Face models drop no tokens)", never))
    if m.force_balanced:
        out.append(("model.moe.force_balanced=True (round-robin routing)", never))
    if m.n_group > 1:
        out.append((f"model.moe.n_group={m.n_group} (group-limited routing)", deepseek))
    if m.routed_scaling_factor != 1.0:
        out.append((f"model.moe.routed_scaling_factor={m.routed_scaling_factor}", deepseek))
    for name, default in _defaults(MoEConfig).items():
        if name not in _MOE_FIELDS and getattr(m, name) != default:
            out.append((f"model.moe.{name}={getattr(m, name)!r} (the exporter does not write it)", never))
    biased = _biased_layers(model)
    if biased:
        out.append((f"non-zero router expert_bias in layers {biased} (aux-loss-free balancing steers top-k "
                    f"selection)", deepseek))
    return out


def _biased_layers(model: Transformer | None) -> list[int]:
    """MoE layers (main, then MTP: see Transformer.moe_layers) whose aux-loss-free expert bias is non-zero."""
    if model is None:
        return []
    return [i for i, layer in model.moe_layers() if layer.router.expert_bias.count_nonzero()]


def _defaults(cls: type) -> dict[str, Any]:
    """name -> default value of every field of config dataclass `cls` (all of them have defaults)."""
    fresh = cls()
    return {f.name: getattr(fresh, f.name) for f in dataclasses.fields(cls)}


def auto_format(cfg: ModelConfig, model: Transformer | None = None) -> str:
    """The format `auto` means for this model (it may still be refused by `check_format`). `model`: also
    look at its tensors (non-zero expert biases)."""
    m = cfg.moe
    deepseek_routing = m.enabled and (m.score_func == "sigmoid" or m.n_group > 1 or m.routed_scaling_factor != 1.0
                                      or _shared_kind(m) == "ungated" or bool(_biased_layers(model)))
    if cfg.attention == "mla" or cfg.mtp_depth or deepseek_routing:
        return "deepseek_v3"
    if not m.enabled:
        return "qwen3" if cfg.qk_norm == "head" else "qwen2" if cfg.qkv_bias else "llama"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if m.n_shared:
        return "qwen2_moe"
    return "olmoe" if cfg.qk_norm == "full" else "mixtral"


def check_format(cfg: ModelConfig, fmt: str, model: Transformer | None = None) -> str:
    """`fmt` ("auto" or one of FORMATS) resolved, or ExportError listing every feature it cannot hold and,
    for each, the formats that can. `model`: also check its tensors (non-zero expert biases)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ExportError(f"format: got {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    chosen = auto_format(cfg, model) if fmt == "auto" else fmt
    problems = []
    for what, holds in _features(cfg, model):
        if holds(chosen):
            continue
        others = [f for f in FORMATS if holds(f)]
        where = f"formats that can: {', '.join(others)}" if others else f"no format can ({', '.join(FORMATS)})"
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
    if fmt == "deepseek_v3":
        return _deepseek_v3_config(cfg, out)
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


def _deepseek_v3_config(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    """`out` (the common keys) completed as a DeepSeek-V3 config.json: MLA widths, routing, dense prefix, MTP.
    The keys DeepSeek's own config.json has beyond transformers' (scoring_func, topk_method, moe_layer_freq)
    are written too, so DeepSeek-layout readers find the function spelled out."""
    m = cfg.moe
    # transformers sets head_dim to the rope width (its rotary tables' width) and grows the KV heads to all heads
    out.update(head_dim=cfg.qk_rope_dim, num_key_value_heads=cfg.n_heads, attention_bias=False,
               q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_rank, qk_nope_head_dim=cfg.qk_nope_dim,
               qk_rope_head_dim=cfg.qk_rope_dim, v_head_dim=cfg.v_dim, rope_interleave=True,
               num_nextn_predict_layers=cfg.mtp_depth, scoring_func="sigmoid", topk_method="noaux_tc",
               moe_layer_freq=1, output_router_logits=False)
    if not m.enabled:
        # every layer dense (first_k_dense_replace = all); the MoE keys describe no layer and are placeholders
        # transformers' config accepts (two experts: its router scores groups by their two best)
        return dict(out, first_k_dense_replace=cfg.n_layers, n_routed_experts=2, num_experts_per_tok=1,
                    moe_intermediate_size=cfg.d_ff, n_shared_experts=0, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, norm_topk_prob=True)
    return dict(out, first_k_dense_replace=len(m.dense_layers), n_routed_experts=m.n_experts,
                num_experts_per_tok=m.top_k, moe_intermediate_size=cfg.d_expert,
                n_shared_experts=cfg.d_shared_total // cfg.d_expert, n_group=m.n_group, topk_group=m.topk_group,
                routed_scaling_factor=m.routed_scaling_factor, norm_topk_prob=m.renormalize,
                seq_aux=m.seq_aux_loss_coef > 0, aux_loss_alpha=m.seq_aux_loss_coef)


def hf_tensors(model: Transformer, fmt: str) -> dict[str, torch.Tensor]:
    """HF name -> tensor (views into the model's parameters: clone before saving). Raises ExportError when a
    moelab tensor finds no place (a feature this exporter does not know)."""
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w = _Writer(cfg, fmt, sd)
    w.put("model.embed_tokens.weight", "embed.weight")
    w.put("model.norm.weight", "norm.weight")
    if cfg.tie_embeddings:
        w.taken.add("lm_head.weight")  # the same tensor as the embedding: transformers ties it back
    else:
        w.put("lm_head.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        w.block(f"layers.{i}.", f"model.layers.{i}.", cfg.is_moe_layer(i))
    for j in range(cfg.mtp_depth):  # checked: deepseek_v3 only
        w.mtp(j)
    left = sorted(set(sd) - w.taken)
    if left:
        raise ExportError(f"format {fmt!r}: moelab tensors {left[:3]}{' ...' if len(left) > 3 else ''} have no "
                          f"place in it (a model feature this exporter does not write)")
    return w.out


class _Writer:
    """moelab state dict -> HF tensors of one format, remembering which moelab tensors found a place."""

    def __init__(self, cfg: ModelConfig, fmt: str, sd: dict[str, torch.Tensor]):
        self.cfg, self.fmt, self.h, self.sd = cfg, fmt, HOLDS[fmt], sd
        self.taken: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def put(self, hf_name: str, ours: str, t: torch.Tensor | None = None) -> None:
        self.taken.add(ours)
        self.out[hf_name] = self.sd[ours] if t is None else t

    def glu(self, gate: str, up: str, down: str, ours: str) -> None:
        """A moelab SwiGLU under `ours` ("layers.0.ffn.") -> HF gate / up / down projections."""
        g, u = self.sd[ours + "gate_up.weight"].chunk(2)  # gate rows first
        self.put(gate, ours + "gate_up.weight", g)
        self.out[up] = u
        self.put(down, ours + "down.weight")

    def block(self, src: str, dst: str, moe: bool) -> None:
        """One moelab block under `src` ("layers.3.") -> HF decoder-layer names under `dst`."""
        cfg, h, sd, out = self.cfg, self.h, self.sd, self.out
        self.put(dst + "input_layernorm.weight", src + "attn_norm.weight")
        self.put(dst + "post_attention_layernorm.weight", src + "ffn_norm.weight")
        if cfg.attention == "mla":
            self.mla(src + "attn.", dst + "self_attn.")
        else:
            for p in "qkvo":
                self.put(dst + f"self_attn.{p}_proj.weight", src + f"attn.w{p}.weight")
            for p in "qkv":
                w = sd[src + f"attn.w{p}.weight"]
                if cfg.qkv_bias:
                    self.put(dst + f"self_attn.{p}_proj.bias", src + f"attn.w{p}.bias")
                elif h.qkv_bias == "always":  # Qwen2 always has q/k/v biases: zero ones leave the function as is
                    out[dst + f"self_attn.{p}_proj.bias"] = w.new_zeros(w.shape[0])
            if cfg.qkv_bias and h.qkv_bias == "with_o":  # attention_bias biases o_proj too
                out[dst + "self_attn.o_proj.bias"] = sd[src + "attn.wo.weight"].new_zeros(cfg.d_model)
            if cfg.qk_norm != "none":
                self.put(dst + "self_attn.q_norm.weight", src + "attn.q_norm.weight")
                self.put(dst + "self_attn.k_norm.weight", src + "attn.k_norm.weight")
        if not moe:
            self.glu(dst + "mlp.gate_proj.weight", dst + "mlp.up_proj.weight", dst + "mlp.down_proj.weight",
                     src + "ffn.")
            return
        mlp = dst + ("block_sparse_moe." if self.fmt == "mixtral" else "mlp.")
        names = ("w1", "w3", "w2") if self.fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        self.put(mlp + "gate.weight", src + "ffn.router.weight")
        if self.fmt == "deepseek_v3":
            self.put(mlp + "gate.e_score_correction_bias", src + "ffn.router.expert_bias")
        else:
            self.taken.add(src + "ffn.router.expert_bias")  # checked to be zero by check_format
        w_gate_up, w_down = sd[src + "ffn.w_gate_up"], sd[src + "ffn.w_down"]  # [E, 2 d_e, d], [E, d, d_e]
        self.taken.update({src + "ffn.w_gate_up", src + "ffn.w_down"})
        for j in range(cfg.moe.n_experts):
            gate, up = w_gate_up[j].chunk(2)
            out[mlp + f"experts.{j}.{names[0]}.weight"] = gate
            out[mlp + f"experts.{j}.{names[1]}.weight"] = up
            out[mlp + f"experts.{j}.{names[2]}.weight"] = w_down[j]
        shared = mlp + ("shared_experts." if self.fmt == "deepseek_v3" else "shared_expert.")
        if cfg.moe.n_shared:  # one SwiGLU of width n_shared * d_shared (see ModelConfig.d_shared_total)
            self.glu(shared + "gate_proj.weight", shared + "up_proj.weight", shared + "down_proj.weight",
                     src + "ffn.shared.")
            if cfg.moe.shared_gate:
                self.put(mlp + "shared_expert_gate.weight", src + "ffn.shared_gate.weight")
        elif self.fmt == "deepseek_v3":
            # DeepSeek-V3 always builds shared experts, n_shared_experts x moe_intermediate_size wide: with 0 of
            # them a SwiGLU of width 0, which adds nothing (written so that transformers misses no tensor)
            z = sd[src + "ffn.router.weight"]
            d = cfg.d_model
            out.update({shared + "gate_proj.weight": z.new_zeros(0, d), shared + "up_proj.weight": z.new_zeros(0, d),
                        shared + "down_proj.weight": z.new_zeros(d, 0)})

    def mla(self, src: str, dst: str) -> None:
        """moelab MLA under `src` ("layers.3.attn.") -> DeepSeek-V3 attention under `dst`, rope rows in
        DeepSeek's interleaved layout (hf.py's import permutation undone)."""
        cfg, sd = self.cfg, self.sd
        nope, rope, kv = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.kv_rank
        if cfg.q_lora_rank:
            self.put(dst + "q_a_proj.weight", src + "wq_a.weight")
            self.put(dst + "q_a_layernorm.weight", src + "q_norm.weight")
            q_src, q_dst = src + "wq_b.weight", dst + "q_b_proj.weight"
        else:
            q_src, q_dst = src + "wq.weight", dst + "q_proj.weight"
        self.put(q_dst, q_src, rope_rows(sd[q_src], nope + rope, nope, rope, "interleaved"))
        self.put(dst + "kv_a_proj_with_mqa.weight", src + "wkv_a.weight",
                 rope_rows(sd[src + "wkv_a.weight"], kv + rope, kv, rope, "interleaved"))
        self.put(dst + "kv_a_layernorm.weight", src + "kv_norm.weight")
        self.put(dst + "kv_b_proj.weight", src + "wkv_b.weight")
        self.put(dst + "o_proj.weight", src + "wo.weight")

    def mtp(self, j: int) -> None:
        """moelab MTP module j -> DeepSeek-V3's layout at layer num_hidden_layers + j, with the copies of the
        shared embedding and head that DeepSeek's checkpoints store per module."""
        cfg, src, dst = self.cfg, f"mtp.{j}.", f"model.layers.{self.cfg.n_layers + j}."
        self.put(dst + "enorm.weight", src + "embed_norm.weight")
        self.put(dst + "hnorm.weight", src + "hidden_norm.weight")
        self.put(dst + "eh_proj.weight", src + "proj.weight")
        self.put(dst + "shared_head.norm.weight", src + "out_norm.weight")
        self.block(src + "block.", dst, cfg.mtp_is_moe)
        self.out[dst + "embed_tokens.weight"] = self.sd["embed.weight"]
        self.out[dst + "shared_head.head.weight"] = self.sd["embed.weight" if cfg.tie_embeddings else "lm_head.weight"]


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
        check_format(ModelConfig(), format)  # raises the "allowed" error before any loading
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
    dtypes = {k: torch.float32 if k.endswith(FP32_TENSORS) else dtype for k in tensors}
    nbytes = {k: t.numel() * torch.empty((), dtype=dtypes[k]).element_size() for k, t in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    total = sum(nbytes.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, keys in zip(names, shards):
        # clone: gate and up rows are views of one moelab matrix, and safetensors refuses shared storage
        save_file({k: tensors[k].to("cpu", dtypes[k]).contiguous().clone() for k in keys}, str(root / file),
                  metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return ["config.json", *names]
