"""Many workers for one run: a `(dp_shard, ep)` device mesh, expert parallelism (EP) and FSDP2.

Layout. W ranks form a 2-D mesh `(dp_shard, ep)`, W = dp_shard x ep, rank = dp_index x ep + ep_index: an EP
group is `ep` consecutive ranks (on a GPU cluster, GPUs of one node, so the all-to-all stays on NVLink).

- Data: every rank is a data-parallel rank. It takes its own equal slice of each global micro-batch
  (`Parallel.local_rows`), so the global batch of step i is exactly the one a single process trains on.
  `train.micro_batch_size` counts sequences per rank: W ranks at micro m train like one process at m x W.
- Non-expert parameters (embeddings, attention, norms, router, shared experts, output head, MTP modules) are
  sharded by FSDP2 over all W ranks (the flattened mesh `dp_ep`).
- Routed experts: EP rank j owns experts [j E/ep, (j+1) E/ep) (`apply_ep`), held as a DTensor `Shard(0)` on
  the `ep` mesh; FSDP2 shards each EP rank's experts over the dp_shard ranks of that EP slice (`apply_fsdp`,
  on dim 1 when it divides, so checkpoints carry plain `Shard` placements).

Token dispatch (`MoEParallel.experts`): the (token, k) slots are sorted by expert; the per-expert counts go
to their owners in one small all_to_all; token rows travel with the differentiable
`torch.distributed.nn.functional.all_to_all_single` (uneven splits; gloo supports it, the list-form
all_to_all it does not) to the rank owning their expert, which runs its experts over them; the results come
back by the reverse all_to_all and are weighted and summed per token as on one device.

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
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moelab.kernels import moe_experts
from moelab.trainers.config import ConfigError, RunConfig

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
    return w.to_local() if isinstance(w, DTensor) else w


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

    def global_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of per-rank means over all ranks (equal token counts), with the local gradient."""
        return _GlobalMean.apply(t, self.group, self.world_size)

    @torch.no_grad()
    def capacity_mask(self, topk_idx: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
        """`moe.capacity_mask` over the global micro-batch: capacity = ceil(cf x global slots / E), slots
        ranked per expert in global token order (rank 0's tokens first). topk_idx: [T, k] -> keep [T, k]."""
        flat = topk_idx.reshape(-1)
        onehot = F.one_hot(flat, n_experts)  # [S, E]
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        counts = onehot.sum(0)
        every = counts.new_empty(self.world_size * n_experts)
        _all_gather(every, counts, group=self.group)
        every = every.view(self.world_size, n_experts)
        offset = every[:self.rank].sum(0)  # slots of lower ranks, per expert
        capacity = math.ceil(capacity_factor * int(every.sum()) / n_experts)
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
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        counts = torch.bincount(flat[flat >= 0], minlength=self.n_experts)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert; dropped (-1) ones first
        order = order[order.numel() - int(counts.sum()):]
        # Counts: send[j, e] = my slots for expert e of rank j; recv[s, e] = rank s's slots for my expert e.
        send_counts = counts.view(self.ep, self.n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send = send_counts.sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        xs = x_TD.index_select(0, order // k)
        xr = dist_nn.all_to_all_single(xs.new_empty(sum(recv), d), xs, recv, send, group=self.ep_group)
        # Arrived rows: grouped by source rank, each source's rows sorted by (local) expert.
        local_e = torch.repeat_interleave(torch.arange(self.n_local, device=x_TD.device).repeat(self.ep),
                                          recv_counts.reshape(-1))
        # One zero-weight dummy row: the computation (and its autograd graph, whose backward issues the
        # reverse all_to_all) is the same on a rank that receives no token at all.
        xr1 = torch.cat([xr, xr.new_zeros(1, d)])
        e1 = torch.cat([local_e, local_e.new_zeros(1)])[:, None]
        g1 = torch.cat([xr.new_ones(xr.shape[0]), xr.new_zeros(1)])[:, None].to(topk_weight.dtype)
        yr = moe_experts(xr1, w_gu, w_dn, e1, g1, backend=backend)[:-1]
        ys = dist_nn.all_to_all_single(yr.new_empty(order.numel(), d), yr.contiguous(), send, recv,
                                       group=self.ep_group)
        # Weight each slot by its gate and sum over a token's k slots, in the order the reference uses.
        w_slot = topk_weight.reshape(-1).index_select(0, order).to(ys.dtype)
        out = ys.new_zeros(T * k, d).index_copy(0, order, ys * w_slot[:, None])
        return out.view(T, k, d).sum(1)


def apply_ep(model: nn.Module, par: Parallel) -> nn.Module:
    """Give each EP rank its n_experts/ep experts (a DTensor `Shard(0)` on the ep mesh) and install the
    distributed MoE hook (dispatch, global balance statistics) on every MoE layer. In place."""
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


def _expert_shard_dim(moe: nn.Module, dp: int) -> Shard:
    """Shard experts over dp on a dim that divides evenly (1, then 2): plain `Shard` placements on the
    (dp_shard, ep) mesh. Dim 0 would need FSDP's strided sharding under the ep split."""
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
    gathers parameters in that dtype and reduces gradients in fp32; None keeps fp32 throughout (CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moelab.trainers.moe import MoE

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    mtp = list(getattr(model, "mtp", ()))
    for block in [*model.layers, *(m.block for m in mtp)]:
        ffn = block.ffn
        if isinstance(ffn, MoE) and isinstance(ffn.w_gate_up, DTensor):
            # The MoE module's own FSDP unit holds only the experts; router and shared experts are
            # ordinary data-parallel parameters, wrapped first so they stay on the all-ranks mesh.
            for sub in (ffn.router, ffn.shared, ffn.shared_gate):
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
    return t.full_tensor() if isinstance(t, DTensor) else t
