"""What every worker process of a warm local Ray imports once it has connected, before it takes work (Ray's
`preload_python_modules`, set by `controller.init_local_ray(warm=True)`): a Tune trial that starts in it
finds ray.tune, torch and the trainer loaded. Importing this module is the warm-up; it has no API.

The imports run with the cyclic collector off and are then frozen (`moelab.startup`): a quarter less CPU
while two workers import at once on a small machine, and no full collection during a trial scans them."""

from __future__ import annotations

import importlib

from moelab.startup import startup_imports

# What a 1-worker trial imports, in the order it imports it. Not torch._dynamo: the trainer never loads it
# unless asked to compile (moelab.trainers.optim.AdamW).
MODULES = ("ray.tune", "torch", "moelab.platform.worker", "moelab.trainers.loop")

with startup_imports():
    for _name in MODULES:
        importlib.import_module(_name)
