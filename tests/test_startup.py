"""`moelab.startup.startup_imports`: the body runs without the cyclic collector, what exists afterwards is frozen
(freeze=True), and the collector's earlier state comes back, also when the body raises."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from moelab.startup import startup_imports


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the frozen objects of this test session go back to the collector
    gc.enable()


@pytest.mark.parametrize("freeze", [True, False])
def test_collector_off_inside_and_restored(unfrozen, freeze):
    gc.enable()
    before = gc.get_freeze_count()
    with startup_imports(freeze=freeze):
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # new tracked objects: frozen with the rest on the way out
    assert gc.isenabled()
    if freeze:
        assert gc.get_freeze_count() >= before + len(made)
    else:
        assert gc.get_freeze_count() == before


def test_a_disabled_collector_stays_disabled_and_an_error_passes(unfrozen):
    gc.disable()
    with pytest.raises(ImportError):
        with startup_imports():
            import moelab_no_such_module  # noqa: F401
    assert not gc.isenabled()


def test_imports_take_no_full_collection():
    """A fresh interpreter importing torch inside startup_imports runs no collection of the oldest generation;
    without it, it runs several (the cost the context saves)."""
    code = ("import gc, sys\n"
            "from moelab.startup import startup_imports\n"
            "ctx = startup_imports() if sys.argv[1] == '1' else __import__('contextlib').nullcontext()\n"
            "with ctx:\n"
            "    import torch\n"
            "print(gc.get_stats()[2]['collections'], gc.get_freeze_count())\n")
    full, frozen = {}, {}
    for on in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", code, on], capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
        full[on], frozen[on] = int(out[0]), int(out[1])
    assert full["1"] == 0 and frozen["1"] > 100_000
    assert full["0"] >= 1 and frozen["0"] == 0


@pytest.mark.parametrize("torch_first", [False, True])
def test_moelab_train_freezes_only_at_its_process_start(tmp_path, torch_first):
    """`moelab train` in a fresh process freezes its imports; called in a process that had torch already (a
    test, a notebook), it freezes nothing of the caller's (frozen objects are never collected as cycles)."""
    code = ("import gc, sys\n"
            + ("import torch\n" if torch_first else "")
            + "from moelab.cli import main\n"
            "assert main(['train', '--preset', 'moe-tiny', '--steps', '2', '--train.batch_size', '2', '--out', "
            "sys.argv[1]]) == 0\n"
            "print('FROZEN', gc.get_freeze_count(), gc.isenabled())\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    frozen, enabled = out.split("FROZEN")[-1].split()
    assert enabled == "True"
    assert (int(frozen) > 100_000) if not torch_first else int(frozen) == 0
