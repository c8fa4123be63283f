"""A LLaMA/Qwen-style decoder: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU FFN or MoE block.

Read top to bottom: norms and rotary embeddings, attention, a block, the model, initialisation.
`build_model(cfg)` returns a plain `Transformer`; parallelism is applied to it from outside.
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


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """tokens [B, S] int -> logits [B, S, vocab]. MoE losses are read after the forward (`moe_losses`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.hd, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x))

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, l.ffn) for i, l in enumerate(self.layers) if isinstance(l.ffn, MoE)]

    def moe_losses(self) -> dict[str, torch.Tensor]:
        """Balance and z-loss of the last forward, summed over MoE layers (zero for a dense model)."""
        zero = self.embed.weight.new_zeros(())
        layers = [m for _, m in self.moe_layers() if m.aux_loss is not None]
        return {"aux_loss": sum((m.aux_loss for m in layers), zero),
                "z_loss": sum((m.z_loss for m in layers), zero)}

    def set_kernel_backend(self, backend: str | None) -> None:
        for _, m in self.moe_layers():
            m.kernel_backend = backend

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, init_std) everywhere; residual outputs (wo, down) scaled by 1/sqrt(2 n_layers) so the
        residual stream's variance does not grow with depth (GPT-2); norms at 1, biases at 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)

        def normal_(p: torch.Tensor, s: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif "wo." in name or "down." in name or leaf == "w_down":
                normal_(p, out_std)
            else:
                normal_(p, std)
        for _, m in self.moe_layers():
            m.router.expert_bias.zero_()


def build_model(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialised model on `device` (weights depend only on `cfg` and `seed`)."""
    cfg.validate()
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(device)
