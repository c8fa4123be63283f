"""The MoE FFN: router, routed experts, shared experts, balancing.

Shape legend: B batch, S sequence, T = B*S tokens, d model width, E routed experts, k = top_k slots per
token, d_e expert width.

Balancing mechanisms (all selectable in `MoEConfig`):
- Switch balance loss `N * sum_i f_i P_i` (Fedus et al.; f = fraction of slots sent to i, P = mean prob),
- router z-loss `mean(logsumexp(logits)^2)` (Zoph et al., ST-MoE),
- DeepSeek-V3 aux-loss-free bias: top-k chosen on `score + bias`, gates from the unbiased score; the bias
  moves by `gamma * sign(mean_load - load_i)` after each optimiser step (`update_bias`),
- DeepSeek-V3 sequence-wise balance loss (paper Eq. 17-20): the Switch formula per sequence, averaged over
  the sequences of the batch, so no single sequence may pile onto a few experts,
- capacity factor: at most ceil(cf * T * k / E) slots per expert, later slots (in token order) dropped.
The losses are stored on the module after the forward (`aux_loss`, `z_loss`, `seq_aux_loss`, unscaled); the
training loop adds `coef * loss` to the objective.

DeepSeek-V3 routing options: group-limited top-k (`n_group`, `topk_group`: a token's experts come from at most
topk_group of the n_group contiguous expert groups, DeepSeek-V3's node-limited routing) and a constant
`routed_scaling_factor` on the routed gate weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.kernels import moe_experts
from moelab.trainers.ac import recomputing
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
        self.n_group, self.topk_group = m.n_group, m.topk_group
        self.routed_scaling_factor = m.routed_scaling_factor
        self.force_balanced = m.force_balanced
        self.weight = nn.Parameter(torch.empty(m.n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(m.n_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor):
        """x: [T, d] -> logits [T, E], scores [T, E], topk_idx [T, k], topk_weight [T, k], all but topk_idx fp32.

        The logits are computed in fp32 from fp32 inputs and weights, outside autocast (as HF transformers'
        DeepseekV3TopkRouter): in bf16 near-tied experts swap places in the top-k, and the z-loss squares the
        logits. Under FSDP the router is a unit with fp32 parameters (`parallel.apply_fsdp`)."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        if self.force_balanced:
            T = x_TD.shape[0]
            slots = torch.arange(T * self.top_k, device=x_TD.device).view(T, self.top_k)
            topk_idx = slots % self.n_experts
        else:
            # The bias only steers selection (DeepSeek-V3); gate values come from the unbiased scores.
            choice = scores + self.expert_bias
            if self.n_group > 1:
                choice = self.group_limit(choice)
            topk_idx = torch.topk(choice, self.top_k, dim=-1).indices
        topk_weight = scores.gather(-1, topk_idx)
        if self.renormalize:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            # DeepSeek-V3's released config multiplies the (renormalised, so summing to 1) routed gates by a
            # constant 2.5: it sets the routed experts' weight next to the shared expert's and the residual's.
            # Only the gates change, so the balance statistics (from scores and indices) do not.
            topk_weight = topk_weight * self.routed_scaling_factor
        return logits, scores, topk_idx, topk_weight

    def group_limit(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3 node-limited routing, as in HF's DeepseekV3 router).

        choice: [T, E] selection scores (score + bias) -> [T, E] the same, -inf outside the token's topk_group
        best groups. The E experts form n_group contiguous groups of E/n_group; a group's score is the sum of
        its two best selection scores (DeepSeek-V2's group-limited routing used the max). With the experts of a
        group on one node, each token's slots reach at most topk_group nodes, which bounds the all-to-all
        (DeepSeek-V3 §2.1.2 node-limited routing; there 4 of 8 groups).
        No host sync: a scatter into a fixed-size mask and masked_fill, never boolean indexing.
        """
        T, E = choice_TE.shape
        G = self.n_group
        grouped = choice_TE.view(T, G, E // G)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        best = group_score.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros(T, G, dtype=torch.bool, device=choice_TE.device).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)


def expert_onehot(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """flat: [S] expert ids in [0, E) -> [S, E] int64 one-hot. A scatter into a buffer of fixed size:
    F.one_hot reads the ids' min and max on the host to check their range (on CPU tensors)."""
    return torch.zeros(flat.numel(), n_experts, dtype=torch.int64, device=flat.device).scatter_(
        1, flat.view(-1, 1), 1)


def capacity_mask(topk_idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which slots fit: for each expert keep its first `capacity` slots in (token, k) order.

    topk_idx: [T, k] -> keep: [T, k] bool.
    """
    flat = topk_idx.reshape(-1)
    onehot = expert_onehot(flat, n_experts)  # [S, E]
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
        self.aux_loss = self.z_loss = self.seq_aux_loss = None
        self.stats: dict[str, torch.Tensor | int] = {}

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
        aux_loss = E * (f * P).sum()
        z_loss = torch.logsumexp(logits, -1).pow(2).mean()
        seq_aux_loss = self.sequence_balance_loss(chosen.view(B, S, E), probs.view(B, S, E))
        if recomputing():
            # Activation checkpointing reruns this forward in the backward: the same losses (already in the
            # objective), the same routing (already counted): keep the first forward's, count nothing twice.
            # The losses above still ran: the recomputation must save the tensors the forward saved, in order.
            return out.view(B, S, d)
        self.aux_loss, self.z_loss, self.seq_aux_loss = aux_loss, z_loss, seq_aux_loss

        with torch.no_grad():
            # Slots per expert into a fixed-size buffer (dropped slots -> bin E, cut off): no boolean mask or
            # bincount, whose output sizes depend on the data (a host sync, and a graph break under compile).
            flat = topk_idx.reshape(-1)
            bins = torch.where(flat >= 0, flat, E)
            load = torch.zeros(E + 1, dtype=torch.int64, device=x.device).scatter_add_(
                0, bins, torch.ones_like(bins))[:E].float()
            self.load_accum += load
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
            self.stats = {
                "load": load,  # computed slots per expert [E]
                "topk_idx": topk_idx,  # [T, k] computed expert per slot, -1 = dropped (per-domain counts)
                "dropped": (topk_idx < 0).sum().float(),
                "slots": T * k,  # an int: known on the host (a tensor built from it would be a blocking copy)
                "router_entropy": ent,
            }
        return out.view(B, S, d)

    def sequence_balance_loss(self, chosen_BSE: torch.Tensor, probs_BSE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss (paper Eq. 17-20), unscaled (the loop multiplies by alpha).

        chosen: [B, S, E] 1 where the token's top-k chose the expert (before capacity drops, like `aux_loss`);
        probs: [B, S, E] normalised scores s'_{i,t} = s_{i,t} / sum_j s_{j,t} -> scalar
        mean_b sum_i f_{b,i} P_{b,i}, with f_{b,i} = E / (k S) * (tokens of sequence b that chose i) and
        P_{b,i} = mean_t s'_{i,t} over sequence b. For B = 1 it equals `aux_loss` (E sum_i f_i P_i with f a
        fraction of slots), and its minimum is 1 (balanced within every sequence).

        Expert parallelism: each rank holds whole sequences (`Parallel.local_rows` splits by rows), so this
        needs no communication: the mean over local sequences, averaged over ranks by the data-parallel
        gradient mean, is the mean over the global batch's sequences (every rank holds as many).
        """
        B, S, E = chosen_BSE.shape
        f = chosen_BSE.sum(1) * (E / (self.top_k * S))  # [B, E]
        P = probs_BSE.mean(1)  # [B, E]
        return (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """DeepSeek-V3 aux-loss-free update: b_i += gamma * sign(mean_load - load_i); resets the counter.

        load: [E] slots per expert since the last update (default: this module's own counter; a
        distributed loop passes the all-reduced one).
        """
        load = self.load_accum if load is None else load
        # No `load.sum() > 0` test (a host read per layer and step): an all-zero load moves no bias anyway,
        # sign(0 - 0) being 0.
        if self.bias_update_rate > 0:
            self.router.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()
