"""Count the operations that make the host wait for the device, on a CPU-only machine.

On CUDA, a host read (`.item()`, `float(t)`, `if t:`, `.tolist()`, a boolean mask, `bincount`, ...) blocks
the CPU until every kernel queued before it has run, so the CPU stops running ahead of the GPU. On CPU nothing
waits, but the same operations still pass through the dispatcher, so a `TorchDispatchMode` can record them:

    with HostReads() as reads:
        loss = model(x).sum(); loss.backward()
    assert reads.count() == 0, reads.summary()

What counts as a read (each occurrence once):
- `aten._local_scalar_dense`: item(), float(), int(), bool() of a tensor (and `.item()` calls inside composite
  ops, e.g. one_hot's range check);
- ops whose output size depends on the data: nonzero, masked_select, boolean-mask indexing (`aten.index` /
  `index_put_` with a bool index), unique*, repeat_interleave without `output_size`;
- `aten.bincount`, always: its CUDA kernel reads the input's max on the host even when `minlength` is given;
- `aten.equal` (a bool on the host);
- `Tensor.tolist()`, which copies the tensor to the host. On CPU it bypasses the dispatcher altogether, so the
  mode patches the method while it is active;
- `aten.lift_fresh`: a tensor made from host data (`torch.tensor([...])`, `from_numpy`). Not a read, but on
  CUDA its copy to the device (from pageable memory) blocks the host until the device's queue drains.
Not visible on CPU: `t.to("cuda")` of a host tensor made earlier. The GPU check for everything is
`torch.cuda.set_sync_debug_mode("error")` (tests/kernels/test_triton_moe.py does so for the kernel).

`with reads.paused():` leaves a region uncounted, for reads that are host reads only on CPU (the reference expert
kernel, which runs on CPU tensors only; AdamW's step counters, host tensors on every device).
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.bincount.default, aten.equal.default, aten.argwhere.default, aten._unique.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.unique_dim_consecutive.default}


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _reason(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` reads device data on the host, or None."""
    if func in _ALWAYS:
        return str(func.overloadpacket.__name__)
    if func is aten.lift_fresh.default:
        return "tensor from host data"
    packet = func.overloadpacket
    if packet is aten.index and _bool_index(args[1]):
        return "index[bool mask]"
    if packet in (aten.index_put, aten.index_put_) and _bool_index(args[1]):
        return "index_put[bool mask]"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


class HostReads(TorchDispatchMode):
    """Records host reads of tensor data while active. `reads`: (reason, where) per read."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self._paused = 0
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            why = _reason(func, args, kwargs)
            if why is not None:
                self._record(why)
        return func(*args, **kwargs)

    def _record(self, why: str) -> None:
        # The innermost frame in moelab (or the test) that asked: enough to find the line to fix.
        frames = [f for f in traceback.extract_stack()[:-2] if "moelab" in f.filename or "/tests/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.reads.append((why, where))

    def __enter__(self):
        original = torch.Tensor.tolist
        mode = self

        def tolist(t, *a, **k):
            if not mode._paused:
                mode._record("tolist")
            return original(t, *a, **k)

        self._tolist = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def count(self) -> int:
        return len(self.reads)

    def summary(self) -> str:
        return ", ".join(f"{n} x {why} at {where}" for (why, where), n in Counter(self.reads).items()) or "none"

    def reset(self) -> None:
        self.reads.clear()


@contextlib.contextmanager
def pause_in(reads: HostReads, cls, *names: str):
    """Leave `cls.<name>` (static or plain methods) uncounted while active, e.g. an autograd.Function's
    forward and backward."""
    saved = {n: cls.__dict__[n] for n in names}
    try:
        for n, raw in saved.items():
            fn = raw.__func__ if isinstance(raw, staticmethod) else raw

            def wrapped(*a, _fn=fn, **k):
                with reads.paused():
                    return _fn(*a, **k)

            setattr(cls, n, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        yield
    finally:
        for n, raw in saved.items():
            setattr(cls, n, raw)
