"""MFU accounting: the peak FLOP/s table by exact device name, the unknown-GPU path, and what the loop logs."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from moelab.trainers import hardware, loop
from moelab.trainers.config import ConfigError, load_run_config
from moelab.trainers.hardware import GPU_PEAK_BF16, PEAK_ENV, peak_flops, peak_flops_for

# Names as torch.cuda.get_device_name returns them -> dense bf16 peak (vendor data sheets).
KNOWN = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H800": 989e12,
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H20": 148e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A30": 165e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA B200": 2250e12,
}
UNKNOWN = ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA RTX A6000", "NVIDIA L4 MIG 1g.6gb",
           "Tesla V100-SXM2-16GB", "AMD Instinct MI300X", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA L", ""]


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_gpus_get_their_data_sheet_peak(name):
    assert peak_flops_for(name) == KNOWN[name]


@pytest.mark.parametrize("name", UNKNOWN)
def test_names_the_table_does_not_know_get_none(name):
    assert peak_flops_for(name) is None


def test_similar_names_never_match_each_other():
    """The old substring match gave an L40 the L4's peak and every H100 the SXM's."""
    assert len({peak_flops_for(n) for n in ("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S")}) == 3
    assert len({peak_flops_for(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")}) == 3
    assert all(v > 0 for forms in GPU_PEAK_BF16.values() for v in forms.values())


def _fake_cuda(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(hardware, "_warned", set())


def test_unknown_gpu_has_no_peak_and_warns_once(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    _fake_cuda(monkeypatch, "NVIDIA Future GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peak_flops(torch.device("cuda")) is None
        assert peak_flops(torch.device("cuda")) is None
    assert len(caught) == 1 and "MFU not reported" in str(caught[0].message) and PEAK_ENV in str(caught[0].message)
    _fake_cuda(monkeypatch, "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == 756e12


def test_the_environment_overrides_and_is_validated(monkeypatch):
    _fake_cuda(monkeypatch, "NVIDIA Future GPU")
    monkeypatch.setenv(PEAK_ENV, "1.5e15")
    assert peak_flops(torch.device("cuda")) == 1.5e15 and peak_flops(torch.device("cpu")) == 1.5e15
    for bad in ("fast", "0", "-1e12", "inf", "nan"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=rf"\${PEAK_ENV}: got '{bad}'; allowed: a positive number"):
            peak_flops(torch.device("cpu"))


def test_cpu_keeps_its_measured_gemm_rate(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    peak = peak_flops(torch.device("cpu"))
    assert peak is not None and 1e8 < peak < 1e14


# -- what the loop logs -----------------------------------------------------------------------------------------


def _train(tmp_path, capsys, **over):
    rc = load_run_config("moe-tiny", {"train.steps": 6, "train.log_every": 2, "train.eval_every": 0,
                                      "train.ckpt_every": 0, "train.batch_size": 4, "train.seq_len": 32, **over})
    loop.train(rc, tmp_path, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    return rows, capsys.readouterr().out.splitlines()


def test_first_window_mfu_is_nan_and_cpu_memory_is_nan(tmp_path, capsys, monkeypatch):
    """The first window holds compilation / warm-up: no MFU there; later windows have one. No CUDA memory
    counter on CPU: max_mem_gib is NaN, in every row (the store's metrics schema has the column)."""
    monkeypatch.delenv(PEAK_ENV, raising=False)
    rows, lines = _train(tmp_path, capsys)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert math.isnan(rows[0]["mfu"]) and all(0 < r["mfu"] < 1 for r in rows[1:])
    assert all(math.isnan(r["max_mem_gib"]) for r in rows)
    assert "mfu n/a" in lines[0] and "mfu " in lines[1] and "mfu n/a" not in lines[1]
    from moelab.platform.store import METRIC_COLUMNS

    assert "max_mem_gib" in METRIC_COLUMNS


def test_unknown_gpu_peak_leaves_mfu_unreported(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "peak_flops", lambda device: None)
    rows, lines = _train(tmp_path, capsys)
    assert all(math.isnan(r["mfu"]) for r in rows) and all(r["tokens_per_s"] > 0 for r in rows)
    assert all("mfu n/a" in line for line in lines if line.startswith("step "))


class _FakeGemm:
    """torch.mm and the clock of `hardware`, faked: product k takes durations[k % len] seconds."""

    def __init__(self, durations):
        self.now, self.k, self.durations = 0.0, 0, durations

    def clock(self):
        return self.now

    def mm(self, a, b):
        self.now += self.durations[self.k % len(self.durations)]
        self.k += 1


def _measure(monkeypatch, durations, n=64):
    fake = _FakeGemm(durations)
    monkeypatch.setattr(hardware.time, "perf_counter", fake.clock)
    monkeypatch.setattr(hardware.torch, "mm", fake.mm)
    hardware._measured_cpu_peak.cache_clear()
    try:
        return hardware._measured_cpu_peak(1, n=n), fake.k - 1  # the first product warms up, untimed
    finally:
        hardware._measured_cpu_peak.cache_clear()


def test_cpu_peak_stops_once_its_fastest_product_repeats(monkeypatch):
    # an idle machine: every product as fast; 20 products, then four agree
    peak, products = _measure(monkeypatch, [1e-3])
    assert products == 20 and peak == pytest.approx(2 * 64**3 / 1e-3)
    # a loaded machine: most products interrupted, one in ten clean; it keeps going until four clean ones
    peak, products = _measure(monkeypatch, [1e-3] + [5e-3] * 9)
    assert products == 40 and peak == pytest.approx(2 * 64**3 / 1e-3)


def test_cpu_peak_gives_up_at_its_budget(monkeypatch):
    # no two products within 1% of each other: the 0.25 s budget ends it, with the best product
    durations = [1e-3 * 1.05**k for k in range(1000)]
    peak, products = _measure(monkeypatch, durations)
    elapsed = sum(durations[1:products + 1])
    assert 0.25 < elapsed < 0.25 + durations[products] and peak == pytest.approx(2 * 64**3 / 1e-3 / 1.05)
