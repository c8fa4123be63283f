"""The MoE compute path: one entry point, `moe_experts`, with a choosable backend.

Backends: "reference" (pure torch, `reference.py`, the specification). The environment variable
MOELAB_KERNELS overrides the default choice; asking for a backend that cannot run raises an error rather
than silently falling back.
"""

from __future__ import annotations

import os

import torch

from moelab.kernels import reference

BACKENDS = ("reference",)


def resolve_backend(backend: str | None, device: torch.device | None = None) -> str:
    """The backend to use: explicit argument, else $MOELAB_KERNELS, else the default for `device`."""
    name = backend or os.environ.get("MOELAB_KERNELS") or "reference"
    if name not in BACKENDS:
        raise ValueError(f"moe_experts backend: got {name!r}; allowed: {', '.join(BACKENDS)} "
                         f"(set by the backend= argument or $MOELAB_KERNELS)")
    return name


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_idx: torch.Tensor,
                topk_weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Routed SwiGLU experts. x: [T, d], w_gate_up: [E, 2 d_e, d], w_down: [E, d, d_e],
    topk_idx: [T, k] (-1 = dropped), topk_weight: [T, k] -> [T, d]. See `reference.moe_experts`."""
    resolve_backend(backend, x.device)
    return reference.moe_experts(x, w_gate_up, w_down, topk_idx, topk_weight)


__all__ = ["moe_experts", "resolve_backend", "BACKENDS"]
