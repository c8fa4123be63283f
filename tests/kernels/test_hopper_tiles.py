"""The smallest row tile on Hopper: Triton turns a 32-row tl.dot into Ampere's mma.sync, a 64-row one into
the warp-group wgmma, so on sm_90+ `block_m_for` never goes below 64 rows, also at few slots per expert."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import triton

from moelab.kernels import triton_moe as tm


def test_block_m_is_64_or_more_on_sm90_and_32_at_few_slots_before(monkeypatch):
    monkeypatch.setattr(tm, "INTERPRETED", False)  # the GPU rule, not the interpreter's fixed tile
    few, some, many = 512 * 16, 128 * 200, 128 * 2048  # slots for 128 experts: 64, 200, 2048 per expert
    assert [tm.block_m_for(n, 128, arch=80) for n in (few, some, many)] == [32, 64, 128]
    assert [tm.block_m_for(n, 128, arch=90) for n in (few, some, many)] == [64, 64, 128]
    assert tm.block_m_for(few, 128, arch=100) == 64


def test_few_slots_per_expert_still_compile_to_wgmma_on_sm90():
    """Offline (Triton's bundled ptxas, no GPU): the gate/up kernel for the fine-grained shape at 512 tokens
    (64 slots per expert) in every autotune config uses wgmma."""
    if not os.path.exists(os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton has no bundled ptxas")
    code = ("import dataclasses; from moelab.kernels import bench; "
            "shape = dataclasses.replace(bench.SHAPES['fine'], tokens=512); "
            "rows = bench.compile_check(90, shape, only={'gate_up'}); "
            "print(sorted({r.get('mma', r.get('error')) for r in rows}), len(rows))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == str(len(tm._gpu_configs("gate_up")))
    assert "['wgmma']" in r.stdout, r.stdout
