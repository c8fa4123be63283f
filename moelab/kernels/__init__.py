"""The MoE compute path: one entry point, `moe_experts`, with a choosable backend.

Backends: "reference" (pure torch, `reference.py`, the specification) and "triton" (`triton_moe.py`: fused
grouped GEMMs with hand-written backward kernels). Default: "triton" when x is on CUDA and triton is
installed, "reference" elsewhere. The environment variable MOELAB_KERNELS=reference|triton overrides the
default; the `backend=` argument overrides both. Asking for a backend that cannot run raises an error rather
than silently falling back (e.g. "triton" for a CPU tensor without TRITON_INTERPRET=1, or without triton).
Under torch.compile either backend runs as the custom op `moelab::moe_experts_fwd` (`custom_op.py`), so a
compiled block has no graph break at the experts.

The Triton module is imported lazily, on first use: Triton decides between compiling and interpreting when
kernels are defined, so TRITON_INTERPRET=1 must be in the environment before that first use.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moelab.kernels import custom_op, reference

BACKENDS = ("reference", "triton")


def triton_available() -> bool:
    """Whether the triton package is installed (not imported: that takes a second)."""
    return importlib.util.find_spec("triton") is not None


def _default_backend(device: torch.device | None) -> str:
    if device is not None and torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return "reference"


def resolve_backend(backend: str | None, device: torch.device | None = None) -> str:
    """The backend to use: explicit argument, else $MOELAB_KERNELS, else the default for `device`.

    Raises ValueError for an unknown name and RuntimeError when "triton" cannot run on `device`."""
    name = backend or os.environ.get("MOELAB_KERNELS") or _default_backend(device)
    if name not in BACKENDS:
        raise ValueError(f"moe_experts backend: got {name!r}; allowed: {', '.join(BACKENDS)} "
                         f"(set by the backend= argument or $MOELAB_KERNELS)")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("moe_experts backend 'triton' requested (backend= or $MOELAB_KERNELS) but the "
                               "triton package is not installed; install it or use backend='reference'")
        if device is not None:
            from moelab.kernels import triton_moe

            triton_moe.check_runnable(torch.device(device))
    return name


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_idx: torch.Tensor,
                topk_weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Routed SwiGLU experts. x: [T, d], w_gate_up: [E, 2 d_e, d], w_down: [E, d, d_e],
    topk_idx: [T, k] (-1 = dropped), topk_weight: [T, k] -> [T, d]. See `reference.moe_experts`."""
    name = resolve_backend(backend, x.device)
    if torch.compiler.is_compiling():
        # Inside torch.compile: the custom op (`custom_op.py`) keeps the graph whole around the kernels.
        combine = os.environ.get("MOELAB_TRITON_COMBINE", "gather")
        if combine not in ("gather", "atomic"):  # = triton_moe.COMBINES, not imported here (see above)
            raise ValueError(f"MOELAB_TRITON_COMBINE: got {combine!r}; allowed: gather, atomic")
        return custom_op.moe_experts(x, w_gate_up, w_down, topk_idx, topk_weight, name, combine)
    if name == "triton":
        from moelab.kernels import triton_moe

        return triton_moe.moe_experts(x, w_gate_up, w_down, topk_idx, topk_weight)
    return reference.moe_experts(x, w_gate_up, w_down, topk_idx, topk_weight)


__all__ = ["moe_experts", "resolve_backend", "BACKENDS", "triton_available"]
