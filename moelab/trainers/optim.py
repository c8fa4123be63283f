"""AdamW (the trainer's own, see `AdamW`), its parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn as nn

from moelab.trainers.config import OptimConfig


def _eager(method):
    """torch's undecorated `Optimizer` method while torch._dynamo is not loaded (see `AdamW`)."""
    if "torch._dynamo" in sys.modules:
        return method
    return getattr(method, "__wrapped__", method)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, decoupled weight decay; Kingma & Ba's bias-corrected moments), the update
    `torch.optim.AdamW` makes without amsgrad / capturable / fused, in the same order of operations, with the
    same state (`step` as a float32 CPU tensor, `exp_avg`, `exp_avg_sq`), so its checkpoints load either way.

    Why not torch's: every `torch.optim` optimizer imports torch._dynamo on its first step (the step's
    grad-mode wrapper) and on its first `add_param_group`, `zero_grad` and `state_dict` (their
    `torch._disable_dynamo` wrappers): 1.6 s of CPU on the 2-core machines, in every trial process, before a
    1-worker sweep trial of a few seconds can train (bench/RESULTS.md, "Sweep controller"). Those wrappers only
    keep torch.compile from tracing into the optimizer, so while torch._dynamo is not loaded (nothing can be
    compiling) this class calls the undecorated methods (`_eager`), and the decorated ones once it is.

    Per device, as torch's default: a loop over the parameters on the CPU (torch's single-tensor path), and
    `torch._foreach_*` over the parameters of one device, dtype and DTensor mesh elsewhere (torch's foreach
    path; one mesh per call, so EP's expert shards and FSDP's shards never meet in one foreach op).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not 0.0 <= lr:
            raise ValueError(f"optim.lr: got {lr}; allowed: >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"optim.beta1/beta2: got {betas}; allowed: each in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _eager(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _eager(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _eager(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _eager(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device="cpu")  # host counter: no device sync
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            b1, b2 = g["betas"]
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if p.device.type == "cpu":
                    self._update_one(p, self._state(p), lr, wd, eps, b1, b2)
                else:
                    buckets.setdefault((p.device, p.dtype, id(getattr(p, "device_mesh", None))), []).append(p)
            for ps in buckets.values():
                self._update_foreach(ps, lr, wd, eps, b1, b2)
        return loss

    @staticmethod
    def _update_one(p, st, lr, wd, eps, b1, b2) -> None:
        st["step"] += 1
        t = st["step"].item()  # a CPU tensor: no device sync
        grad, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
        p.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        denom = (v.sqrt() / bc2 ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)

    def _update_foreach(self, ps, lr, wd, eps, b1, b2) -> None:
        states = [self._state(p) for p in ps]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        ts = [s.item() for s in steps]  # CPU tensors: no device sync
        grads = [p.grad for p in ps]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [(1 - b2 ** t) ** 0.5 for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1 ** t) for t in ts])


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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


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
