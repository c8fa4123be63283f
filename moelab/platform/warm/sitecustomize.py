"""Warm Ray worker processes for a local sweep: import torch and the trainer while the worker waits idle.

Ray starts one idle worker process per CPU when it starts (prestart) and gives each new actor one of them.
A 1-worker sweep trial trains inside its Tune trial actor, so the first trial of every slot used to spend
its first seconds importing `ray.tune`, torch, `torch._dynamo` (AdamW's constructor pulls it in) and the
trainer: about 4 s of CPU per slot on the 2-core machines, on the sweep's critical path (bench/RESULTS.md,
"Sweep controller"). A `worker_process_setup_hook` would run on that same path (Ray starts actors with a
setup hook in fresh processes), so the imports happen here instead: Python imports `sitecustomize` at
interpreter start, before the worker connects, and the controller puts this directory on the PYTHONPATH of
the local Ray it starts (`controller._init_ray`, with MOELAB_WARM_WORKERS=1). Anything else that starts
Python with that environment is left alone: only Ray's default worker warms up. A failed import is ignored
here; the trial then imports what it needs itself (and reports the error where it belongs).

This file shadows any other `sitecustomize` on the path, so it runs that one too (`_chain`).
"""

import importlib.machinery
import importlib.util
import os
import sys

WARM_ENV = "MOELAB_WARM_WORKERS"


def _chain() -> None:
    """Run the next `sitecustomize` on sys.path after this directory's, as Python would have without it."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _is_ray_worker() -> bool:
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "default_worker.py"


_chain()
if os.environ.get(WARM_ENV) == "1" and _is_ray_worker():
    try:
        import ray.tune  # noqa: F401  (the trial actor's class lives there)
        import torch._dynamo  # noqa: F401  (imported by the first optimiser step anyway)

        import moelab.platform.worker  # noqa: F401
        import moelab.trainers.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - warming is an optimisation; the trial's own import reports failures
        pass
