"""Expert parallelism on CPU: tokens/s of `moe-small` in one process vs 2 gloo ranks (ep 1 and ep 2), and
the share of step time spent in all-to-all.

Every layout trains the same global batch (16 x 256 tokens per step, one micro-step). Two ranks get one
thread each, the single process two, so all layouts use the machine's 2 cores. The all-to-all time is the
wall time inside `torch.distributed.all_to_all_single` (count exchange, dispatch and combine, forward and
backward), waiting for the peer included, summed over the measured steps and divided by their wall time.

    OMP_NUM_THREADS=1 python bench/parallel_cpu.py [--steps 12 --warmup 3 --preset moe-small]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time


def _measure(rc, par, steps: int, warmup: int) -> dict:
    import torch.distributed as dist

    from moelab.trainers.loop import StepStats, Trainer

    spent = [0.0]
    inner = dist.all_to_all_single

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    dist.all_to_all_single = timed  # the autograd all_to_all calls it too, forward and backward
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(rc, tmp, parallel=par, progress=False)
            times, a2a, losses = [], [], []
            for i in range(warmup + steps):
                spent[0] = 0.0
                t = time.perf_counter()
                losses.append(tr.train_step(StepStats())["loss"])
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                    a2a.append(spent[0])
    finally:
        dist.all_to_all_single = inner
    return {"step_s": statistics.median(times), "a2a_share": sum(a2a) / sum(times), "loss": losses[-1]}


def _rank(rank: int, world: int, port: int, preset: str, ep: int, steps: int, warmup: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    from moelab.trainers.parallel import init_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rc = _config(preset, ep)
    out.put((rank, _measure(rc, init_parallel(ep, rc.model.moe.n_experts), steps, warmup)))
    dist.destroy_process_group()


def _config(preset: str, ep: int):
    from moelab.trainers.config import load_run_config

    return load_run_config(preset, {"train.ep": ep, "train.eval_every": 0, "train.ckpt_every": 0,
                                    "train.device": "cpu"})


def run_ranks(preset: str, ep: int, steps: int, warmup: int, world: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, preset, ep, steps, warmup, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(out.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return {"step_s": max(r["step_s"] for r in res.values()),
            "a2a_share": statistics.mean(r["a2a_share"] for r in res.values()), "loss": res[0]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    import torch

    rc = _config(a.preset, 1)
    tokens = rc.train.batch_size * rc.train.seq_len
    torch.set_num_threads(2)
    rows = [("1 process, 2 threads", _measure(rc, None, a.steps, a.warmup))]
    torch.set_num_threads(1)
    rows.append(("2 gloo ranks, ep 1 (FSDP2)", run_ranks(a.preset, 1, a.steps, a.warmup)))
    rows.append(("2 gloo ranks, ep 2 (FSDP2 + EP)", run_ranks(a.preset, 2, a.steps, a.warmup)))
    print(f"{a.preset}: {tokens} tokens per step ({rc.train.batch_size} x {rc.train.seq_len}), median of "
          f"{a.steps} steps after {a.warmup} warm-up")
    print("| layout | step (s) | tokens/s | all-to-all share of step | loss at last step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        share = f"{r['a2a_share']:.1%}" if "ep 2" in name else "-"
        print(f"| {name} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | {share} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
