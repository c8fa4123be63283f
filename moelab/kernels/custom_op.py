"""`moe_experts` as torch.library custom ops, so `torch.compile` keeps a block in one graph.

Why: both backends need the host at some point that Dynamo cannot trace through (the reference reads the
per-expert counts with `.tolist()`; the Triton launches take Python ints and autotune), so a compiled block
would break its graph at the experts. As custom ops they are opaque nodes with a fake (meta) implementation
that gives every output's shape from the input shapes alone, and an autograd formula that calls the backward
op; Dynamo and AOTAutograd then trace around them.

Two ops, forward and backward, in the `moelab` namespace:

    moelab::moe_experts_fwd(x [T, d], w_gate_up [E, 2 d_e, d], w_down [E, d, d_e], topk_idx [T, k],
                            topk_weight [T, k], backend, combine, save) -> (out [T, d], h, a, y)
    moelab::moe_experts_bwd(dout [T, d], x, w_gate_up, w_down, topk_idx, topk_weight, h, a, y, backend,
                            combine, need_x, need_w_gate_up, need_w_down, need_topk_weight)
                            -> (dx, dw_gate_up, dw_down, dtopk_weight)

h, a, y are the residuals the backward needs, with shapes fixed by the inputs' (S = T*k slots), empty [0]
when `save` is false:
    reference: h [S, 2 d_e], a [S, d_e], y [S+1, d]: the kept slots in expert order, then zero rows (the
               number of kept slots depends on the data, so the buffers are sized for all S slots);
    triton:    h [S, 2 d_e], a [S, d_e] slot-indexed, as the kernels write them (rows of dropped slots are
               never written, nor read); y [0].
The routing (sort by expert) is recomputed in the backward from topk_idx: cheap next to the GEMMs, and it
keeps data-dependent shapes out of the graph. A gradient not asked for comes back as an empty [0] tensor.

Both ops call the same `forward` / `backward` functions as the eager autograd Functions of `reference.py`
and `triton_moe.py`, so compiled and eager runs compute the same numbers. `moelab.kernels.moe_experts`
takes this path only while Dynamo traces (`torch.compiler.is_compiling()`); eager calls keep the autograd
Functions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from moelab.kernels import reference

_EMPTY = (0,)


def _residual_shapes(backend: str, S: int, d: int, de: int, save: bool) -> tuple[tuple[int, ...], ...]:
    """Shapes of (h, a, y) for `backend` (see the module docstring)."""
    if not save:
        return _EMPTY, _EMPTY, _EMPTY
    y = (S + 1, d) if backend == "reference" else _EMPTY
    return (S, 2 * de), (S, de), y


def _device(x: Tensor):
    # Triton launches on the current CUDA device: make it x's.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("moelab::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                    backend: str, combine: str, save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out [T, d] and the residuals (h, a, y) for the backward; shapes in the module docstring."""
    T, d = x.shape
    S, de = topk_idx.numel(), w_down.shape[2]
    hs, as_, ys = _residual_shapes(backend, S, d, de, save)
    if S == 0:  # empty batch: nothing to launch
        return x.new_zeros(T, d), x.new_zeros(hs), x.new_zeros(as_), x.new_zeros(ys)
    if backend == "triton":
        from moelab.kernels import triton_moe as tm

        tm.check_runnable(x.device)
        tm.check_shapes(x, w_gate_up, w_down, topk_idx, topk_weight)
        tm.check_dtypes(x, w_gate_up, w_down)
        with _device(x):
            out, h, a, _, _ = tm.forward(x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(), topk_idx,
                                         topk_weight, combine, save)
        if not save:  # without save `forward` returns h = a (one buffer); outputs must not alias
            return out, x.new_zeros(hs), x.new_zeros(as_), x.new_zeros(ys)
        return out, h, a, x.new_zeros(ys)
    out, _, (h, a, y) = reference.forward(x, w_gate_up, w_down, topk_idx, topk_weight, n_rows=S)
    if not save:
        return out, x.new_zeros(hs), x.new_zeros(as_), x.new_zeros(ys)
    return out, h, a, y


