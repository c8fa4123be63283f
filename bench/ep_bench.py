"""One MoE layer's forward + backward with expert parallelism (2 gloo ranks, ep 2) against one process, on CPU.

Every layout computes the same global batch (`--tokens` tokens in sequences of 128) through the same layer
(router, experts, balance and z losses; reference expert kernel), with one thread per process. Besides today's
dispatch (`MoEParallel.experts`), the
dispatch of commit c5188c3 runs too (`_dispatch_c5188c3` below: a zero dummy row appended to the received rows,
the expert kernel's copy-only combine with weights of one, and a zero-filled [slots, d] scatter summed over k;
plus three host reads), so the table holds the before / after ratio of the same run.

Figures are medians over `--iters` forward + backward passes, as ratios: CPU time summed over the processes
(the work done, gloo's threads included; on a shared machine it moves less than wall time with the load of
others), wall time (the slower rank's), and the share of the wall time inside
`torch.distributed.all_to_all_single` (waiting for the peer included). With no dispatch cost, the ranks' CPU
time would sum to the single process's and the wall time would halve.

    OMP_NUM_THREADS=1 python bench/ep_bench.py [--tokens 4096 --d-model 512 --experts 16 --top-k 4
                                                 --d-expert 256 --iters 20 --warmup 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import socket
import statistics
import time

SEQ = 128


def _layer(a):
    """The MoE layer (fixed weights, seed 0) in a minimal model shell that `apply_ep` accepts."""
    import torch
    import torch.nn as nn

    from moelab.trainers.config import MoEConfig, load_run_config
    from moelab.trainers.moe import MoE

    base = load_run_config("moe-tiny").model
    cfg = dataclasses.replace(base, d_model=a.d_model, n_heads=a.d_model // 64, n_kv_heads=a.d_model // 64,
                              moe=MoEConfig(n_experts=a.experts, top_k=a.top_k, d_expert=a.d_expert))
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    class Shell(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def moe_layers(self):
            return [(0, self.moe)]

    return Shell(), cfg


def _dispatch_c5188c3(self, x_TD, w_gate_up, w_down, topk_idx, topk_weight, backend=None):
    """MoEParallel.experts as of commit c5188c3, for the before / after comparison (see the module docstring)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    from moelab.kernels import moe_experts
    from moelab.trainers.parallel import _local

    w_gu, w_dn = _local(w_gate_up), _local(w_down)
    T, d = x_TD.shape
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=self.n_experts)
    order = torch.argsort(flat, stable=True)
    order = order[order.numel() - int(counts.sum()):]
    send_counts = counts.view(self.ep, self.n_local)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
    send = send_counts.sum(1).tolist()
    recv = recv_counts.sum(1).tolist()
    xs = x_TD.index_select(0, order // k)
    xr = dist_nn.all_to_all_single(xs.new_empty(sum(recv), d), xs, recv, send, group=self.ep_group)
    local_e = torch.repeat_interleave(torch.arange(self.n_local, device=x_TD.device).repeat(self.ep),
                                      recv_counts.reshape(-1))
    xr1 = torch.cat([xr, xr.new_zeros(1, d)])
    e1 = torch.cat([local_e, local_e.new_zeros(1)])[:, None]
    g1 = torch.cat([xr.new_ones(xr.shape[0]), xr.new_zeros(1)])[:, None].to(topk_weight.dtype)
    yr = moe_experts(xr1, w_gu, w_dn, e1, g1, backend=backend)[:-1]
    ys = dist_nn.all_to_all_single(yr.new_empty(order.numel(), d), yr.contiguous(), send, recv, group=self.ep_group)
    w_slot = topk_weight.reshape(-1).index_select(0, order).to(ys.dtype)
    out = ys.new_zeros(T * k, d).index_copy(0, order, ys * w_slot[:, None])
    return out.view(T, k, d).sum(1)


def _measure(a, par=None, dispatch: str = "now") -> dict:
    """Medians over the passes of: wall seconds (the slower rank's), CPU seconds (summed over ranks: the work
    done, which waiting on a loaded machine does not inflate), and the all-to-all share of the wall time."""
    import torch
    import torch.distributed as dist

    shell, cfg = _layer(a)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.tokens // SEQ, SEQ, cfg.d_model, generator=g)
    if par is not None:
        from moelab.trainers.parallel import MoEParallel, apply_ep

        apply_ep(shell, par)
        x = par.local_rows(x)
        if dispatch == "c5188c3":
            shell.moe.parallel.experts = _dispatch_c5188c3.__get__(shell.moe.parallel, MoEParallel)
    x.requires_grad_()
    spent = [0.0]
    inner = dist.all_to_all_single

    def timed(*args, **kw):
        t = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    dist.all_to_all_single = timed  # the autograd all_to_all calls it too, forward and backward
    wall, cpu, a2a = [], [], []
    try:
        for i in range(a.warmup + a.iters):
            if par is not None:
                par.barrier()
            spent[0] = 0.0
            t, c = time.perf_counter(), time.process_time()
            m = shell.moe
            out = m(x)
            (out.square().mean() + 0.01 * m.aux_loss + 0.001 * m.z_loss).backward()
            t, c = time.perf_counter() - t, time.process_time() - c
            for p in m.parameters():
                p.grad = None
            x.grad = None
            share = spent[0] / t
            if par is not None:
                t, c, share = _reduce(par, t, c, share)
            if i >= a.warmup:
                wall.append(t)
                cpu.append(c)
                a2a.append(share)
    finally:
        dist.all_to_all_single = inner
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "a2a": statistics.median(a2a)}


def _reduce(par, wall: float, cpu: float, share: float) -> tuple[float, float, float]:
    """(max wall, summed CPU, mean all-to-all share) over the ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([wall], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=par.group)
    rest = torch.tensor([cpu, share / par.world_size], dtype=torch.float64)
    dist.all_reduce(rest, group=par.group)
    return float(t), float(rest[0]), float(rest[1])


def _rank(rank: int, world: int, port: int, a, dispatch: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    from moelab.trainers.parallel import init_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res = _measure(a, init_parallel(2, a.experts), dispatch)
    out.put((rank, res))
    dist.destroy_process_group()


def run_ranks(a, dispatch: str, world: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, a, dispatch, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(out.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return res[0]  # every rank holds the reduced figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="global tokens per pass (a multiple of 256)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--d-expert", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # each layout: one thread per process (a shared 2-core machine runs no faster on 2)
    one = _measure(a)
    now = run_ranks(a, "now")
    rows = [("1 process", one), ("2 gloo ranks, ep 2, dispatch now", now),
            ("2 gloo ranks, ep 2, dispatch of c5188c3", run_ranks(a, "c5188c3"))]
    print(f"MoE layer fwd+bwd: {a.tokens} tokens, d {a.d_model}, {a.experts} experts of {a.d_expert}, top-{a.top_k}; "
          f"one thread per process; median of {a.iters} after {a.warmup} warm-up")
    print("| layout | CPU time (all ranks) / 1 process | wall time / 1 process | CPU time / dispatch now | "
          "all-to-all share of wall |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        share = f"{r['a2a']:.1%}" if "ep 2" in name else "-"
        print(f"| {name} | {r['cpu'] / one['cpu']:.2f} | {r['wall'] / one['wall']:.2f} | {r['cpu'] / now['cpu']:.2f} | "
              f"{share} |")


if __name__ == "__main__":
    main()
