"""Many workers for one run: a `(dp_shard, ep)` device mesh, expert parallelism (EP) and FSDP2.

Layout. W ranks form a 2-D mesh `(dp_shard, ep)`, W = dp_shard x ep, rank = dp_index x ep + ep_index: an EP
group is `ep` consecutive ranks (on a GPU cluster, GPUs of one node, so the all-to-all stays on NVLink).

- Data: every rank is a data-parallel rank. It takes its own equal slice of each global micro-batch
  (`Parallel.local_rows`; the loop builds just those rows, `data.rank_batches`), so the global batch of step i
  is exactly the one a single process trains on.
  `train.micro_batch_size` counts sequences per rank: W ranks at micro m train like one process at m x W.
- Non-expert parameters (embeddings, attention, norms, router, shared experts, output head, MTP modules) are
  sharded by FSDP2 over all W ranks (the flattened mesh `dp_ep`).
- Routed experts: EP rank j owns experts [j E/ep, (j+1) E/ep) (`apply_ep`), held as a DTensor `Shard(0)` on
  the `ep` mesh; FSDP2 shards each EP rank's experts over the dp_shard ranks of that EP slice (`apply_fsdp`,
  on dim 1 when it divides, so checkpoints carry plain `Shard` placements).

Token dispatch (`MoEParallel.experts`): the (token, k) slots are sorted by expert; the per-expert counts go
to their owners in one small all_to_all; token rows travel with the differentiable
`torch.distributed.nn.functional.all_to_all_single` (uneven splits; gloo supports it, the list-form
all_to_all it does not) to the rank owning their expert, with their gate weights, and that rank's expert
kernel computes the gate-weighted outputs; they come back by the reverse all_to_all and are scatter-added
per token. The host reads one thing per layer: the all_to_all split sizes.

Exactness: why a run on W ranks equals one process on the global batch. A rank's objective is the mean loss
over its own rows; FSDP averages gradients over the ranks that hold a parameter. Then
- non-expert gradients: the average of W local-mean gradients is the global-mean gradient;
- expert gradients: the all_to_all backward already sums the contributions of every rank of the EP group,
  so their FSDP reduction divides by W rather than by dp_shard (`set_gradient_divide_factor`);
- the balance loss `E sum_i f_i P_i` is a product of batch means, not a mean of per-token terms, so it uses
  the global f and P (`MoEParallel.global_mean`: the all-reduced value with the local gradient; for any
  g(P_global), averaging the rank-local gradients g'(P_global) dP_r/dtheta over ranks gives exactly
  dg(P_global)/dtheta, with no collective in the backward);
- the capacity limit counts slots in global token order (`MoEParallel.capacity_mask`);
- grad clipping uses the norm over every shard of every rank (`clip_grad_norm`);
- expert load and router statistics are summed over ranks before they are logged and before the
  aux-loss-free bias update, so all ranks keep identical router biases (the loop does this).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moelab.kernels import moe_experts
from moelab.trainers.config import ConfigError, RunConfig
from moelab.trainers.init import is_dtensor

# torch 2.13 marks the autograd all_to_all deprecated in favour of the functional collectives; it is the one
# this module is specified against (uneven splits, autograd, gloo) and it still works.
warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated", category=FutureWarning)
# MoE.forward returns a view; Block adds it out of place (x + ffn(x)), the case FSDP's warning is not about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMoE\) returned a view tensor")


# ----------------------------------------------------------------------------------------------------------
# The mesh


@dataclass
class Parallel:
    """The process layout of one run. `mesh` is 2-D `(dp_shard, ep)`; `world` the flattened 1-D mesh over
    all ranks (FSDP's mesh for non-expert parameters, and the group that statistics are reduced over)."""

    mesh: DeviceMesh
    world: DeviceMesh
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def ep(self) -> int:
        return self.mesh.size(1)

    @property
    def dp(self) -> int:
        return self.mesh.size(0)

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup:
        return self.world.get_group()

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global (micro-)batch: rows [r n, (r+1) n), n = rows / W."""
        n = batch.shape[0] // self.world_size
        if n * self.world_size != batch.shape[0]:
            raise ConfigError(f"a batch of {batch.shape[0]} sequences does not split over {self.world_size} ranks")
        return batch[self.rank * n:(self.rank + 1) * n]

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or mean) of `t` over all ranks, returned as a new tensor."""
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out / self.world_size if op == "mean" else out

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def check_layout(world_size: int, ep: int, n_experts: int) -> int:
    """dp_shard for a world of `world_size` ranks with expert-parallel size `ep`; ConfigError if impossible."""
    if ep < 1:
        raise ConfigError(f"train.ep (--ep): got {ep}; allowed: an integer >= 1")
    if world_size % ep:
        raise ConfigError(f"train.ep (--ep): got {ep}; allowed: a divisor of the world size {world_size} "
                          f"(the number of ranks/GPUs)")
    if ep > 1 and n_experts == 0:
        raise ConfigError(f"train.ep (--ep): got {ep}; allowed: 1 for a dense model (model.moe.n_experts=0)")
    if ep > 1 and n_experts % ep:
        raise ConfigError(f"train.ep (--ep): got {ep}; allowed: a divisor of model.moe.n_experts={n_experts}")
    return world_size // ep


def init_parallel(ep: int = 1, n_experts: int = 0, device: str = "auto") -> Parallel | None:
    """Join the process group torchrun / Ray Train describe in the environment and build the mesh.

    Returns None for a single process (no WORLD_SIZE, or WORLD_SIZE=1) unless a process group already
    exists with more than one rank. Backend: nccl on CUDA, gloo on CPU.
    """
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    W = dist.get_world_size()
    if W == 1:
        return None
    dp = check_layout(W, ep, n_experts)
    backend = dist.get_backend()
    dev_type = "cuda" if backend == "nccl" else "cpu"
    if dev_type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    mesh = init_device_mesh(dev_type, (dp, ep), mesh_dim_names=("dp_shard", "ep"))
    world = mesh["dp_shard", "ep"]._flatten("dp_ep")
    return Parallel(mesh=mesh, world=world, device=dev)


def check_batch(rc: RunConfig, par: Parallel) -> None:
    """The global batch must split into W ranks x train.micro_batch_size (per rank) micro-steps."""
    t, W = rc.train, par.world_size
    if t.micro_batch_size and t.batch_size % (W * t.micro_batch_size):
        raise ConfigError(f"train.batch_size: got {t.batch_size}; allowed: a multiple of {W * t.micro_batch_size} "
                          f"= {W} ranks x train.micro_batch_size={t.micro_batch_size} (sequences per rank per "
                          f"micro-step)")
    if t.batch_size % W:
        raise ConfigError(f"train.batch_size: got {t.batch_size}; allowed: a multiple of the world size {W} "
                          f"(each rank takes an equal slice of every batch)")


# ----------------------------------------------------------------------------------------------------------
# Expert parallelism


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there); older torch has only the latter.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if is_dtensor(w) else w


