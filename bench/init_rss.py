"""Peak host memory of model initialisation per rank: the old path (build the whole model on every rank, draw
it, then shard) against meta-device init (build on `meta`, shard, materialise and draw the rank's shards only).

Each of `--ranks` gloo ranks (127.0.0.1, one thread each) reports `ru_maxrss` before the model exists (the
interpreter, torch and the process group: the fixed overhead) and right after it is initialised and sharded,
the bytes of the shards it holds, and the wall time. `new` is what `Trainer` does (`Trainer._build_model`);
`old` is the sequence the loop ran before it: `Transformer(cfg)` (nn.Linear's own init included), the
previous `init_weights` (one generator, each parameter drawn whole in turn), then `parallelize`.

    OMP_NUM_THREADS=1 python bench/init_rss.py --preset moe-1b --layers 1 2 --modes old new --ep 2

moe-1b whole is 27.7 GB in fp32: reduce the depth with `--layers` on a small machine (memory is linear in the
number of layers, and the table gives the per-layer slope to extrapolate with).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import socket
import tempfile
import time


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def _old_init(model, seed: int) -> None:
    """The initialisation the loop used before meta-device init: one generator, each parameter drawn whole,
    in `named_parameters` order (norms at 1, biases at 0, residual outputs at std / sqrt(2 n_layers))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    std = model.cfg.init_std
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            else:
                s = out_std if ("wo." in name or "down." in name or leaf == "w_down") else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)


def _rank(rank: int, world: int, port: int, preset: str, layers: int, ep: int, mode: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    from moelab.trainers.config import load_run_config
    from moelab.trainers.init import local_tensor
    from moelab.trainers.parallel import init_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rc = load_run_config(preset, {"model.n_layers": layers, "train.ep": ep, "train.device": "cpu",
                                  "train.eval_every": 0, "train.ckpt_every": 0})
    par = init_parallel(ep, rc.model.moe.n_experts)
    dist.barrier()
    base = _rss_gib()
    t = time.perf_counter()
    if mode == "old":
        from moelab.trainers.model import Transformer
        from moelab.trainers.parallel import parallelize

        model = Transformer(rc.model)
        _old_init(model, rc.train.seed)
        parallelize(model, par)
    else:
        from moelab.trainers.loop import Trainer

        with tempfile.TemporaryDirectory() as tmp:
            model = Trainer(rc, tmp, parallel=par, progress=False).model
    seconds = time.perf_counter() - t
    peak = _rss_gib()
    shard = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters()) / 2**30
    dist.barrier()
    out.put((rank, {"base": base, "peak": peak, "shard": shard, "seconds": seconds,
                    "whole": rc.model.param_counts()["total"] * 4 / 2**30}))
    dist.destroy_process_group()


def run(preset: str, layers: int, ep: int, mode: str, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, preset, layers, ep, mode, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(out.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return [res[r] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="moe-1b")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["old", "new"], choices=["old", "new"])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    print(f"{a.preset}, {a.ranks} gloo ranks, ep {a.ep}; GiB; peak = ru_maxrss after init and sharding, "
          f"base = before the model, shard = parameters this rank holds")
    print("| path | layers | whole model (fp32) | rank | base | peak | peak - base | shard | init (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in a.modes:
        for layers in a.layers:
            for rank, r in enumerate(run(a.preset, layers, a.ep, mode, a.ranks)):
                print(f"| {mode} | {layers} | {r['whole']:.2f} | {rank} | {r['base']:.2f} | {r['peak']:.2f} | "
                      f"{r['peak'] - r['base']:.2f} | {r['shard']:.2f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
