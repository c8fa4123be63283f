"""Typed configs for one run, presets, parameter and FLOP accounting, Hugging Face config import.

Every config is a dataclass with defaults that run on a laptop. Configs are filled strictly from dicts
(YAML sweep files, `--section.field value` flags): an unknown key or a bad value raises `ConfigError`
naming the dotted field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or inconsistent with another one."""


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}: got {value!r}; allowed: {allowed}")


# ----------------------------------------------------------------------------------------------------------
# Model


@dataclass
class MoEConfig:
    """The MoE FFN. `n_experts == 0` means a dense SwiGLU FFN everywhere.

    Granularity G (Krajewski et al.): a dense FFN of width `d_ff` becomes G experts of width `d_ff / G`;
    `d_expert` overrides that width directly (HF imports do this).
    """

    n_experts: int = 0  # routed experts per MoE layer; 0 = dense model
    top_k: int = 2
    granularity: int = 1
    d_expert: int = 0  # 0 = d_ff // granularity
    n_shared: int = 0  # always-on shared experts
    d_shared: int = 0  # width of each shared expert; 0 = d_expert
    shared_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w)
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True  # rescale the top-k gate weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch balance loss a * N * sum_i f_i P_i
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free bias step gamma; 0 = off
    # DeepSeek-V3 sequence-wise balance loss (paper Eq. 17-20), coefficient alpha; 0 = off (paper: ~1e-4)
    seq_aux_loss_coef: float = 0.0
    # Group-limited (DeepSeek-V3 "node-limited") routing: the E experts form n_group contiguous groups, each
    # token keeps its topk_group best groups (a group scores the sum of its 2 best biased scores) and picks its
    # top_k experts inside them. n_group = 1: plain top-k.
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # routed gate weights x this, after renormalize (DeepSeek-V3: 2.5)
    capacity_factor: float = 0.0  # 0 = dropless; else capacity = ceil(cf * T * k / E) slots per expert
    dense_layers: tuple[int, ...] = ()  # layer indices that keep a dense FFN (e.g. DeepSeek's first layers)
    force_balanced: bool = False  # tests/debug: route round-robin, ignoring the router (deterministic load)

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0


