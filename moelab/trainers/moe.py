"""The MoE FFN: router, routed experts, shared experts, balancing.

Shape legend: B batch, S sequence, T = B*S tokens, d model width, E routed experts, k = top_k slots per
token, d_e expert width.

Balancing mechanisms (all selectable in `MoEConfig`):
- Switch balance loss `N * sum_i f_i P_i` (Fedus et al.; f = fraction of slots sent to i, P = mean prob),
- router z-loss `mean(logsumexp(logits)^2)` (Zoph et al., ST-MoE),
- DeepSeek-V3 aux-loss-free bias: top-k chosen on `score + bias`, gates from the unbiased score; the bias
  moves by `gamma * sign(mean_load - load_i)` after each optimiser step (`update_bias`),
- capacity factor: at most ceil(cf * T * k / E) slots per expert, later slots (in token order) dropped.
The losses are stored on the module after the forward (`aux_loss`, `z_loss`, unscaled); the training loop
adds `coef * loss` to the objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.kernels import moe_experts
from moelab.trainers.config import ModelConfig


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate x) * up x). gate_up: [2*d_ff, d] (gate rows first), down: [d, d_ff]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split(self.d_ff, dim=-1)
        return self.down(F.silu(g) * u)


class Router(nn.Module):
    """Scores every expert and picks top-k. weight: [E, d]; expert_bias: [E] (aux-loss-free, not trained)."""

    def __init__(self, d_model: int, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.score_func, self.renormalize = m.score_func, m.renormalize
        self.force_balanced = m.force_balanced
        self.weight = nn.Parameter(torch.empty(m.n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(m.n_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor):
        """x: [T, d] -> logits [T, E], scores [T, E], topk_idx [T, k], topk_weight [T, k]."""
        logits = F.linear(x_TD, self.weight).float()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        if self.force_balanced:
            T = x_TD.shape[0]
            slots = torch.arange(T * self.top_k, device=x_TD.device).view(T, self.top_k)
            topk_idx = slots % self.n_experts
        else:
            # The bias only steers selection (DeepSeek-V3); gate values come from the unbiased scores.
            topk_idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        topk_weight = scores.gather(-1, topk_idx)
        if self.renormalize:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        return logits, scores, topk_idx, topk_weight


def capacity_mask(topk_idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which slots fit: for each expert keep its first `capacity` slots in (token, k) order.

    topk_idx: [T, k] -> keep: [T, k] bool.
    """
    flat = topk_idx.reshape(-1)
    onehot = F.one_hot(flat, n_experts)  # [S, E]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of each slot within its expert
    return (position < capacity).view_as(topk_idx)


def domain_expert_counts(topk_idx: torch.Tensor, domains: torch.Tensor, n_domains: int,
                         n_experts: int) -> torch.Tensor:
    """Routed slots per (domain, expert): how specialised the experts are on a mixture of domains.

    topk_idx: [T, k] expert per slot, -1 = dropped (not counted, like `load`); domains: [T] the domain of
    each token -> counts: [n_domains, n_experts] int64, summing over domains to the layer's `load`.
    One scatter-add over flat (domain, expert) ids into a buffer of fixed size; dropped slots go to an extra
    bin that is cut off. Neither a boolean mask nor bincount (which sizes its output from the largest id):
    both would wait for the device to report a size.
    """
    T, k = topk_idx.shape
    n = n_domains * n_experts
    cell = domains.view(T, 1) * n_experts + topk_idx
    cell = torch.where(topk_idx >= 0, cell, n).reshape(-1)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=topk_idx.device)
    counts.scatter_add_(0, cell, torch.ones_like(cell))
    return counts[:n].view(n_domains, n_experts)


class MoE(nn.Module):
    """Routed experts (+ shared experts). Input and output x: [B, S, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        d, de = cfg.d_model, cfg.d_expert
        self.n_experts, self.top_k, self.d_expert = m.n_experts, m.top_k, de
        self.capacity_factor = m.capacity_factor
        self.bias_update_rate = m.bias_update_rate
        self.router = Router(d, cfg)
        self.w_gate_up = nn.Parameter(torch.empty(m.n_experts, 2 * de, d))  # [E, 2 d_e, d]
        self.w_down = nn.Parameter(torch.empty(m.n_experts, d, de))  # [E, d, d_e]
        self.shared = SwiGLU(d, cfg.d_shared_total) if m.n_shared else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if m.shared_gate else None
        self.kernel_backend: str | None = None
        # Many ranks: `trainers.parallel.apply_ep` sets this to a MoEParallel (expert dispatch over the EP
        # group, capacity and balance statistics over the global batch). None: everything stays local.
        self.parallel = None
        # Load since the last bias update, summed over forwards (micro-batches); a buffer so it follows .to().
        self.register_buffer("load_accum", torch.zeros(m.n_experts), persistent=False)
        self.aux_loss = self.z_loss = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        x_TD = x.reshape(-1, d)
        T, E, k = x_TD.shape[0], self.n_experts, self.top_k
        logits, scores, topk_idx, topk_weight = self.router(x_TD)

        routed_idx = topk_idx  # what the router asked for, before capacity drops
        if self.capacity_factor > 0:
            if self.parallel is not None:
                kept = self.parallel.capacity_mask(topk_idx, E, self.capacity_factor)
            else:
                kept = capacity_mask(topk_idx, E, math.ceil(self.capacity_factor * T * k / E))
            topk_idx = torch.where(kept, topk_idx, -1)

        experts = moe_experts if self.parallel is None else self.parallel.experts
        out = experts(x_TD, self.w_gate_up, self.w_down, topk_idx, topk_weight.to(x.dtype),
                      backend=self.kernel_backend)
        if self.shared is not None:
            shared = self.shared(x_TD)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x_TD)) * shared
            out = out + shared

        # Balance loss on the routing decision before capacity drops: dropped slots were still chosen.
        chosen = torch.zeros(T, E, device=x.device).scatter_(1, routed_idx, 1.0)
        f = chosen.mean(0) / k  # fraction of slots per expert, sums to 1
        probs = scores if self.router.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        P = probs.mean(0)
        if self.parallel is not None:  # f and P of the global batch, as on one device
            f, P = self.parallel.global_mean(torch.stack([f, P]))
        self.aux_loss = E * (f * P).sum()
        self.z_loss = torch.logsumexp(logits, -1).pow(2).mean()

        with torch.no_grad():
            load = torch.bincount(topk_idx[topk_idx >= 0], minlength=E).float()
            self.load_accum += load
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
            self.stats = {
                "load": load,  # computed slots per expert [E]
                "topk_idx": topk_idx,  # [T, k] computed expert per slot, -1 = dropped (per-domain counts)
                "dropped": (topk_idx < 0).sum().float(),
                "slots": torch.tensor(float(T * k), device=x.device),
                "router_entropy": ent,
            }
        return out.view(B, S, d)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """DeepSeek-V3 aux-loss-free update: b_i += gamma * sign(mean_load - load_i); resets the counter.

        load: [E] slots per expert since the last update (default: this module's own counter; a
        distributed loop passes the all-reduced one).
        """
        load = self.load_accum if load is None else load
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.router.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()
