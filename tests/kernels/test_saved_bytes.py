"""What the expert kernels keep for the backward, against `plan.expert_slot_bytes` (per routed slot, bf16).

Counted with a `saved_tensors_hooks` counter: the unique storages the kernel's autograd node holds after the
forward, not counting the tensors the model keeps anyway (the weights, the input rows, the top-k ids). The
reference kernel is the CPU path of `plan.activation_bytes(device="cpu")`; the Triton kernel (interpreted on
CPU, see conftest.py) the "cuda" one, which `moelab plan` prints. Not needed for the model-level counts
(tests/trainers/test_activation_memory.py), which run the reference path only.
"""

from __future__ import annotations

import pytest
import torch

from moelab.kernels import moe_experts, triton_available
from moelab.trainers.config import load_run_config
from moelab.trainers.plan import expert_slot_bytes


def _kept_bytes(backend: str, T: int, rc) -> float:
    m = rc.model
    E, k, d, de = m.moe.n_experts, m.moe.top_k, m.d_model, m.d_expert
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16).requires_grad_()
    w1 = (torch.randn(E, 2 * de, d, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(E, d, de, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gate = torch.rand(T, k, generator=g).requires_grad_()
    gate_bf16 = gate.to(torch.bfloat16)  # as MoE.forward passes it: a bf16 copy of the fp32 gates
    held = []

    def pack(t):
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moe_experts(x, w1, w2, idx, gate_bf16, backend=backend)
    skip = {t.untyped_storage().data_ptr() for t in (x, w1, w2, idx)}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    del out
    return sum(n for p, n in storages.items() if p not in skip) / (T * k)


@pytest.mark.parametrize("backend,device", [
    ("reference", "cpu"),
    pytest.param("triton", "cuda", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
])
def test_expert_kernel_keeps_what_the_plan_counts(backend, device):
    rc = load_run_config("moe-tiny")  # d 64, 8 experts of 96, top-2
    got = _kept_bytes(backend, 256, rc)
    # fixed terms (per-expert offsets, the padded block list's E x BLOCK_M tail) stay under 2% at 512 slots
    assert got == pytest.approx(expert_slot_bytes(rc.model, ep=False, device=device), rel=0.02)