@dataclass
class ModelConfig:
    """A LLaMA/Qwen-style decoder. Shapes: d_model, heads of `head_dim`, GQA with `n_kv_heads`; or MLA
    attention (`attention="mla"`, DeepSeek-V2/V3), and multi-token prediction modules (`mtp_depth`)."""

    vocab_size: int = 257  # byte tokenizer: 256 bytes + end-of-document
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (multi-head attention)
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 192  # dense SwiGLU width
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: Literal["none", "full", "head"] = "none"  # full: over all heads (OLMoE); head: per head
    tie_embeddings: bool = False
    init_std: float = 0.02
    # "gqa": grouped-query attention (n_kv_heads, head_dim, qkv_bias, qk_norm above). "mla": Multi-head Latent
    # Attention (DeepSeek-V2 §2.1): every head's key and value are decompressed from one latent per token, and
    # position enters through a separate RoPE'd part of query and key. The MLA widths below, 0 = derived from
    # head_dim with DeepSeek-V2/V3's ratios (nope = v = head_dim, rope = head_dim / 2, kv latent = 4 head_dim;
    # there 128 / 64 / 128 / 512). Each must stay 0 with "gqa".
    attention: Literal["gqa", "mla"] = "gqa"
    q_lora_rank: int = 0  # MLA query latent width; 0 = a full-rank query projection (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 0  # MLA key/value latent width (the KV cache holds this + qk_rope_head_dim per token)
    qk_nope_head_dim: int = 0  # MLA per-head query/key features without position
    qk_rope_head_dim: int = 0  # MLA per-head query features under RoPE; the key's are one head shared by all
    v_head_dim: int = 0  # MLA per-head value width
    # Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules after the model, module j predicting
    # token t+j+1 through the shared embedding and output head; 0 = off. Its loss weight is train.mtp_loss_weight.
    mtp_depth: int = 0
    moe: MoEConfig = field(default_factory=MoEConfig)

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def d_expert(self) -> int:
        return self.moe.d_expert or self.d_ff // self.moe.granularity

    @property
    def d_shared_total(self) -> int:
        """Shared experts are summed, so n_shared SwiGLUs of width w equal one SwiGLU of width n*w."""
        return self.moe.n_shared * (self.moe.d_shared or self.d_expert)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.enabled and i not in self.moe.dense_layers

    @property
    def mtp_is_moe(self) -> bool:
        """An MTP module's block has the FFN the main model's last layer has (DeepSeek-V3's MTP block is one
        of its MoE blocks): MoE unless that layer is dense."""
        return self.is_moe_layer(self.n_layers - 1)

    # Attention widths, per head. GQA: queries, keys and values of head_dim, all under RoPE. MLA: query and key
    # of qk_nope + qk_rope features (only the rope part rotated), values of v_head_dim.
    @property
    def qk_rope_dim(self) -> int:
        """Features per query/key head that RoPE rotates (the rotary tables' width)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim or self.hd // 2
        return self.hd

    @property
    def qk_nope_dim(self) -> int:
        return (self.qk_nope_head_dim or self.hd) if self.attention == "mla" else 0

    @property
    def qk_dim(self) -> int:
        """Query/key width per head: the dot product of the attention scores runs over this many features."""
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def v_dim(self) -> int:
        return (self.v_head_dim or self.hd) if self.attention == "mla" else self.hd

    @property
    def kv_rank(self) -> int:
        """MLA's key/value latent width (0 under GQA)."""
        return (self.kv_lora_rank or 4 * self.hd) if self.attention == "mla" else 0

    def validate(self) -> "ModelConfig":
        m = self.moe
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                _fail(f"model.{name}", getattr(self, name), "a positive integer")
        if self.n_kv_heads < 0 or self.head_dim < 0:
            _fail("model.n_kv_heads/head_dim", (self.n_kv_heads, self.head_dim), ">= 0 (0 = derived)")
        if not self.head_dim and self.d_model % self.n_heads:
            _fail("model.n_heads", self.n_heads, f"a divisor of model.d_model={self.d_model} (or set head_dim)")
        if self.n_heads % self.kv_heads:
            _fail("model.n_kv_heads", self.n_kv_heads, f"a divisor of model.n_heads={self.n_heads}")
        if self.attention == "gqa" and self.hd % 2:
            _fail("model.head_dim", self.hd, "an even number (RoPE rotates pairs)")
        if self.qk_norm not in ("none", "full", "head"):
            _fail("model.qk_norm", self.qk_norm, "'none', 'full', 'head'")
        self._validate_attention()
        if self.mtp_depth < 0:
            _fail("model.mtp_depth", self.mtp_depth, "0 (off) or a positive integer (DeepSeek-V3: 1)")
        if m.score_func not in ("softmax", "sigmoid"):
            _fail("model.moe.score_func", m.score_func, "'softmax', 'sigmoid'")
        if m.n_experts < 0:
            _fail("model.moe.n_experts", m.n_experts, "0 (dense) or a positive integer")
        if not m.enabled:
            return self
        if not 1 <= m.top_k <= m.n_experts:
            _fail("model.moe.top_k", m.top_k, f"1..model.moe.n_experts={m.n_experts}")
        if m.granularity < 1:
            _fail("model.moe.granularity", m.granularity, "an integer >= 1")
        if not m.d_expert and self.d_ff % m.granularity:
            divisors = [g for g in range(1, min(self.d_ff, 64) + 1) if self.d_ff % g == 0]
            _fail("model.moe.granularity", m.granularity, f"a divisor of model.d_ff={self.d_ff}: {divisors}")
        if m.d_expert < 0 or m.d_shared < 0 or m.n_shared < 0:
            _fail("model.moe.d_expert/d_shared/n_shared", (m.d_expert, m.d_shared, m.n_shared), ">= 0")
        if m.capacity_factor < 0:
            _fail("model.moe.capacity_factor", m.capacity_factor, "0 (dropless) or a positive number")
        if m.aux_loss_coef < 0 or m.z_loss_coef < 0 or m.bias_update_rate < 0:
            _fail("model.moe.*_coef/bias_update_rate", (m.aux_loss_coef, m.z_loss_coef, m.bias_update_rate), ">= 0")
        if m.seq_aux_loss_coef < 0:
            _fail("model.moe.seq_aux_loss_coef", m.seq_aux_loss_coef, ">= 0 (0 = off)")
        if not m.routed_scaling_factor > 0:
            _fail("model.moe.routed_scaling_factor", m.routed_scaling_factor, "a positive number (1.0 = off)")
        if m.n_group < 1 or m.n_experts % m.n_group:
            divisors = [g for g in range(1, m.n_experts + 1) if m.n_experts % g == 0]
            _fail("model.moe.n_group", m.n_group, f"a divisor of model.moe.n_experts={m.n_experts}: {divisors}")
        per_group = m.n_experts // m.n_group
        if m.n_group > 1 and per_group < 2:
            # a group scores the sum of its two best experts, so it needs two
            _fail("model.moe.n_group", m.n_group, f"at most model.moe.n_experts/2={m.n_experts // 2} "
                  f"(each group must hold >= 2 experts), or 1 (off)")
        if not 1 <= m.topk_group <= m.n_group:
            _fail("model.moe.topk_group", m.topk_group, f"1..model.moe.n_group={m.n_group}")
        if m.top_k > m.topk_group * per_group:
            _fail("model.moe.topk_group", m.topk_group,
                  f"enough groups for model.moe.top_k={m.top_k}: topk_group x (n_experts/n_group = {per_group}) "
                  f">= top_k, i.e. >= {math.ceil(m.top_k / per_group)}")
        bad = [i for i in m.dense_layers if not 0 <= i < self.n_layers]
        if bad:
            _fail("model.moe.dense_layers", m.dense_layers, f"layer indices in 0..{self.n_layers - 1}")
        if m.shared_gate and not m.n_shared:
            _fail("model.moe.shared_gate", True, "true only with model.moe.n_shared >= 1")
        return self

    def _validate_attention(self) -> None:
        mla_fields = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.attention not in ("gqa", "mla"):
            _fail("model.attention", self.attention, "'gqa', 'mla'")
        for name in mla_fields:
            if getattr(self, name) < 0:
                _fail(f"model.{name}", getattr(self, name), ">= 0 (0 = derived from head_dim; q_lora_rank: off)")
        if self.attention == "gqa":
            for name in mla_fields:
                if getattr(self, name):
                    _fail(f"model.{name}", getattr(self, name), "0 unless model.attention='mla'")
            return
        # MLA: each head decompresses its own key and value (no KV head groups); the GQA-only options would be
        # silently ignored, so they are refused.
        if self.n_kv_heads not in (0, self.n_heads):
            _fail("model.n_kv_heads", self.n_kv_heads, f"0 or model.n_heads={self.n_heads} with model.attention="
                  f"'mla' (every head gets its own key and value from the shared latent)")
        if self.qkv_bias:
            _fail("model.qkv_bias", True, "false with model.attention='mla'")
        if self.qk_norm != "none":
            _fail("model.qk_norm", self.qk_norm, "'none' with model.attention='mla' (it normalises its latents)")
        if self.qk_rope_dim <= 0 or self.qk_rope_dim % 2:
            _fail("model.qk_rope_head_dim", self.qk_rope_head_dim,
                  f"an even number >= 2 (RoPE rotates pairs; 0 derives head_dim / 2 = {self.hd // 2})")

    # -- accounting ---------------------------------------------------------------------------------------
    def attention_params(self) -> int:
        """Parameters of one attention sublayer (GQA or MLA)."""
        d, nh = self.d_model, self.n_heads
        if self.attention == "mla":
            # query: d -> (q latent, its norm ->) heads x qk; kv: d -> latent + the shared rope key, latent norm,
            # latent -> heads x (k_nope + v); output: heads x v -> d
            r, q_out = self.q_lora_rank, nh * self.qk_dim
            q = d * q_out if not r else d * r + r + r * q_out
            kv_b = self.kv_rank * nh * (self.qk_nope_dim + self.v_dim)
            kv = d * (self.kv_rank + self.qk_rope_dim) + self.kv_rank + kv_b
            return q + kv + nh * self.v_dim * d
        hd, nkv = self.hd, self.kv_heads
        attn = d * nh * hd + 2 * d * nkv * hd + nh * hd * d
        if self.qkv_bias:
            attn += nh * hd + 2 * nkv * hd
        if self.qk_norm == "full":
            attn += nh * hd + nkv * hd
        elif self.qk_norm == "head":
            attn += 2 * hd
        return attn

    def block_params(self, moe: bool) -> tuple[int, int, int, int]:
        """(total, active, routed-expert total, routed-expert active) parameters of one block: attention, its
        two norms, and a dense FFN or (`moe`) an MoE FFN with its router and shared experts."""
        d = self.d_model
        base = self.attention_params() + 2 * d
        if not moe:
            return (base + 3 * d * self.d_ff,) * 2 + (0, 0)
        m = self.moe
        expert = 3 * d * self.d_expert
        base += m.n_experts * d + 3 * d * self.d_shared_total + (d if m.shared_gate else 0)  # router, shared
        return base + m.n_experts * expert, base + m.top_k * expert, m.n_experts * expert, m.top_k * expert

    def mtp_params(self) -> tuple[int, int]:
        """(total, active) parameters of one MTP module: its two input norms, the 2d -> d projection, a block,
        the norm before the shared head. The embedding and output head are shared with the model: not counted."""
        d = self.d_model
        total, active, _, _ = self.block_params(self.mtp_is_moe)
        own = 2 * d + 2 * d * d + d
        return total + own, active + own

    def param_counts(self) -> dict[str, int]:
        """Parameter counts. `active` = what one token uses (top_k routed experts, every shared expert).

        `embedding` is the token embedding plus an untied output head; `non_embedding` the rest. Every count
        includes the MTP modules (what the run trains and stores); `mtp` / `mtp_active` are their share, so the
        main model alone is `total - mtp` (how DeepSeek-V3 reports 671B: its 14B MTP module excluded).
        """
        d = self.d_model
        total = active = routed_total = routed_active = 0
        for i in range(self.n_layers):
            t, a, rt, ra = self.block_params(self.is_moe_layer(i))
            total, active = total + t, active + a
            routed_total, routed_active = routed_total + rt, routed_active + ra
        mtp_total, mtp_active = (self.mtp_depth * n for n in self.mtp_params())
        if self.mtp_depth and self.mtp_is_moe:
            _, _, rt, ra = self.block_params(True)
            routed_total += self.mtp_depth * rt
            routed_active += self.mtp_depth * ra
        embedding = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        final_norm = d
        total += embedding + final_norm + mtp_total
        active += embedding + final_norm + mtp_active
        return {
            "total": total,
            "active": active,
            "embedding": embedding,
            "non_embedding": total - embedding,
            "active_non_embedding": active - embedding,
            "routed_experts": routed_total,
            "routed_active": routed_active,
            "mtp": mtp_total,
            "mtp_active": mtp_active,
        }

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward.

        Convention (Kaplan et al. 2020 / Chinchilla): 6 x (active non-embedding params + the output-head
        matmul, vocab x d_model) + attention scores and values, 6 x n_layers x seq_len x n_heads x (qk + v),
        counted without the causal-mask discount: the scores take 2 qk and the weighted values 2 v FLOPs per
        (query, key) pair and head in the forward, twice that in the backward. qk = v = head_dim for GQA (so
        12 x n_layers x seq_len x n_heads x head_dim); for MLA qk = qk_nope + qk_rope and v = v_head_dim (the
        training form: keys and values decompressed, their projections counted as parameters). The embedding
        lookup costs nothing.
        Each MTP module adds its parameters (in `active`), one more output-head matmul and one more attention
        layer; it runs on seq_len - j positions, counted as seq_len (an overcount of j / seq_len).
        """
        s = seq_len or self.max_seq_len
        pc = self.param_counts()
        heads = 1 + self.mtp_depth
        matmul_params = pc["active_non_embedding"] + heads * self.vocab_size * self.d_model
        attention = 6.0 * (self.n_layers + self.mtp_depth) * s * self.n_heads * (self.qk_dim + self.v_dim)
        return 6.0 * matmul_params + attention

    # -- Hugging Face import ------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        """Build a ModelConfig from a Hugging Face `config.json` dict.

        Families (`HF_FAMILIES`): llama, mistral, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe,
        deepseek (v1, no MLA) (MoE); deepseek_v2, deepseek_v3 (MLA attention; MoE after first_k_dense_replace
        dense layers). DeepSeek-V3's `num_nextn_predict_layers` becomes `mtp_depth` (its published 671B excludes
        that module: `param_counts()["total"] - ["mtp"]`); `hf.load_hf` drops it again when the checkpoint
        holds no MTP tensors, as transformers' own saves do.
        """
        return _from_hf(cfg)


HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek",
               "deepseek_v2", "deepseek_v3")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention (ModelConfig.attention = "mla")

# What transformers' DeepseekV2Config / DeepseekV3Config assume for a key config.json lacks: transformers builds
# the model from these, so an import reads a missing key the same way (published configs set them all).
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407,
                        routed_scaling_factor=1.0, first_k_dense_replace=0, norm_topk_prob=False,
                        topk_method="greedy", scoring_func="softmax"),
    "deepseek_v3": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=2048,
                        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                        first_k_dense_replace=3, norm_topk_prob=True, topk_method="noaux_tc",
                        scoring_func="sigmoid", rope_interleave=True),
}
# The eps transformers' and DeepSeek's MLA gives the query and key/value latent norms, whatever rms_norm_eps says;
# moelab's MLA normalises them with model.norm_eps, so the two agree only at this value.
MLA_LATENT_NORM_EPS = 1e-6


def _qkv_bias(mt: str, cfg: dict) -> bool:
    """Whether q/k/v projections carry a bias, per family: the flag differs (and some families have none)."""
    if mt == "qwen2":
        return True  # always, no flag
    if mt == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    if mt in ("mistral", "mixtral") or mt in MLA_FAMILIES:
        # mistral/mixtral: no bias anywhere in attention (an `attention_bias` key would be ignored). MLA:
        # `attention_bias` biases q_a_proj, kv_a_proj_with_mqa and o_proj, which moelab's MLA lacks: the loader
        # accepts them only when zero.
        return False
    # llama, qwen3, qwen3_moe, olmoe, deepseek: `attention_bias` puts a bias on q, k, v *and* o; the loader
    # checks that o's bias is zero (moelab's output projection has none).
    return bool(cfg.get("attention_bias", False))


def _first_k_dense(cfg: dict, n_layers: int, first: int) -> tuple[int, ...]:
    """DeepSeek (v1-v3): layer i is an MoE layer when i >= first_k_dense_replace and i % moe_layer_freq == 0
    (DeepSeek's own modeling code; transformers' V2/V3 ignore moe_layer_freq, which every published checkpoint
    sets to 1). The dense layers, ascending."""
    freq = cfg.get("moe_layer_freq") or 1
    return tuple(i for i in range(n_layers) if not (i >= first and i % freq == 0))


def _mla_kwargs(mt: str, cfg: dict) -> dict[str, Any]:
    """DeepSeek-V2/V3 attention fields -> ModelConfig keyword arguments (attention="mla" and its widths)."""
    get = lambda key: cfg.get(key, _DEEPSEEK_DEFAULTS[mt].get(key))  # noqa: E731
    nh = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads") not in (None, nh):
        # MLA decompresses a key and a value per query head; transformers' grouping of them would not even run
        _fail("config.json num_key_value_heads", cfg["num_key_value_heads"],
              f"num_attention_heads={nh} (or absent) for {mt}: MLA has a key and a value per head")
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    if eps != MLA_LATENT_NORM_EPS:
        _fail("config.json rms_norm_eps", eps, f"{MLA_LATENT_NORM_EPS} for {mt}: transformers and DeepSeek normalise "
              f"the MLA latents with eps 1e-6 whatever rms_norm_eps says, moelab with the one model.norm_eps")
    q_rank = get("q_lora_rank")
    if q_rank is not None and (not isinstance(q_rank, int) or q_rank <= 0):
        _fail("config.json q_lora_rank", q_rank, "null (a full-rank query projection) or a positive integer")
    widths = {}
    # 0 would mean "derived from head_dim" to ModelConfig, so each width must be given and positive
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        widths[key] = get(key)
        if not isinstance(widths[key], int) or widths[key] <= 0:
            _fail(f"config.json {key}", widths[key], "a positive integer")
    if mt == "deepseek_v3" and get("rope_interleave") not in (True, False):
        _fail("config.json rope_interleave", get("rope_interleave"), "true (DeepSeek's layout) or false")
    d = cfg["hidden_size"]
    # head_dim only derives MLA widths that are 0 here; transformers writes head_dim = qk_rope_head_dim, which
    # is no width of ours. Keep the derivation base d / heads when it divides (else any value: all are set).
    return dict(attention="mla", n_kv_heads=0, head_dim=0 if d % nh == 0 else widths["v_head_dim"],
                q_lora_rank=q_rank or 0, qkv_bias=False, qk_norm="none", norm_eps=eps, **widths)


def _deepseek_mla_moe(mt: str, cfg: dict, n_layers: int) -> tuple[MoEConfig, int]:
    """DeepSeek-V2/V3 routing -> (MoEConfig, mtp_depth). All layers dense (first_k_dense_replace >= layers):
    a dense MoEConfig."""
    get = lambda key: cfg.get(key, _DEEPSEEK_DEFAULTS[mt].get(key))  # noqa: E731
    dense = _first_k_dense(cfg, n_layers, get("first_k_dense_replace") or 0)
    # transformers >= 5 may name the depth num_mtp_layers (an attribute_map alias); DeepSeek num_nextn_predict_layers
    mtp = (cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0) if mt == "deepseek_v3" else 0
    if len(dense) == n_layers:
        return MoEConfig(), mtp
    if get("num_experts_per_tok") is None:  # transformers' DeepseekV2Config has no default for it
        _fail("config.json num_experts_per_tok", None, "a positive integer (routed experts per token)")
    common = dict(n_experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"),
                  d_expert=get("moe_intermediate_size"), n_shared=get("n_shared_experts") or 0,
                  d_shared=get("moe_intermediate_size"), routed_scaling_factor=float(get("routed_scaling_factor")),
                  dense_layers=dense)
    if mt == "deepseek_v2":
        if get("scoring_func") != "softmax":
            _fail("config.json scoring_func", get("scoring_func"), "'softmax' (DeepSeek-V2)")
        if get("topk_method") != "greedy":
            # V2's group_limited_greedy scores a group by its best expert; moelab's group-limited routing is
            # DeepSeek-V3's, which scores a group by the sum of its two best
            _fail("config.json topk_method", get("topk_method"), "'greedy' (moelab's group-limited routing is "
                  "DeepSeek-V3's noaux_tc: a group scores the sum of its two best experts, V2's the best one)")
        if get("norm_topk_prob"):
            # transformers' DeepseekV2 ignores the flag and DeepSeek's own code honours it: no one function
            _fail("config.json norm_topk_prob", True, "false for deepseek_v2 (transformers ignores it, DeepSeek's "
                  "code renormalises: the checkpoint's function is ambiguous)")
        return MoEConfig(score_func="softmax", renormalize=False,
                         aux_loss_coef=cfg.get("aux_loss_alpha", 0.001), **common), 0
    if get("scoring_func") != "sigmoid":
        _fail("config.json scoring_func", get("scoring_func"), "'sigmoid' (DeepSeek-V3)")
    if get("topk_method") != "noaux_tc":
        _fail("config.json topk_method", get("topk_method"), "'noaux_tc' (DeepSeek-V3: biased, group-limited top-k)")
    # DeepSeek-V3 balances with the aux-loss-free bias (mlp.gate.e_score_correction_bias -> router.expert_bias)
    # and, with seq_aux, a small sequence-wise loss of weight aux_loss_alpha; no Switch loss. The bias step
    # gamma is no part of config.json: model.moe.bias_update_rate stays 0 until set.
    seq = float(cfg.get("aux_loss_alpha", 0.0)) if cfg.get("seq_aux") else 0.0
    return MoEConfig(score_func="sigmoid", renormalize=bool(get("norm_topk_prob")), n_group=get("n_group") or 1,
                     topk_group=get("topk_group") or 1, aux_loss_coef=0.0, seq_aux_loss_coef=seq, **common), mtp


def _sparse_step_dense_layers(cfg: dict, n_layers: int) -> tuple[int, ...]:
    """Qwen2-MoE / Qwen3-MoE: layer i is dense when listed in mlp_only_layers or (i+1) % decoder_sparse_step."""
    only = cfg.get("mlp_only_layers") or []
    step = cfg.get("decoder_sparse_step") or 1
    return tuple(i for i in range(n_layers) if i in only or (i + 1) % step != 0)


def _from_hf(cfg: dict) -> ModelConfig:
    mt = cfg.get("model_type")
    if mt not in HF_FAMILIES:
        _fail("config.json model_type", mt, ", ".join(HF_FAMILIES))
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        _fail("config.json hidden_act", cfg.get("hidden_act"), "'silu' (SwiGLU)")
    if cfg.get("mlp_bias"):
        _fail("config.json mlp_bias", True, "false (moelab FFNs have no bias)")
    if mt not in MLA_FAMILIES and ("q_lora_rank" in cfg or "kv_lora_rank" in cfg):
        _fail("config.json kv_lora_rank", cfg.get("kv_lora_rank"),
              f"absent for model_type {mt!r}: MLA is read for {', '.join(MLA_FAMILIES)} only")
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    rp = cfg.get("rope_parameters") or {}
    for key, rs in (("rope_scaling", cfg.get("rope_scaling")), ("rope_parameters", rp)):
        if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
            # YaRN (DeepSeek-V2/V3's published configs) changes the rotary frequencies and, under MLA, also the
            # softmax scale of every position (by mscale^2): no moelab model computes that function
            _fail(f"config.json {key}", rs, "plain RoPE (rope_type 'default'; YaRN and other scalings are not "
                  "supported)")
    if cfg.get("clip_qkv"):
        _fail("config.json clip_qkv", cfg["clip_qkv"], "null (QKV clipping is not supported)")
    if mt.startswith("qwen") and cfg.get("use_sliding_window"):
        # moelab attends over the whole causal context; a window would change the function past its length
        _fail("config.json use_sliding_window", True, "false (moelab has no sliding-window attention)")
    d = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    # Qwen3Config defaults head_dim to 128 rather than hidden_size / heads; published configs always set it.
    hd = cfg.get("head_dim") or (128 if mt == "qwen3" else d // nh)
    mc = ModelConfig(
        vocab_size=cfg["vocab_size"],
        d_model=d,
        n_layers=cfg["num_hidden_layers"],
        n_heads=nh,
        n_kv_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=hd if hd != d // nh else 0,
        d_ff=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=_qkv_bias(mt, cfg),
        qk_norm="head" if mt in ("qwen3", "qwen3_moe") else "full" if mt == "olmoe" else "none",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    if mt in MLA_FAMILIES:
        mc = dataclasses.replace(mc, **_mla_kwargs(mt, cfg))
        mc.moe, mc.mtp_depth = _deepseek_mla_moe(mt, cfg, mc.n_layers)
        return mc.validate()
    # transformers >= 5 saves Qwen3-MoE's expert count as num_local_experts (an attribute_map alias)
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    moe = MoEConfig()
    if mt == "mixtral":
        # Mixtral: softmax over the top-k logits == softmax over all then renormalise the top-k.
        moe = MoEConfig(n_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                        d_expert=cfg["intermediate_size"], renormalize=True,
                        aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02))
    elif mt == "qwen2_moe":
        shared = cfg.get("shared_expert_intermediate_size", 0)
        moe = MoEConfig(n_experts=n_experts, top_k=cfg["num_experts_per_tok"],
                        d_expert=cfg["moe_intermediate_size"], n_shared=1 if shared else 0, d_shared=shared,
                        shared_gate=bool(shared), renormalize=bool(cfg.get("norm_topk_prob", False)),
                        aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001),
                        dense_layers=_sparse_step_dense_layers(cfg, mc.n_layers))
    elif mt == "qwen3_moe":
        # Qwen2-MoE's routing (softmax, top-k, optional renormalisation) without the shared expert
        moe = MoEConfig(n_experts=n_experts, top_k=cfg["num_experts_per_tok"],
                        d_expert=cfg["moe_intermediate_size"], renormalize=bool(cfg.get("norm_topk_prob", False)),
                        aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001),
                        dense_layers=_sparse_step_dense_layers(cfg, mc.n_layers))
    elif mt == "olmoe":
        moe = MoEConfig(n_experts=n_experts, top_k=cfg["num_experts_per_tok"],
                        d_expert=cfg["intermediate_size"], renormalize=bool(cfg.get("norm_topk_prob", False)),
                        aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01))
    elif mt == "deepseek":
        if cfg.get("scoring_func", "softmax") != "softmax":
            _fail("config.json scoring_func", cfg.get("scoring_func"), "'softmax' (DeepSeek-MoE v1)")
        if cfg.get("topk_method", "greedy") != "greedy":
            _fail("config.json topk_method", cfg.get("topk_method"), "'greedy'")
        dense = _first_k_dense(cfg, mc.n_layers, cfg.get("first_k_dense_replace") or 0)
        moe = MoEConfig(n_experts=cfg["n_routed_experts"], top_k=cfg["num_experts_per_tok"],
                        d_expert=cfg["moe_intermediate_size"], n_shared=cfg.get("n_shared_experts") or 0,
                        d_shared=cfg["moe_intermediate_size"], renormalize=bool(cfg.get("norm_topk_prob", False)),
                        aux_loss_coef=cfg.get("aux_loss_alpha", 0.001), dense_layers=dense)
    mc.moe = moe
    return mc.validate()


# ----------------------------------------------------------------------------------------------------------
# Data, optimiser, training


@dataclass
class DataConfig:
    """Where tokens come from. See `moelab.trainers.data` for the sources."""

    source: Literal["synthetic", "stdlib", "files", "memmap"] = "synthetic"
    # The dataset (synthetic chains, eval split) and batch order; independent of train.seed so that seeds of
    # a sweep vary the initialisation while every trial sees the same data.
    seed: int = 0
    paths: tuple[str, ...] = ()  # files / memmap: local paths or globs
    text_field: str = "text"  # JSONL / Parquet column holding the text
    tokenizer: str = "byte"  # "byte" or a local directory holding an HF tokenizer.json
    memmap_dtype: str = "uint16"  # dtype of raw .bin token files
    eval_fraction: float = 0.05
    max_bytes: int = 32_000_000  # cap on text read from stdlib/files
    # synthetic: a mixture of random Markov "domains", one per document
    n_domains: int = 4
    n_symbols: int = 16
    concentration: float = 0.1  # Dirichlet concentration of each transition row; lower = lower entropy


@dataclass
class OptimConfig:
    """AdamW with parameter groups and an LR schedule."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    expert_lr_fraction: float = 1.0  # routed experts train at this fraction of lr
    schedule: Literal["cosine", "wsd", "deepseek", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying


@dataclass
class TrainConfig:
    steps: int = 200
    max_tokens: int = 0  # > 0: the budget in tokens, overrides steps
    batch_size: int = 16  # sequences per optimiser step (summed over micro-batches)
    micro_batch_size: int = 0  # 0 = batch_size
    seq_len: int = 64
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100  # 0 = only at the end
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    out_dir: str = ""  # "" = runs/<preset>-s<seed>
    ep: int = 1  # expert-parallel size: ranks that split the routed experts (torchrun / Ray Train; 1 = none)
    # lambda of the MTP loss (lambda / D) sum_j CE_j (model.mtp_depth = D > 0). DeepSeek-V3 §4.2 used 0.3 for its
    # first 10T tokens and 0.1 for the last 4.8T; 0.1 here: runs of this lab are short and judged by the
    # next-token loss alone, so the auxiliary objective gets the smaller of the two pulls on the shared trunk.
    mtp_loss_weight: float = 0.1
    # torch.compile each block (loop.compile_blocks; backend $MOELAB_COMPILE_BACKEND, default inductor). The first
    # steps then include compilation: the first log window's MFU is not reported either way.
    compile: bool = False
    # Activation checkpointing (trainers/ac.py): "none"; "selective" recomputes every norm and attention
    # sub-layer in the backward (not the FFN/MoE); "full" recomputes every block and MTP module.
    activation_checkpointing: Literal["none", "selective", "full"] = "none"

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


@dataclass
class UpcycleConfig:
    """How an MoE is initialised from a dense model (`moelab.trainers.upcycle`); the MoE's shape (n_experts,
    top_k, granularity, shared experts) is `model.moe`. Formulas and sources: refs.md "Upcycling"."""

    source: str = ""  # "" = train from scratch; else a moelab run dir / checkpoint.pt or a local HF directory
    router_init: Literal["random", "virtual_group"] = "random"
    router_std: float = 0.02
    scaling: str | float = "none"  # "none", "nvidia", or a number: multiplier on each expert's output
    noise_std: float = 0.0  # N(0, sigma^2) added to the copied expert weights
    reset_ratio: float = 0.0  # Drop-Upcycling: share of each expert's intermediate units re-initialised
    shuffle: bool = False  # per router group, a fresh permutation of the dense d_ff units before the split
    shared_init: Literal["dense", "random"] = "dense"
    seed: int = 0

    def validate(self) -> "UpcycleConfig":
        if self.router_init not in ("random", "virtual_group"):
            _fail("upcycle.router_init", self.router_init, "'random', 'virtual_group'")
        if self.shared_init not in ("dense", "random"):
            _fail("upcycle.shared_init", self.shared_init, "'dense', 'random'")
        if isinstance(self.scaling, str) and self.scaling not in ("none", "nvidia"):
            try:
                self.scaling = float(self.scaling)
            except ValueError:
                _fail("upcycle.scaling", self.scaling, "'none', 'nvidia' or a positive number")
        if not isinstance(self.scaling, str) and not self.scaling > 0:
            _fail("upcycle.scaling", self.scaling, "'none', 'nvidia' or a positive number")
        if not 0 <= self.reset_ratio <= 1:
            _fail("upcycle.reset_ratio", self.reset_ratio, "a number in [0, 1]")
        if self.noise_std < 0 or self.router_std < 0:
            _fail("upcycle.noise_std/router_std", (self.noise_std, self.router_std), ">= 0")
        return self

    def check_model(self, model: "ModelConfig") -> "UpcycleConfig":
        """The checks that need the MoE's shape too (run before any weights are touched)."""
        if self.shuffle and model.moe.enabled and model.d_expert == model.d_ff:
            # With G = 1 each expert holds all d_ff units, and permuting a SwiGLU's units leaves its
            # function unchanged: a shuffle arm would differ from its control only by its random stream.
            raise ConfigError(
                f"upcycle.shuffle: got True; allowed: false when the granularity G = model.d_ff / d_expert is 1 "
                f"(d_ff={model.d_ff}, d_expert={model.d_expert}): every expert then holds the whole dense FFN, so a "
                f"permutation of its units changes nothing. Set upcycle.shuffle=false, or model.moe.granularity "
                f">= 2 to shuffle units across fine-grained experts")
        return self


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    preset: str = ""

    def total_steps(self) -> int:
        t = self.train
        if t.max_tokens > 0:
            return max(1, math.ceil(t.max_tokens / (t.batch_size * t.seq_len)))
        return t.steps

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.upcycle.validate().check_model(self.model)
        t, o, d = self.train, self.optim, self.data
        for name in ("batch_size", "seq_len", "log_every", "eval_batches"):
            if getattr(t, name) <= 0:
                _fail(f"train.{name}", getattr(t, name), "a positive integer")
        if t.steps <= 0 and t.max_tokens <= 0:
            _fail("train.steps", t.steps, "a positive integer (or set train.max_tokens)")
        if t.micro_batch_size < 0 or t.batch_size % t.micro:
            _fail("train.micro_batch_size", t.micro_batch_size, f"a divisor of train.batch_size={t.batch_size}")
        if t.seq_len > self.model.max_seq_len:
            _fail("train.seq_len", t.seq_len, f"<= model.max_seq_len={self.model.max_seq_len}")
        if t.seq_len <= self.model.mtp_depth:
            _fail("train.seq_len", t.seq_len, f"> model.mtp_depth={self.model.mtp_depth} (MTP module j predicts "
                  f"token t+j+1, so it needs more than j positions)")
        if t.mtp_loss_weight < 0:
            _fail("train.mtp_loss_weight", t.mtp_loss_weight, ">= 0")
        if t.activation_checkpointing not in ("none", "selective", "full"):
            _fail("train.activation_checkpointing", t.activation_checkpointing, "'none', 'selective', 'full'")
        if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
            _fail("train.device", t.device, "'auto', 'cpu', 'cuda', 'cuda:N'")
        if t.ep < 1 or (t.ep > 1 and (not self.model.moe.enabled or self.model.moe.n_experts % t.ep)):
            n = self.model.moe.n_experts
            _fail("train.ep", t.ep, f"1, or a divisor of model.moe.n_experts={n}" if n else "1 (a dense model)")
        if t.dtype not in ("auto", "float32", "bfloat16"):
            _fail("train.dtype", t.dtype, "'auto', 'float32', 'bfloat16'")
        if not isinstance(t.compile, bool):
            _fail("train.compile", t.compile, "true or false")
        if o.schedule not in ("cosine", "wsd", "deepseek", "constant"):
            _fail("optim.schedule", o.schedule, "'cosine', 'wsd', 'deepseek', 'constant'")
        if o.lr <= 0:
            _fail("optim.lr", o.lr, "a positive number")
        if not 0 < o.expert_lr_fraction <= 10:
            _fail("optim.expert_lr_fraction", o.expert_lr_fraction, "a number in (0, 10]")
        if not 0 <= o.min_lr_ratio <= 1:
            _fail("optim.min_lr_ratio", o.min_lr_ratio, "a number in [0, 1]")
        if not 0 <= o.decay_fraction <= 1:
            _fail("optim.decay_fraction", o.decay_fraction, "a number in [0, 1]")
        if o.warmup_steps < 0:
            _fail("optim.warmup_steps", o.warmup_steps, ">= 0")
        if d.source not in ("synthetic", "stdlib", "files", "memmap"):
            _fail("data.source", d.source, "'synthetic', 'stdlib', 'files', 'memmap'")
        if d.source in ("files", "memmap") and not d.paths:
            _fail("data.paths", d.paths, f"one or more local paths (data.source={d.source!r} needs them)")
        if not 0 < d.eval_fraction < 1:
            _fail("data.eval_fraction", d.eval_fraction, "a number in (0, 1)")
        if d.source == "synthetic" and d.n_symbols > self.model.vocab_size:
            _fail("data.n_symbols", d.n_symbols, f"<= model.vocab_size={self.model.vocab_size}")
        return self


# ----------------------------------------------------------------------------------------------------------
# Strict dict -> dataclass


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            _fail(path, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(path, value, ", ".join(repr(a) for a in allowed))
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        _fail(path, value, " or ".join(getattr(a, "__name__", str(a)) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        _fail(path, value, "true or false")
    if tp is int:
        if isinstance(value, bool):
            _fail(path, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail(path, value, "an integer")
            except ValueError:
                pass
        _fail(path, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            _fail(path, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail(path, value, "a number")
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "a string")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, strictly: unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        p = f"{path}.{key}" if path else key
        if key not in fields:
            _fail(p, key, "one of " + ", ".join(sorted(fields)))
        kwargs[key] = _coerce(value, hints[key], p)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def apply_overrides(cfg: Any, overrides: dict[str, Any], path: str = "") -> Any:
    """Return a copy of dataclass `cfg` with dotted keys (`model.moe.top_k`) set, strictly typed."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        (nested.setdefault(head, {}).__setitem__(rest, value)) if rest else direct.__setitem__(head, value)
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for head in list(direct) + list(nested):
        if head not in names:
            p = f"{path}.{head}" if path else head
            _fail(p, head, "one of " + ", ".join(sorted(names)))
    for head, value in direct.items():
        p = f"{path}.{head}" if path else head
        changes[head] = _coerce(value, hints[head], p)
    for head, sub in nested.items():
        p = f"{path}.{head}" if path else head
        child = changes.get(head, getattr(cfg, head))
        if not dataclasses.is_dataclass(child):
            _fail(p, sub, f"{p} is a value, not a section")
        changes[head] = apply_overrides(child, sub, p)
    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------------------------------------
# Presets


def _dense(d_model: int, n_layers: int, *, head_dim: int = 64, kv_ratio: int = 1, ffn_mult: float = 8 / 3,
           vocab: int = 257, seq: int = 2048, multiple: int = 64) -> ModelConfig:
    """A dense decoder sized from width and depth: heads of `head_dim`, SwiGLU width ~ ffn_mult x d."""
    n_heads = max(1, d_model // head_dim)
    d_ff = multiple * math.ceil(ffn_mult * d_model / multiple)
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=max(1, n_heads // kv_ratio), d_ff=d_ff, max_seq_len=seq)


def _moe(base: ModelConfig, **moe: Any) -> ModelConfig:
    return dataclasses.replace(base, moe=MoEConfig(**moe))


def _train(**kw: Any) -> TrainConfig:
    return TrainConfig(**kw)


def _ladder() -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """Dense ladder for scaling fits on CPU: depth n, width 32 n (aspect ratio kept), 16-wide heads."""
    out = {}
    for depth in (2, 3, 4, 6, 8):
        m = _dense(32 * depth, depth, head_dim=16, ffn_mult=3, multiple=32, seq=256)
        out[f"ladder-{depth}"] = (m, _train(seq_len=64, batch_size=16))
    return out


def _presets() -> dict[str, tuple[ModelConfig, TrainConfig]]:
    tiny = _dense(64, 2, head_dim=16, kv_ratio=2, ffn_mult=3, multiple=32, seq=256)  # d_ff 192
    small = _dense(256, 4, head_dim=64, ffn_mult=4, seq=1024)  # d_ff 1024
    gpt = dict(vocab=50304, seq=4096)
    p = {
        "tiny": (tiny, _train(seq_len=64, batch_size=16)),
        # Same active FFN width as tiny: 8 experts of d_ff/2, top-2.
        "moe-tiny": (_moe(tiny, n_experts=8, top_k=2, granularity=2), _train(seq_len=64, batch_size=16)),
        # tiny with DeepSeek-V3's attention and objective: MLA (heads of 16 + 8 rope features, values of 16, a KV
        # latent of 64, a query latent of 32) and one MTP module.
        "mla-mtp-tiny": (dataclasses.replace(tiny, attention="mla", n_kv_heads=0, q_lora_rank=32, mtp_depth=1),
                         _train(seq_len=64, batch_size=16)),
        "small": (small, _train(seq_len=256, batch_size=16)),
        "moe-small": (_moe(small, n_experts=16, top_k=2, granularity=2), _train(seq_len=256, batch_size=16)),
        # OLMoE-1B-7B-like: 64 experts of 1024, top-8, no shared expert, QK-norm.
        "moe-1b": (dataclasses.replace(_moe(_dense(2048, 16, **gpt), n_experts=64, top_k=8, d_expert=1024,
                                            renormalize=False), qk_norm="full"),
                   _train(seq_len=4096, batch_size=512, micro_batch_size=4, steps=100_000)),
        # DeepSeek-V3-style moe-1b: experts of half the width (128 x 512, the same total routed width) with one
        # of the 16 active slots made a shared expert (top-15 + 1 shared: the same 8192 active FFN width);
        # sigmoid scores, renormalised top-k x 2.5 (routed_scaling_factor), 8 groups of 16 experts of which
        # each token may use 4; balance by the aux-loss-free bias (gamma 1e-3) plus a small sequence-wise loss
        # (alpha 1e-4), no Switch loss and no z-loss; layer 0 dense. MLA with moe-1b's 32 heads, DeepSeek-V3's
        # per-head widths (qk 128 nope + 64 rope, v 128) and latents at its ratios to d_model (q 1536 / 7168,
        # kv 512 / 7168 -> 448 and 160; no QK-norm: MLA normalises its latents); one MTP module; norm eps 1e-6
        # (DeepSeek-V3's, and the MLA latent norms' in transformers: `moelab export` needs it).
        # Without MTP: 1.22B active / 6.55B total (moe-1b: 1.28B / 6.92B; MLA's attention has 13.8M parameters
        # per layer to GQA's 16.8M) and 1.07e10 training FLOPs/token at seq 4096 (moe-1b: 8.7e9: the attention
        # term is 2.5x, qk + v = 192 + 128 features per head to 64 + 64). The MTP module adds 73M active / 428M
        # total parameters (an MoE block, the 2d -> d projection) and 1.3e9 FLOPs/token (its block, its
        # attention, one more output head); `moelab presets` counts it in.
        "moe-1b-dsv3": (dataclasses.replace(_moe(_dense(2048, 16, **gpt), n_experts=128, top_k=15, d_expert=512,
                                                 n_shared=1, score_func="sigmoid", renormalize=True,
                                                 routed_scaling_factor=2.5, n_group=8, topk_group=4,
                                                 aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=1e-3,
                                                 seq_aux_loss_coef=1e-4, dense_layers=(0,)),
                                            attention="mla", n_kv_heads=0, q_lora_rank=448, kv_lora_rank=160,
                                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                            mtp_depth=1, norm_eps=1e-6),
                        _train(seq_len=4096, batch_size=512, micro_batch_size=4, steps=100_000)),
        "1b": (_dense(2048, 16, ffn_mult=4, **gpt), _train(seq_len=4096, batch_size=512, micro_batch_size=4)),
        "3b": (_dense(3072, 28, ffn_mult=8 / 3, kv_ratio=3, **gpt),
               _train(seq_len=4096, batch_size=512, micro_batch_size=2)),
    }
    p.update(_ladder())
    return p


PRESETS = _presets()


def preset(name: str) -> RunConfig:
    """A fresh RunConfig for preset `name` (see `moelab presets`)."""
    if name not in PRESETS:
        _fail("preset", name, ", ".join(PRESETS))
    m, t = PRESETS[name]
    m = dataclasses.replace(m, moe=dataclasses.replace(m.moe))
    rc = RunConfig(model=m, train=dataclasses.replace(t), preset=name)
    if m.vocab_size < 257:
        rc.data.n_symbols = min(rc.data.n_symbols, m.vocab_size)
    return rc


def load_run_config(preset_name: str = "tiny", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Preset + dotted overrides (`{"model.moe.top_k": 4}`), validated."""
    rc = preset(preset_name)
    if overrides:
        rc = apply_overrides(rc, overrides)
    return rc.validate()
