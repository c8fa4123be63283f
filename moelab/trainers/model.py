"""A LLaMA/Qwen-style decoder: RMSNorm, RoPE, grouped-query attention (SDPA) or DeepSeek's Multi-head Latent
Attention, SwiGLU FFN or MoE block, and optional DeepSeek-V3 multi-token prediction (MTP) modules.

Read top to bottom: norms and rotary embeddings, attention (GQA, MLA), a block, an MTP module, the model,
initialisation. `build_model(cfg)` returns a plain `Transformer`; parallelism is applied to it from outside.
Many ranks start from `meta_model(cfg)`: shard it, `to_empty` on the device, then `init_weights(seed)` fills
each rank's shards with the values `build_model` draws for them (the scheme is in `init.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.trainers.config import ModelConfig
from moelab.trainers.moe import MoE, SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 mean-of-squares loses too many bits at large d.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [seq_len, head_dim/2]. Frequencies theta^(-2i/head_dim) (Su et al., RoFormer)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, hd]. Rotates the pairs (i, i + hd/2), the half-split layout HF LLaMA checkpoints use."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[: x.shape[2]], sin[: x.shape[2]]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd, nh, nkv = cfg.d_model, cfg.hd, cfg.n_heads, cfg.kv_heads
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.wq = nn.Linear(d, nh * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(nh * hd, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "full":  # OLMoE: one norm over all heads' features
            self.q_norm, self.k_norm = RMSNorm(nh * hd, cfg.norm_eps), RMSNorm(nkv * hd, cfg.norm_eps)
        elif cfg.qk_norm == "head":  # Qwen3-style: per head
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.nh, self.hd)
        k = k.view(B, S, self.nkv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.nh * self.hd))


class MLA(nn.Module):
    """Causal Multi-head Latent Attention (DeepSeek-V2 §2.1, used unchanged by DeepSeek-V3 §2.1.1), training form.

    x: [B, S, d] -> [B, S, d]. With H heads, n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim:
      query   wq(x), or with a query latent (q_lora_rank > 0) wq_b(q_norm(wq_a(x)))  -> per head [q_nope n | q_pe r]
      latent  wkv_a(x) -> [c_kv (kv_lora_rank) | k_pe (r)]: k_pe is ONE rotary key shared by all heads
      key/value  wkv_b(kv_norm(c_kv)) -> per head [k_nope n | value v]
      head h: q = [q_nope_h | rope(q_pe_h)], k = [k_nope_h | rope(k_pe)]; softmax scale 1/sqrt(n + r)
      output  wo: H v -> d.
    Why the split (V2 §2.1.3): RoPE depends on the position, so a rotated key could not be folded into the
    latent's up-projection at inference; a small decoupled rotary key keeps the KV cache at kv_lora_rank + r
    numbers per token. Training runs the decompressed form (full keys and values per head); absorbing wkv_b
    into the query and output is an inference-time rewrite of the same function.

    Weights map 1:1 onto HF transformers' DeepseekV3Attention: q_proj -> wq, q_a_proj -> wq_a, q_a_layernorm ->
    q_norm, q_b_proj -> wq_b, kv_a_proj_with_mqa -> wkv_a, kv_a_layernorm -> kv_norm, kv_b_proj -> wkv_b, o_proj
    -> wo (HF builds its latent norms with eps 1e-6; DeepSeek's rms_norm_eps is 1e-6 too). RoPE layout: we rotate
    the pairs (i, i + r/2) of the rope part (half-split, as `apply_rope`), DeepSeek's checkpoints the pairs (2i,
    2i+1) (HF `rope_interleave=True`): an importer permutes the rope rows of wq / wq_b (per head) and the last r
    rows of wkv_a by [0, 2, 4, .., 1, 3, 5, ..]. Query and key move alike, so the scores are unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, nh = cfg.d_model, cfg.n_heads
        self.nh, self.nope, self.rope, self.vd = nh, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_dim
        self.kv_rank, self.q_rank = cfg.kv_rank, cfg.q_lora_rank
        q_out = nh * (self.nope + self.rope)
        if self.q_rank:  # V2 §2.1.2: low-rank queries save activation memory in training, not KV cache
            self.wq_a = nn.Linear(d, self.q_rank, bias=False)
            self.q_norm = RMSNorm(self.q_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(d, q_out, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, nh * (self.nope + self.vd), bias=False)
        self.wo = nn.Linear(nh * self.vd, d, bias=False)
        self.scale = (self.nope + self.rope) ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d]; cos, sin: [>= S, r/2] tables of the rope width -> [B, S, d]."""
        B, S, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_rank else self.wq(x)
        q_nope, q_pe = q.view(B, S, self.nh, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], -1)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)  # [B, S, kv_rank], [B, S, r]
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, S, self.nh, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)  # [B, H, S, n], [B, H, S, v]
        q_pe = apply_rope(q_pe, cos, sin)  # [B, H, S, r]
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin)  # [B, 1, S, r]: one rotary key for every head
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.nh, S, self.rope)], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, H, S, v]
        return self.wo(y.transpose(1, 2).reshape(B, S, self.nh * self.vd))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)). `moe`: an MoE FFN, else dense SwiGLU."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth j (DeepSeek-V3 §2.2, eq. 21-23).

    h'_t = proj([embed_norm(Emb(t_{t+j})) ; hidden_norm(h^{j-1}_t)]), h^j = block(h'), and the shared output head
    reads out_norm(h^j) to predict token t+j+1. The block is a main-model block whose FFN is the one the main
    model's last layer has (`ModelConfig.mtp_is_moe`): an MoE block, as in DeepSeek-V3, unless that layer is
    dense. The concatenation puts the embedding first: the paper writes [h ; Emb], DeepSeek-V3's released
    weights (eh_proj, with enorm / hnorm) take [Emb ; h], and we follow the weights so they map 1:1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.embed_norm = RMSNorm(d, cfg.norm_eps)
        self.hidden_norm = RMSNorm(d, cfg.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, moe=cfg.mtp_is_moe)
        self.out_norm = RMSNorm(d, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, S', d] the previous depth's hidden states; emb: [B, S', d] the embeddings of the tokens j
        ahead -> (h^j [B, S', d], the next depth's input; out_norm(h^j) [B, S', d], what the head reads).
        The output norm runs here, not in the caller: under FSDP this module's weights are gathered only
        inside its own forward."""
        x = self.proj(torch.cat([self.embed_norm(emb), self.hidden_norm(h)], dim=-1))
        h = self.block(x, cos, sin)
        return h, self.out_norm(h)