@moe_experts_fwd.register_fake
def _fwd_fake(x, w_gate_up, w_down, topk_idx, topk_weight, backend, combine, save):
    T, d = x.shape
    hs, as_, ys = _residual_shapes(backend, topk_idx.numel(), d, w_down.shape[2], save)
    return x.new_empty(T, d), x.new_empty(hs), x.new_empty(as_), x.new_empty(ys)


@torch.library.custom_op("moelab::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(dout: Tensor, x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_idx: Tensor,
                    topk_weight: Tensor, h: Tensor, a: Tensor, y: Tensor, backend: str, combine: str,
                    need_x: bool, need_w_gate_up: bool, need_w_down: bool,
                    need_topk_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_gate_up, dw_down, dtopk_weight) from the forward's residuals; [0] for a gradient not needed."""
    needs = (need_x, need_w_gate_up, need_w_down, need_topk_weight)
    if topk_idx.numel() == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(w_gate_up), torch.zeros_like(w_down),
                 torch.zeros_like(topk_weight))
    elif backend == "triton":
        from moelab.kernels import triton_moe as tm

        x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
        cfg = tm._config(topk_idx.numel(), w_gate_up.shape[0])
        with _device(x):
            # The same metadata the forward built: a function of topk_idx and the shapes only.
            meta = tm.routing_metadata(topk_idx, w_gate_up.shape[0], cfg.block_m)
            grads = tm.backward(dout, x, w_gate_up, w_down, topk_idx, topk_weight, h, a, meta, cfg, combine,
                                needs)
    else:
        routing = reference._routing(x, topk_idx, topk_weight, w_gate_up.shape[0], x.dtype)
        grads = reference.backward(dout, w_gate_up, w_down, routing, h, a, y, topk_weight.shape, topk_weight.dtype)
    return tuple(g if need else x.new_empty(_EMPTY) for g, need in zip(grads, needs))


@moe_experts_bwd.register_fake
def _bwd_fake(dout, x, w_gate_up, w_down, topk_idx, topk_weight, h, a, y, backend, combine, need_x,
              need_w_gate_up, need_w_down, need_topk_weight):
    needs = (need_x, need_w_gate_up, need_w_down, need_topk_weight)
    like = (x, w_gate_up, w_down, topk_weight)
    return tuple(torch.empty_like(t) if need else x.new_empty(_EMPTY) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, topk_idx, topk_weight, backend, combine, save = inputs
    _, h, a, y = output
    ctx.save_for_backward(x, w_gate_up, w_down, topk_idx, topk_weight, h, a, y)
    ctx.backend, ctx.combine, ctx.save = backend, combine, save


def _backward(ctx, dout, *_residual_grads):
    if not ctx.save:  # `save` is false only when no input needed a gradient at the forward
        raise RuntimeError("moelab::moe_experts_fwd ran with save=False, so it kept nothing to differentiate")
    x, w_gate_up, w_down, topk_idx, topk_weight, h, a, y = ctx.saved_tensors
    nx, n1, n2, _, nw = ctx.needs_input_grad[:5]
    dx, d1, d2, dw = torch.ops.moelab.moe_experts_bwd(dout, x, w_gate_up, w_down, topk_idx, topk_weight, h, a, y,
                                                      ctx.backend, ctx.combine, nx, n1, n2, nw)
    return (dx if nx else None, d1 if n1 else None, d2 if n2 else None, None, dw if nw else None, None, None,
            None)


torch.library.register_autograd("moelab::moe_experts_fwd", _backward, setup_context=_setup_context)


def moe_experts(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                backend: str, combine: str = "gather") -> Tensor:
    """`moelab.kernels.moe_experts` through the custom op (same shapes and autocast handling): the whole
    block runs in the autocast dtype, with autocast off inside. `backend` already resolved."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return moe_experts(x.to(dt), w_gate_up.to(dt), w_down.to(dt), topk_idx, topk_weight, backend, combine)
    # Keep residuals only when a backward will run (as the eager paths decide).
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, topk_weight))
    return torch.ops.moelab.moe_experts_fwd(x, w_gate_up, w_down, topk_idx, topk_weight, backend, combine, save)[0]


__all__ = ["moe_experts", "moe_experts_fwd", "moe_experts_bwd"]
