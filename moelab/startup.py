"""Process start-up: heavy imports without the cyclic garbage collector.

Importing ray.tune, torch and the trainer creates about 400,000 objects that live as long as the process. While
they are being created, Python's cyclic collector runs its full collection again and again over all of them
(a quarter of the import time: 2.6-3.0 CPU-s -> 1.9-2.2 measured on the 2-core machine), and afterwards
every full collection that a trial's allocations trigger scans them all once more. `startup_imports` switches
the collector off for the imports and then freezes what exists (`gc.freeze`: those objects are never scanned
again). Measured in bench/RESULTS.md ("Sweep controller", issue 17)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def startup_imports(freeze: bool = True) -> Iterator[None]:
    """Run the body (a process's heavy imports) with the cyclic collector off; then, with freeze=True,
    move every object tracked so far to the permanent generation, and restore the collector's state.

    Only where the process holds nothing of its own work yet (its entry point, a worker's preload): frozen
    objects are freed by reference counting as usual but never collected as cycles. With freeze=False the
    imports still skip the collector, but the next full collection scans them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()
