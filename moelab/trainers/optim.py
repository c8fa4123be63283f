"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moelab.trainers.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: decayed matrices, undecayed norms/biases/embeddings, routed experts.

    Routed experts train at `expert_lr_fraction * lr` (the source documents use 0.3 when upcycling).
    Each group carries `lr_scale`, which the schedule multiplies into the current LR.
    """
    decay, no_decay, experts = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("w_gate_up", "w_down"):
            experts.append(p)
        elif p.dim() < 2 or "embed" in name or "norm" in name or leaf == "bias":
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": experts, "weight_decay": cfg.weight_decay, "lr_scale": cfg.expert_lr_fraction,
         "name": "experts"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier on cfg.lr at optimiser step `step` (0-based) of `total`.

    - cosine: linear warmup, cosine down to min_lr_ratio.
    - wsd (warmup-stable-decay): warmup, constant, then linear decay to min_lr_ratio over the last
      `decay_fraction` of the steps.
    - deepseek (DeepSeek-V3 report): warmup, constant for the first 10/14.8 of the remaining steps (10T of
      14.8T tokens), cosine decay to min_lr_ratio, then constant at min_lr_ratio for the last
      `decay_fraction` of the steps (the report's short low-LR stages at the end).
    - constant: warmup then flat.
    """
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / w
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        p = (step - w) / max(1, total - w - 1)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if cfg.schedule == "wsd":
        decay_start = total - int(round(cfg.decay_fraction * total))
        if step < decay_start:
            return 1.0
        p = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1.0 - lo) * min(1.0, p)
    if cfg.schedule == "deepseek":
        # Token shares of the V3 run (14.8T): stable until 10/14.8, cosine until 14.3/14.8, then flat.
        stable_end = w + int((total - w) * 10.0 / 14.8)
        cos_end = max(stable_end + 1, total - int(round(cfg.decay_fraction * total)))
        if step < stable_end:
            return 1.0
        if step < cos_end:
            p = (step - stable_end) / max(1, cos_end - stable_end)
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
        return lo
    raise ValueError(f"optim.schedule: got {cfg.schedule!r}; allowed: cosine, wsd, deepseek, constant")


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, cfg: OptimConfig) -> float:
    """Apply the schedule to every group; returns the base LR at this step."""
    lr = cfg.lr * lr_factor(step, total, cfg)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
