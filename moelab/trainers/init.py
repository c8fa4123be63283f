"""Shard-local parameter initialisation: every element's value depends on (seed, parameter name, index) only.

Why: a model built whole and then sharded costs every rank the whole model in host memory and the time to
draw all of it (moe-1b: 27.7 GB fp32 and minutes of `randn` per rank). Built on the `meta` device instead,
sharded (`parallel.parallelize`), then `to_empty` on the rank's device, each rank only has to fill the slice
of each parameter it holds (an FSDP2 row shard, its EP experts). For that slice to hold the values one
process would draw, a value cannot depend on how much was drawn before it, so the draws are keyed by
position, and one process uses the same scheme (`model.build_model`).

The scheme. A parameter of shape (n_0, .., n_{k-1}) is read as R = n_0 ... n_{k-2} rows of C = n_{k-1}
columns (a vector is one row). Rows are cut into blocks of B = max(1, BLOCK_ELEMS // C) rows; block b is
`std * torch.randn(rows_b, C)` from a CPU generator seeded with a hash of (seed, parameter name, b). A rank draws
only the blocks that overlap its slice (at most two extra partial blocks per contiguous run of rows) and
copies the overlap into its local tensor, one block at a time, so the host holds one block (1 MiB) beyond
the shard. Draws are on the CPU on every device: the same seed gives bit-identical weights on CPU and GPU.

A slice is read from the DTensor's placements (`local_box`): plain `Shard` and `Replicate` on any mesh
(FSDP2's dim-0 shards, EP's `Shard(0)` experts and FSDP's `Shard(1|2)` of them). Under another placement
(FSDP's strided sharding, when neither expert dim splits over dp_shard) the rank draws that one parameter
whole and keeps its part: the same values, at the cost of one parameter's draw and memory.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from typing import Callable

import torch

# Elements per random block: large enough that creating a generator per block costs nothing next to the
# draw, small enough that the partial blocks at a shard's edges waste little.
BLOCK_ELEMS = 1 << 18


def stream_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit generator seed for (seed, name, index): a keyed hash, stable across processes and Python
    versions (unlike `hash()`, which is salted per process)."""
    h = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & ((1 << 63) - 1)


def generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    """A CPU generator for stream (seed, name, index)."""
    return torch.Generator().manual_seed(stream_seed(seed, name, index))


def is_dtensor(t: object) -> bool:
    """`t` is a DTensor. Answered without importing torch.distributed.tensor (0.6 s of CPU, sympy included)
    when nothing has: a DTensor cannot exist before its module is loaded, and one process never needs it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds of `p`: the local shard of a DTensor (FSDP2, EP), else `p` itself."""
    return p.to_local() if is_dtensor(p) else p


def local_box(p: torch.Tensor) -> tuple[slice, ...] | None:
    """The global index ranges, one slice per dim, of the elements this rank holds of `p` (every element for
    a plain tensor); None when its placements do not make the local part one such box (FSDP's strided
    sharding of a dim EP already shards)."""
    if not is_dtensor(p):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(type(pl) not in (Shard, Replicate) for pl in p.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, a whole value of DTensor `p`, cut as p's placements cut it, with no
    communication (every rank holds the same `full`)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _runs(shape: tuple[int, ...], box: tuple[slice, ...]):
    """The box as contiguous runs of rows of the (R, C) view: yields (local index of the leading dims,
    first global row, number of rows). Leading dims are all but the last two; the run spans box[-2]."""
    lead, rowdim = box[:-2], box[-2]
    strides = [math.prod(shape[i + 1:-1]) for i in range(len(shape) - 1)]  # row strides of dims 0..k-2
    for idx in itertools.product(*(range(s.start, s.stop) for s in lead)):
        first = sum(i * st for i, st in zip(idx, strides)) + rowdim.start * strides[-1]
        if rowdim.stop > rowdim.start:
            yield tuple(i - s.start for i, s in zip(idx, lead)), first, rowdim.stop - rowdim.start


@torch.no_grad()
def normal_(p: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill this rank's part of `p` with std x N(0, 1), the values of the module docstring's scheme for
    (seed, name): identical, element for element, to what one process draws for the whole parameter."""
    box = local_box(p)
    if box is None:  # a layout whose local part is no box: draw this parameter whole, keep this rank's part
        full = torch.empty(p.shape, dtype=p.dtype)
        normal_box_(full, tuple(p.shape), tuple(slice(0, n) for n in p.shape), name, seed, std)
        local_tensor(p).copy_(_local_of(full, p))
        return
    normal_box_(local_tensor(p), tuple(p.shape), box, name, seed, std)


@torch.no_grad()
def normal_box_(local: torch.Tensor, shape: tuple[int, ...], box: tuple[slice, ...], name: str, seed: int,
                std: float) -> None:
    """`local` (any device, the box's shape) <- elements `box` of the (seed, name) parameter of global
    `shape`. One block of at most BLOCK_ELEMS values is on the host at a time."""
    if len(shape) < 2:  # a vector (or scalar) is one row
        shape, box, local = (1, math.prod(shape)), (slice(0, 1), box[0] if box else slice(0, 1)), local.view(1, -1)
    R, C = math.prod(shape[:-1]), shape[-1]
    B = max(1, BLOCK_ELEMS // max(C, 1))
    cols = box[-1]
    if cols.stop <= cols.start:
        return
    cached: tuple[int, torch.Tensor] | None = None
    for lead, first, n in _runs(shape, box):
        dst = local[lead] if lead else local  # [n, cols]
        for b in range(first // B, (first + n - 1) // B + 1):
            if cached is None or cached[0] != b:
                rows_b = min(B, R - b * B)
                cached = (b, torch.randn(rows_b, C, generator=generator(seed, name, b)).mul_(std))
            lo, hi = max(first, b * B), min(first + n, (b + 1) * B)
            dst[lo - first:hi - first].copy_(cached[1][lo - b * B:hi - b * B, cols])


@torch.no_grad()
def fill_(p: torch.Tensor, values: Callable[[tuple[slice, ...]], torch.Tensor]) -> None:
    """Copy `values(box)` into this rank's part of `p`; `values` returns the elements of the global box
    (a tuple of slices, see `local_box`) of the parameter's full value, in that box's shape."""
    box = local_box(p)
    local = local_tensor(p)
    if box is None:
        local.copy_(_local_of(values(tuple(slice(0, n) for n in p.shape)).to(local), p))
    elif local.numel():
        local.copy_(values(box))
