"""Pure-torch MoE expert compute: the specification every kernel is tested against.

Shape legend: T tokens, k slots per token, S = T*k routed slots, E experts, d model width, d_e expert width.

Slots are sorted by expert (stable), so each expert runs two dense GEMMs over a contiguous block of rows;
the Python loop runs over experts, never over tokens. The backward is written by hand: letting autograd
differentiate `w[e]` per expert would materialise a full-size [E, ...] gradient for every expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_slots(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, k) slots by expert.

    topk_idx: [T, k] int, -1 marks a dropped slot (capacity overflow).
    Returns order [S'] (flat slot ids of kept slots, grouped by expert, stable), token [S'] (their token
    ids) and counts [E] (slots per expert); S' = number of kept slots.
    """
    flat = topk_idx.reshape(-1)
    k = topk_idx.shape[1] if topk_idx.dim() == 2 else 1
    # Dropped slots (-1) sort first; skip them.
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=n_experts + 1)  # bin 0 counts the dropped slots
    n_dropped, counts = int(counts[0]), counts[1:]
    order = order[n_dropped:]
    return order, order // k, counts


def slot_positions(order: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Inverse of `order`: for each flat slot, its row in the sorted list; dropped slots point one past the
    end (a zero row appended by the caller). order: [S'] -> [T*k]."""
    pos = torch.full((n_slots,), order.numel(), dtype=torch.long, device=order.device)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos


def _combine(rows: torch.Tensor, pos: torch.Tensor, T: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum sorted per-slot rows back per token, optionally weighted: one gather per k and an in-place
    (fused multiply-)add, no scatter-add and no reduction over a size-k middle dim (slow on CPU).
    rows: [S'+1, d] in sorted order, the last row zero (where dropped slots point); pos: [T*k];
    weight: [T, k] or None -> [T, d] with out[t] = sum_j weight[t, j] * rows[pos[t, j]]."""
    k = pos.numel() // T if T else 1
    pos = pos.view(T, k)
    out = rows.index_select(0, pos[:, 0])
    if weight is not None:
        out.mul_(weight[:, :1])
    for j in range(1, k):
        g = rows.index_select(0, pos[:, j])
        if weight is None:
            out.add_(g)
        else:
            out.addcmul_(g, weight[:, j:j + 1])
    return out


def _swiglu_experts(xs: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: list[int],
                    n_rows: int | None = None):
    """Per-expert SwiGLU over contiguous row blocks. xs: [S, d] -> (h [R, 2 d_e], a [R, d_e], y [R+1, d]),
    R = n_rows (default S, at least S): rows [0, S) computed, rows from S on (y's row S included, where
    _combine sends dropped slots) zero. R > S gives the custom op outputs whose shapes the inputs' shapes fix."""
    S, d = xs.shape
    R = S if n_rows is None else n_rows
    de = w_down.shape[2]
    h = xs.new_empty(R, 2 * de)
    a = xs.new_empty(R, de)
    y = xs.new_empty(R + 1, d)
    y[S:].zero_()
    h[S:].zero_()
    a[S:].zero_()
    # Expert by expert, so each block's SwiGLU runs on rows still in cache from its GEMM. One scratch buffer
    # for silu(gate), reused: a fresh multi-MB tensor per expert costs page faults on every step.
    tmp = xs.new_empty(max(counts, default=0), de)
    for e, rows in _blocks(counts):
        he = h[rows]
        torch.mm(xs[rows], w_gate_up[e].t(), out=he)
        s = torch.ops.aten.silu.out(he[:, :de], out=tmp[: he.shape[0]])
        torch.mul(s, he[:, de:], out=a[rows])
        torch.mm(a[rows], w_down[e].t(), out=y[rows])
    return h, a, y


def _blocks(counts: list[int]):
    """(expert, row slice) for every expert that received slots."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int, dtype: torch.dtype):
    """What forward and backward derive from the routing alone (one host sync, for the counts).
    x: [T, d], topk_idx / topk_weight: [T, k] -> order [S'], token [S'], pos [T*k], counts (list of E ints),
    xs [S', d] the gathered rows, w_slot [S'] each kept slot's weight in `dtype`."""
    order, token, counts_t = route_slots(topk_idx, n_experts)
    pos = slot_positions(order, topk_idx.numel())
    xs = x.index_select(0, token)
    w_slot = topk_weight.reshape(-1).index_select(0, order).to(dtype)
    return order, token, pos, counts_t.tolist(), xs, w_slot


def forward(x, w_gate_up, w_down, topk_idx, topk_weight, n_rows: int | None = None):
    """The forward of `moe_experts` and what its backward needs. Shapes as in `moe_experts`; returns out
    [T, d], the routing (see `_routing`) and h, a, y (see `_swiglu_experts`, with R = n_rows rows)."""
    T = x.shape[0]
    order, token, pos, counts, xs, w_slot = _routing(x, topk_idx, topk_weight, w_gate_up.shape[0], x.dtype)
    h, a, y = _swiglu_experts(xs, w_gate_up, w_down, counts, n_rows)
    out = _combine(y, pos, T, topk_weight.to(y.dtype))
    return out, (order, token, pos, counts, xs, w_slot), (h, a, y)


def backward(dout, w_gate_up, w_down, routing, h, a, y, topk_shape, topk_dtype):
    """Gradients of `moe_experts` from the residuals `forward` returned (h, a, y may hold extra zero rows past
    the S' kept slots). dout: [T, d] -> dx [T, d], dw_gate_up, dw_down (shapes of the weights), d_topk
    [topk_shape] in topk_dtype."""
    order, token, pos, counts, xs, w_slot = routing
    T, de, S = dout.shape[0], w_down.shape[2], xs.shape[0]
    dys = dout.index_select(0, token)  # [S, d]: grad of each slot's weighted output
    d_wslot = torch.einsum("sd,sd->s", dys, y[:S])  # d out / d w_slot = y; no [S, d] temporary
    d_topk = torch.zeros(topk_shape.numel(), dtype=topk_dtype, device=dout.device)
    d_topk.index_copy_(0, order, d_wslot.to(topk_dtype))
    dys.mul_(w_slot[:, None])  # now the grad of the unweighted expert output y
    dxs = xs.new_empty(S + 1, xs.shape[1])  # the zero row past the end again, for _combine
    dxs[S].zero_()
    dw_gu = torch.empty_like(w_gate_up)  # every expert's block is written below or zeroed here
    dw_down = torch.empty_like(w_down)
    for e, n in enumerate(counts):
        if n == 0:
            dw_gu[e].zero_()
            dw_down[e].zero_()
    # Scratch buffers sized for the largest expert, reused by every expert (no per-expert page faults).
    n_max = max(counts, default=0)
    da_buf, s_buf, dh_buf = xs.new_empty(n_max, de), xs.new_empty(n_max, de), xs.new_empty(n_max, 2 * de)
    for e, rows in _blocks(counts):
        # Expert by expert, so the SwiGLU backward runs on rows still in cache from the GEMMs.
        dy, he = dys[rows], h[rows]
        n = he.shape[0]
        g, u = he[:, :de], he[:, de:]
        torch.mm(dy.t(), a[rows], out=dw_down[e])
        da = torch.mm(dy, w_down[e], out=da_buf[:n])  # [n, d_e]
        dh = dh_buf[:n]
        torch.mul(da, torch.ops.aten.silu.out(g, out=s_buf[:n]), out=dh[:, de:])
        torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dh[:, :de])
        torch.mm(dh.t(), xs[rows], out=dw_gu[e])
        torch.mm(dh, w_gate_up[e], out=dxs[rows])
    dx = _combine(dxs, pos, T)
    return dx, dw_gu, dw_down, d_topk.view(topk_shape)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, topk_idx, topk_weight):
        out, routing, (h, a, y) = forward(x, w_gate_up, w_down, topk_idx, topk_weight)
        order, token, pos, counts, xs, w_slot = routing
        # a = silu(gate) * up and the gathered xs are kept (S x (d_e + d) more memory) so the backward
        # recomputes neither.
        ctx.save_for_backward(xs, w_gate_up, w_down, order, token, pos, h, a, y, w_slot)
        ctx.counts = counts
        ctx.topk_shape = topk_weight.shape
        ctx.topk_dtype = topk_weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        xs, w_gate_up, w_down, order, token, pos, h, a, y, w_slot = ctx.saved_tensors
        dx, dw_gu, dw_down, d_topk = backward(dout, w_gate_up, w_down, (order, token, pos, ctx.counts, xs, w_slot),
                                              h, a, y, ctx.topk_shape, ctx.topk_dtype)
        return dx, dw_gu, dw_down, None, d_topk


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_idx: torch.Tensor,
                topk_weight: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, weighted and summed over the k slots of each token.

    x: [T, d]; w_gate_up: [E, 2*d_e, d] (rows [0:d_e] gate, [d_e:2 d_e] up; nn.Linear out x in);
    w_down: [E, d, d_e]; topk_idx: [T, k] int (-1 = dropped slot); topk_weight: [T, k].
    Returns [T, d]: sum_k topk_weight[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_idx[t, j].
    Differentiable in x, w_gate_up, w_down and topk_weight.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Run the whole block in the autocast dtype (bf16 GEMMs), with fp32 outside it.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _MoEExperts.apply(x.to(dt), w_gate_up.to(dt), w_down.to(dt), topk_idx, topk_weight)
    return _MoEExperts.apply(x, w_gate_up, w_down, topk_idx, topk_weight)


def moe_experts_naive(x, w_gate_up, w_down, topk_idx, topk_weight):
    """Per-token loop, autograd backward: the slow, obviously-correct specification used in tests."""
    de = w_down.shape[2]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[t, j])
            if e < 0:
                continue
            h = w_gate_up[e] @ x[t]
            acc = acc + topk_weight[t, j].to(x.dtype) * (w_down[e] @ (F.silu(h[:de]) * h[de:]))
        rows.append(acc)
    return torch.stack(rows)