class Transformer(nn.Module):
    """tokens [B, S] int -> logits [B, S, vocab]. MoE losses are read after the forward (`moe_losses`), and
    so are the MTP cross-entropies (`mtp_ce`, when the forward is given the targets)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Multi-token prediction: depth j+1 is mtp[j]; they share embed and lm_head with the model.
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.mtp_ce: list[torch.Tensor] = []
        # Tables for the rotated features only: head_dim (GQA), qk_rope_head_dim (MLA). Computed unless the
        # model is built on `meta` (`meta_model`; `init_buffers` fills them after `to_empty`): ops on meta
        # tensors run torch's Python references, and the first of those imports torch._dynamo (1.6 s of CPU).
        shape = (cfg.max_seq_len, cfg.qk_rope_dim // 2)
        self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        if not self.rope_cos.is_meta:
            cos, sin = rope_tables(cfg.qk_rope_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, S] -> next-token logits [B, S, vocab].

        targets: [B, S], the next tokens (tokens shifted by one). Given them, the MTP modules run too and
        `mtp_ce` holds one cross-entropy per depth; without (evaluation, inference) `mtp_ce` is empty and the
        MTP modules cost nothing.
        """
        emb = self.embed(tokens)
        x = emb
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(self.norm(x))
        self.mtp_ce = self._mtp(x, emb, targets) if targets is not None and len(self.mtp) else []
        if not self.mtp_ce:  # MTP blocks that did not run hold no balance losses (none left from a training step)
            for m in self.mtp:
                if isinstance(m.block.ffn, MoE):
                    m.block.ffn.aux_loss = None
        return logits

    def _mtp(self, h: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """h: [B, S, d] the last block's output, before the final norm (DeepSeek-V3's h^0); emb: [B, S, d] the
        input embeddings; targets: [B, S] -> [CE_1, .., CE_D], each a mean over its positions.

        Depth j works on positions t = 0 .. S-1-j: h^{j-1}_t with the embedding of input token t+j, predicting
        token t+j+1 = targets[:, t+j]. The last j positions have no target inside the sequence, so every depth
        is one position shorter than the one before; causality holds within each depth as in the main model.
        """
        S = h.shape[1]
        if S <= len(self.mtp):
            raise ValueError(f"MTP: a sequence of {S} tokens leaves no position with a target at depth "
                             f"{len(self.mtp)}; allowed: sequences longer than model.mtp_depth")
        losses = []
        for j, module in enumerate(self.mtp, start=1):
            h, normed = module(h[:, : S - j], emb[:, j:], self.rope_cos, self.rope_sin)
            logits = self.lm_head(normed)
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, j:].reshape(-1)))
        return losses

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(index, MoE) of every MoE FFN: main layers 0 .. n_layers-1, then MTP depth j's block as n_layers+j-1."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return [(i, b.ffn) for i, b in enumerate(blocks) if isinstance(b.ffn, MoE)]

    def moe_losses(self) -> dict[str, torch.Tensor]:
        """Balance (Switch and sequence-wise) and z-loss of the last forward, summed over MoE layers (zero for
        a dense model)."""
        zero = self.embed.weight.new_zeros(())
        layers = [m for _, m in self.moe_layers() if m.aux_loss is not None]
        return {"aux_loss": sum((m.aux_loss for m in layers), zero),
                "z_loss": sum((m.z_loss for m in layers), zero),
                "seq_aux_loss": sum((m.seq_aux_loss for m in layers), zero)}

    def set_kernel_backend(self, backend: str | None) -> None:
        for _, m in self.moe_layers():
            m.kernel_backend = backend

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, init_std) everywhere; residual outputs (wo, down) scaled by 1/sqrt(2 n_layers) so the
        residual stream's variance does not grow with depth (GPT-2); norms at 1, biases at 0; buffers reset.

        The draws follow `init.normal_`: keyed by (seed, parameter name, position), so the model may be
        sharded (FSDP2, EP) before this runs, each rank filling only its own shards with the values a single
        process draws for them. `seed` None: a seed from torch's global generator."""
        from moelab.trainers.init import local_tensor, normal_

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                local_tensor(p).fill_(1.0)
            elif leaf == "bias":
                local_tensor(p).zero_()
            elif "wo." in name or "down." in name or leaf == "w_down":
                normal_(p, name, seed, out_std)
            else:
                normal_(p, name, seed, std)
        self.init_buffers()

    def to_empty(self, *, device, recurse: bool = True) -> "Transformer":
        """nn.Module.to_empty, keeping a tied output head tied: from `meta` it makes a new Parameter per
        name, which would untie lm_head from the embedding. A plain tensor is allocated with `empty_strided`:
        torch's `empty_like` of a meta tensor runs its Python reference, which imports sympy (0.5 s of CPU
        in every process); a DTensor (a shard) keeps `empty_like`, which allocates only the local part."""
        from moelab.trainers.init import is_dtensor

        def empty(t: torch.Tensor) -> torch.Tensor:
            if is_dtensor(t):
                return torch.empty_like(t, device=device)
            return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)

        self._apply(empty, recurse=recurse)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rotary tables recomputed, router biases and load counters at zero, on the device the buffers are
        on: what a model built on `meta` and materialised with `to_empty` needs before it runs."""
        cos, sin = rope_tables(self.cfg.qk_rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for _, m in self.moe_layers():
            m.router.expert_bias.zero_()
            m.load_accum.zero_()


class _NoMetaInit(torch.overrides.TorchFunctionMode):
    """Skips torch's default initialisers (`torch.nn.init.*_`, `Tensor.normal_` / `uniform_`) on `meta`
    tensors, which hold nothing to initialise: `init_weights` draws every value later. Without it, each
    `nn.Linear` / `nn.Embedding` built on `meta` runs its initialiser through torch's Python reference
    implementation, whose first call imports torch._dynamo (1.6 s of CPU, in every trial process)."""

    _TENSOR_INITS = {torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if isinstance(first, torch.Tensor) and first.is_meta and (
                func in self._TENSOR_INITS or (getattr(func, "__module__", "") == "torch.nn.init"
                                              and func.__name__.endswith("_"))):
            return first
        return func(*args, **kwargs)


def meta_model(cfg: ModelConfig) -> Transformer:
    """A Transformer on the `meta` device: shapes, no storage and no draws. Shard it (`parallel.parallelize`),
    then `to_empty(device=...)` and `init_weights(seed)` (or load weights and `init_buffers()`)."""
    cfg.validate()
    with _NoMetaInit(), torch.device("meta"):
        return Transformer(cfg)


def build_model(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialised model on `device`. Its weights depend only on `cfg` and `seed`, not on the
    device (the draws happen on the CPU, see `init.py`). Built on `meta`, materialised once on `device`."""
    model = meta_model(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
