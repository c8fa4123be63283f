"""The torch floor in pyproject.toml is the oldest torch the code runs on: every torch API the code calls that
arrived after torch 2.0 is listed here with the release that introduced it, the floor must equal the newest of
those releases, and every one must exist in the installed torch. A new API, or a new floor, then needs a
line here: a deliberate change, not a surprise on someone's older cluster image."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (dotted name, torch release that introduced it, where moelab calls it)
APIS = [
    ("torch.distributed.fsdp.FSDPModule.set_gradient_divide_factor", "2.8", "trainers/parallel.py (EP gradients)"),
    ("torch.distributed.fsdp.FSDPModule.set_force_sum_reduction_for_comms", "2.8", "trainers/parallel.py (gloo)"),
    ("torch.distributed.fsdp.fully_shard", "2.6", "trainers/parallel.py (public path; was torch.distributed."
                                                  "_composable.fsdp)"),
    ("torch.distributed.fsdp.MixedPrecisionPolicy", "2.6", "trainers/parallel.py"),
    ("torch.distributed.tensor.DTensor", "2.5", "trainers/parallel.py, init.py (public torch.distributed.tensor)"),
    ("torch.distributed.tensor.Shard", "2.5", "trainers/parallel.py, init.py"),
    ("torch.distributed.tensor.Replicate", "2.5", "trainers/init.py"),
    ("torch.distributed.tensor.distribute_tensor", "2.5", "trainers/init.py"),
    ("torch.distributed.tensor._utils.compute_local_shape_and_global_offset", "2.5", "trainers/init.py"),
    ("torch.distributed.device_mesh.DeviceMesh._flatten", "2.5", "trainers/parallel.py (the dp_ep mesh)"),
    ("torch.library.custom_op", "2.4", "kernels/custom_op.py"),
    ("torch.library.register_autograd", "2.4", "kernels/custom_op.py"),
    ("torch.library.opcheck", "2.4", "tests/kernels/test_custom_op.py"),
    ("torch.get_autocast_dtype", "2.4", "kernels/*.py (autocast inside the expert kernels)"),
    ("torch.distributed.checkpoint.metadata.StorageMeta", "2.4", "trainers/loop.py (safe DCP reader)"),
    ("torch.compiler.is_compiling", "2.3", "kernels/__init__.py, trainers/ac.py"),
    ("torch.nn.Module.compile", "2.2", "trainers/loop.py (train.compile, in place)"),
    ("torch.distributed.checkpoint.state_dict.get_state_dict", "2.2", "trainers/loop.py"),
    ("torch.distributed.checkpoint.state_dict.StateDictOptions", "2.2", "trainers/loop.py"),
    ("torch.distributed.device_mesh.init_device_mesh", "2.2", "trainers/parallel.py"),
    ("torch.utils.checkpoint.noop_context_fn", "2.1", "trainers/ac.py"),
]
# (callable, keyword argument, release, where)
KWARGS = [
    ("torch.distributed.fsdp.fully_shard", "shard_placement_fn", "2.6", "trainers/parallel.py (experts on dim 1)"),
    ("torch.distributed.checkpoint.load", "no_dist", "2.2", "trainers/loop.py, upcycle.py, hf_export.py"),
    ("torch.distributed.checkpoint.save", "checkpoint_id", "2.2", "trainers/loop.py"),
]


def _resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def test_the_floor_is_the_newest_api_the_code_calls():
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    newest = max((v for _, v, _ in APIS + [(k, v, w) for _, k, v, w in KWARGS]), key=_version)
    newest = max([newest, "2.5"], key=_version)  # SDPA's enable_gqa, checked below
    assert _version(floor) == _version(newest), (f"pyproject.toml says torch>={floor}; the newest API listed here "
                                                 f"needs {newest}")


def test_every_listed_api_exists_in_this_torch():
    missing = []
    for name, since, where in APIS:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(f"{name} (torch {since}, {where})")
    for name, kw, since, where in KWARGS:
        if kw not in inspect.signature(_resolve(name)).parameters:
            missing.append(f"{name}({kw}=...) (torch {since}, {where})")
    assert not missing, f"torch {torch.__version__} lacks: {missing}"


def test_sdpa_takes_enable_gqa():
    """torch 2.5: grouped-query attention in SDPA itself (model.Attention), 2 query heads on 1 key/value head."""
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    out = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, kv.expand(1, 2, 4, 8), kv.expand(1, 2, 4, 8), is_causal=True)
    torch.testing.assert_close(out, want)
