"""bench/gpu_check.py (`make gpu-check`) without a GPU: the no-CUDA answer, the report of a failed check, and a
smoke run of every check at toy sizes on CPU (its figures mean nothing; the code paths are the GPU's)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)  # its dataclasses look their module up while defined
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_and_exits_3(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.md"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.EXIT_NO_CUDA == 3
    assert "no CUDA device" in capsys.readouterr().err and not out.exists()
    assert gpu_check.main(["--dry-run"]) == 3  # the plan, then the same answer
    printed = capsys.readouterr()
    assert "gpu_check plan:" in printed.out and "tests/kernels" in printed.out and "no CUDA device" in printed.err


def test_a_failed_check_is_reported_and_exits_1(gpu_check, monkeypatch, tmp_path):
    def broken(sizes):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "check_train", broken)
    out = tmp_path / "r.md"
    assert gpu_check.main(["--allow-cpu", "--skip", "kernels,bench,syncs", "--out", str(out)]) == 1
    text = out.read_text()
    assert "| train | **FAILED** |" in text and "illegal memory access" in text and "FAILED: train" in text
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--skip", "everything"])
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in for a real GPU check")
def test_smoke_run_of_every_check_writes_the_markdown_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOELAB_COMPILE_BACKEND": "aot_eager", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert text.startswith("## GPU check: CPU") and "torch " in text and "triton " in text
    for row in ("| kernel tests (tests/kernels/test_reference.py) | passed |", "| bench tiny, 64 tokens | passed |",
                "| train moe-tiny, 6 steps | passed |", "| train moe-tiny, 6 steps, train.compile | passed |",
                "| host syncs per step | passed |"):
        assert row in text, row
    assert "passed in" in text  # pytest's tally reached the table
    assert "MFU " in text and "loss at the last step +0.00e+00 vs eager" in text  # aot_eager: bit-identical
