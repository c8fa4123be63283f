"""Baseline for benchmarks: the per-expert masked loop the source documents (seed 004) describe.

For each of the k choices and each expert, a boolean mask selects that expert's tokens; autograd does the
backward. Written here only as the yardstick `moe_experts` is measured against.
"""

import torch
import torch.nn.functional as F


def seed_loop_moe(x, w_gate_up, w_down, topk_idx, topk_weight):
    """Same contract as moelab.kernels.moe_experts. x: [T, d] -> [T, d]."""
    E, de = w_gate_up.shape[0], w_down.shape[2]
    out = torch.zeros_like(x)
    for i in range(topk_idx.shape[1]):
        chosen = topk_idx[:, i]
        for e in range(E):
            mask = chosen == e
            if not mask.any():
                continue
            h = x[mask] @ w_gate_up[e].t()
            y = (F.silu(h[:, :de]) * h[:, de:]) @ w_down[e].t()
            out[mask] += topk_weight[mask, i, None] * y
    return out