class _GlobalMean(torch.autograd.Function):
    """Forward: the mean of `t` over the group. Backward: the gradient passes to the local `t` unchanged."""

    @staticmethod
    def forward(ctx, t, group, world_size):
        out = t.detach().clone()
        dist.all_reduce(out, group=group)
        return out / world_size

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class MoEParallel:
    """What an MoE layer does differently on many ranks. `apply_ep` installs one as `MoE.parallel`.

    Not an nn.Module on purpose: it holds process groups, no parameters.
    """

    def __init__(self, par: Parallel, n_experts: int):
        self.n_experts = n_experts
        self.ep = par.ep
        self.n_local = n_experts // par.ep
        self.ep_group = par.mesh.get_group("ep")
        self.group = par.group
        self.world_size = par.world_size
        self.rank = par.rank
        # the differentiable all_to_all; imported here, not with the module: a single process never needs it
        # (0.17 s of CPU in every trial process)
        from torch.distributed.nn.functional import all_to_all_single

        self.all_to_all = all_to_all_single

    def global_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of per-rank means over all ranks (equal token counts), with the local gradient."""
        return _GlobalMean.apply(t, self.group, self.world_size)

    @torch.no_grad()
    def capacity_mask(self, topk_idx: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
        """`moe.capacity_mask` over the global micro-batch: capacity = ceil(cf x global slots / E), slots
        ranked per expert in global token order (rank 0's tokens first). topk_idx: [T, k] -> keep [T, k]."""
        from moelab.trainers.moe import expert_onehot

        flat = topk_idx.reshape(-1)
        onehot = expert_onehot(flat, n_experts)  # [S, E]
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        counts = onehot.sum(0)
        every = counts.new_empty(self.world_size * n_experts)
        _all_gather(every, counts, group=self.group)
        every = every.view(self.world_size, n_experts)
        offset = every[:self.rank].sum(0)  # slots of lower ranks, per expert
        # Every rank holds as many tokens (`Parallel.local_rows`), so the global slot count is known on the
        # host: reading every.sum() would stall the host on the device once per layer.
        capacity = math.ceil(capacity_factor * flat.numel() * self.world_size / n_experts)
        return (position + offset[flat] < capacity).view_as(topk_idx)

    def experts(self, x_TD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_idx: torch.Tensor,
                topk_weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """`moe_experts` with the experts spread over the EP group. Same shapes and result as one device:
        x [T, d], w_* this rank's experts (DTensor or local), topk_idx [T, k] global ids (-1 dropped),
        topk_weight [T, k] -> [T, d]."""
        w_gu, w_dn = _local(w_gate_up), _local(w_down)
        if self.ep == 1:
            return moe_experts(x_TD, w_gu, w_dn, topk_idx, topk_weight, backend=backend)
        T, d = x_TD.shape
        E, k = self.n_experts, topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        # One permutation for the whole layer: slots sorted by expert, which is by (owner rank, local expert);
        # dropped slots get key E, so they sort last and land in a count bin that is never sent.
        key = torch.where(flat >= 0, flat, E)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, key, torch.ones_like(key))
        # Counts: send[j, e] = my slots for expert e of rank j; recv[s, e] = rank s's slots for my expert e.
        send_counts = counts[:E].view(self.ep, self.n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        # The layer's one host read: all_to_all needs its split sizes as Python ints, so the host waits for
        # the counts here. Every other size below follows from these.
        sizes = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send, recv = sizes[:self.ep], sizes[self.ep:]
        n_send, n_recv = sum(send), sum(recv)
        order = order[:n_send]  # the kept slots, grouped by destination rank
        token = order // k
        xs = x_TD.index_select(0, token)  # [n_send, d]: the rows to send, the one gather of the forward
        # The gates travel with their rows, so the expert kernel applies them (fused into its down GEMM on GPU)
        # and its backward yields their gradient; one more small all_to_all instead of two passes over [slots, d]
        # (weighting the returned rows here, and its backward).
        ws = topk_weight.reshape(-1).index_select(0, order)
        xr = self.all_to_all(xs.new_empty(n_recv, d), xs, recv, send, group=self.ep_group)
        wr = self.all_to_all(ws.new_empty(n_recv), ws, recv, send, group=self.ep_group)
        # Arrived rows: grouped by source rank, each source's rows sorted by (local) expert. The expert kernel
        # routes them as k = 1 slots of `local_e` and writes each result back to its arrival row. A rank that
        # receives no row still runs the kernel (on [0, d]): its backward must issue the reverse all_to_alls,
        # and its experts need (zero) gradients for FSDP's reduce-scatter.
        local_e = torch.repeat_interleave(torch.arange(self.n_local, device=x_TD.device).repeat(self.ep),
                                          recv_counts.reshape(-1), output_size=n_recv)
        yr = moe_experts(xr, w_gu, w_dn, local_e[:, None], wr[:, None], backend=backend)  # gate-weighted
        ys = self.all_to_all(yr.new_empty(n_send, d), yr, send, recv, group=self.ep_group)
        # Sum each token's (weighted) slots: one scatter-add of the returned rows into the [T, d] output, whose
        # backward is the gather that fills the backward's send buffer.
        return ys.new_zeros(T, d).index_add_(0, token, ys)


def apply_ep(model: nn.Module, par: Parallel) -> nn.Module:
    """Give each EP rank its n_experts/ep experts (a DTensor `Shard(0)` on the ep mesh) and install the
    distributed MoE hook (dispatch, global balance statistics) on every MoE layer. In place."""
    from torch.distributed.tensor import DTensor, Shard

    ep_mesh = par.mesh["ep"]
    for _, moe in model.moe_layers():
        check_layout(par.world_size, par.ep, moe.n_experts)
        if par.ep > 1:
            n = moe.n_experts // par.ep
            rows = slice(par.ep_rank * n, (par.ep_rank + 1) * n)
            for name in ("w_gate_up", "w_down"):
                local = getattr(moe, name).detach()[rows].clone()
                setattr(moe, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)))
        moe.parallel = MoEParallel(par, moe.n_experts)
    return model


