"""Run a function on N gloo ranks on 127.0.0.1: the one helper every multi-process test uses.

    from distributed import run_distributed

    def _check(rank, world_size, scale):      # at module level: the ranks import it by name
        ...
        return something_picklable

    results = run_distributed(_check, 2, 0.5)  # [rank 0's return value, rank 1's, ...]

Each rank gets a process group (`gloo`, TCP store on 127.0.0.1, gloo bound to the loopback interface) and
one compute thread. Ranks are forked from a forkserver that has torch and moelab imported already, so a
start costs a fraction of a second instead of a fresh interpreter's import. A rank's exception is raised
in the caller with its traceback; a rank that hangs (a mismatched collective) fails the test after
`timeout` seconds instead of blocking the suite.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

_PRELOAD = ["torch", "torch.distributed", "moelab.trainers.loop", "moelab.trainers.parallel"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(module: str, directory: str, name: str):
    """The function by module and name; the module's directory joins sys.path (the forkserver's sys.path
    is the one it started with)."""
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return getattr(importlib.import_module(module), name)


def _rank_main(where: tuple[str, str, str], rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        fn = _resolve(*where)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; returns their results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    where = (fn.__module__, os.path.dirname(os.path.abspath(sys.modules[fn.__module__].__file__)), fn.__qualname__)
    procs = [ctx.Process(target=_rank_main, args=(where, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run_distributed({fn.__name__}): ranks {sorted(set(range(world_size)) - set(out))} "
                                   f"did not finish within {timeout:.0f} s (a hang in a collective?)")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead and not errors:
                    errors.append(f"rank(s) {dead} died with exit code(s) {[procs[r].exitcode for r in dead]}")
                if errors:  # peers of a failed rank block in their next collective: stop waiting for them
                    break
                continue
            if ok:
                out[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} raised:\n{payload}")
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(f"run_distributed({fn.__name__}) failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