# ----------------------------------------------------------------------------------------------------------
# FSDP2


def _expert_shard_dim(moe: nn.Module, dp: int):
    """Shard experts over dp on a dim that divides evenly (1, then 2): plain `Shard` placements on the
    (dp_shard, ep) mesh. Dim 0 would need FSDP's strided sharding under the ep split."""
    from torch.distributed.tensor import Shard

    shapes = [_local(moe.w_gate_up).shape, _local(moe.w_down).shape]
    for dim in (1, 2):
        if all(s[dim] % dp == 0 for s in shapes):
            return Shard(dim)
    return Shard(0)


def apply_fsdp(model: nn.Module, par: Parallel, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 `fully_shard` per block and at the root, over all ranks; routed experts (after `apply_ep`)
    over the dp_shard ranks of their EP slice. MTP modules: their block is a block like the others, and each
    module gets a unit of its own for its norms and projection; the embedding and output head they share
    stay in the root's unit (the model runs them inside its own forward). `param_dtype` (bf16 on CUDA)
    gathers parameters in that dtype and reduces gradients in fp32; None keeps fp32 throughout (CPU).
    Two things stay fp32 under a bf16 `param_dtype`, as in a single process under autocast: the RoPE tables
    (units do not cast their inputs) and the router (a unit of its own with fp32 parameters)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moelab.trainers.moe import MoE

    # cast_forward_inputs=False: FSDP would cast every floating argument of a unit to param_dtype, and the
    # blocks and MTP modules take the fp32 RoPE tables as arguments (bf16 cos/sin put an error of up to 2^-9
    # on every rotated feature). The activations need no cast: the embedding already runs in param_dtype.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if param_dtype else MixedPrecisionPolicy()
    # The router's logits decide which experts run; it computes them in fp32 from fp32 weights (Router.forward),
    # so its unit gathers the fp32 master weights (E x d: a small all-gather).
    fp32 = MixedPrecisionPolicy()
    mtp = list(getattr(model, "mtp", ()))
    for block in [*model.layers, *(m.block for m in mtp)]:
        ffn = block.ffn
        ep = isinstance(ffn, MoE) and is_dtensor(ffn.w_gate_up)
        if isinstance(ffn, MoE) and (ep or param_dtype is not None):
            fully_shard(ffn.router, mesh=par.world, mp_policy=fp32)
        if ep:
            # The MoE module's own FSDP unit holds only the experts; router and shared experts are
            # ordinary data-parallel parameters, wrapped first so they stay on the all-ranks mesh.
            for sub in (ffn.shared, ffn.shared_gate):
                if sub is not None:
                    fully_shard(sub, mesh=par.world, mp_policy=mp)
            placement = _expert_shard_dim(ffn, par.dp)
            fully_shard(ffn, mesh=par.mesh["dp_shard"], mp_policy=mp, shard_placement_fn=lambda p: placement)
            ffn.set_gradient_divide_factor(float(par.world_size))
            if par.device.type == "cpu" and par.dp > 1:
                # gloo has no PREMUL_SUM: reduce with SUM and divide after. (Not at dp_shard 1, where torch
                # 2.13's FSDP divides the unreduced gradient and then again.)
                ffn.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=par.world, mp_policy=mp)
    for module in mtp:
        fully_shard(module, mesh=par.world, mp_policy=mp)
    fully_shard(model, mesh=par.world, mp_policy=mp)
    return model


def parallelize(model: nn.Module, par: Parallel, param_dtype: torch.dtype | None = None) -> nn.Module:
    """apply_ep, then apply_fsdp: the model as every rank of a run holds it."""
    return apply_fsdp(apply_ep(model, par), par, param_dtype)


# ----------------------------------------------------------------------------------------------------------
# Gradients


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, par: Parallel) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over sharded gradients: every element lives on exactly one rank
    (FSDP shards, EP slices), so the global norm is sqrt(all-reduce sum of local squares). Returns it."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=par.device)
    for g in grads:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq, group=par.group)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors)."""
    return t.full_tensor() if is_dtensor(t) else t
