"""`moelab plan`: every figure against a hand computation for moe-tiny on 4 GPUs, and the refusals."""

import json
import subprocess
import sys

import pytest

from moelab.cli import main
from moelab.trainers.config import ConfigError, preset
from moelab.trainers.plan import PlanInputs, make_plan

# moe-tiny: d=64, 2 layers, 4 heads of 16 (q=64), 2 kv heads (kv=32), 8 experts of d_e=96, top-2, vocab 257.
# Parameters: attention 3 x 64x64 + 2 x 64x32 = 12288, norms 128, router 8x64 = 512, experts 8 x 3x64x96 =
# 147456 per layer; embedding 257x64 and head 257x64, final norm 64:
P, P_E = 353728, 294912
P_N = P - P_E  # 58816
SMALL = PlanInputs(gpus=4, ep=2, seq=64, micro_batch=2, batch=16, mfu=0.5, peak_tflops=1.0, bw_gbps=8.0,
                   nvlink_gbps=80.0, gpus_per_node=2)


def test_small_case_equals_hand_computation():
    r = make_plan(preset("moe-tiny"), SMALL)
    assert (r["dp_shard"], r["grad_accum"], r["tokens_per_step"]) == (2, 2, 16 * 64)  # 16 / (4 GPUs x 2)
    assert (r["params_total"], r["params_experts"]) == (P, P_E)
    gib = 2**30
    assert r["mem_params_gib"] * gib == pytest.approx(4 * P / 4)
    assert r["mem_grads_gib"] * gib == pytest.approx(4 * P / 4)
    assert r["mem_optim_gib"] * gib == pytest.approx(8 * P / 4)
    # bf16 root (embed + head + final norm = 32960) + 2 blocks of (12928 non-expert + 147456 / ep 2)
    assert r["mem_gathered_gib"] * gib == pytest.approx(2 * (32960 + 2 * (12928 + 147456 / 2)))
    # per token (plan.py's table; N(n) = 6n + 4 an RMSNorm's own saves): attention norm N(64) + 128 = 516;
    # GQA 4*64 + 4*32 + 4*4 heads = 400; FFN norm N(64) = 388; MoE under EP (its input not saved): router
    # 4*64 + 8*8 + 8*2 + 4 + renormalised 4*2 + 4 = 352, 2 slots of 4*64 + 6*96 + 34 = 866; a block 3388,
    # two; head 8 + N(64) + 128 + 4*257 + 8 = 1560: 8336 per token, 2 sequences x 64 tokens per micro-step
    assert r["act_bytes_per_token"] == 2 * (516 + 400 + 388 + 352 + 2 * 866) + 1560 == 8336
    assert r["mem_activations_gib"] * gib == pytest.approx(128 * 8336)
    assert r["mem_logits_gib"] * gib == pytest.approx(128 * 6 * 257)  # bf16 logits + fp32 copy at the loss
    assert r["mem_total_gib"] * gib == pytest.approx(16 * P / 4 + 412544 + 128 * 8336 + 128 * 6 * 257)
    # 4 (dispatch, combine, fwd + bwd) x 2 micro-steps x 2 layers x 128 tokens x top-2 x d 64 x (1/2) x 2 bytes
    assert r["a2a_bytes_per_step"] == 4 * 2 * 2 * 128 * 2 * 64 * 0.5 * 2 == 262144
    # 2 micro-steps x (2 + 2 + 4) bytes x (P_n x 3/4 + experts/ep x 1/2)
    assert r["fsdp_bytes_per_step"] == pytest.approx(2 * 8 * (P_N * 3 / 4 + P_E / 2 * 1 / 2))
    # 6 x (active non-embedding 99648 + head 257*64) + 12 x 2 layers x 64 x 64, per token; 1024 tokens
    fpt = 6 * (99648 + 257 * 64) + 12 * 2 * 64 * 64
    assert r["flops_per_token"] == fpt == 794880
    assert r["flops_per_step"] == fpt * 16 * 64
    t_compute = fpt * 16 * 64 / 4 / (0.5 * 1e12)
    t_a2a = 262144 / (80e9 / 8)  # ep 2 fits in a 2-GPU node: NVLink
    t_fsdp = 2 * 8 * (P_N * 3 / 4 + P_E / 4) / (8e9 / 8)  # 4 GPUs span 2 nodes: the network
    assert (r["t_compute_s"], r["t_a2a_s"], r["t_fsdp_s"]) == pytest.approx((t_compute, t_a2a, t_fsdp))
    assert t_fsdp > t_compute  # so the FSDP excess shows in the step time
    assert r["step_time_s"] == pytest.approx(t_compute + t_a2a + (t_fsdp - t_compute))
    assert r["tokens_per_s"] == pytest.approx(1024 / r["step_time_s"])


def test_activation_checkpointing_modes():
    rc = preset("moe-tiny")
    none, sel, full = (make_plan(rc, PlanInputs(**{**SMALL.__dict__, "activation_checkpointing": ac}))
                       for ac in ("none", "selective", "full"))
    assert none["activation_checkpointing"] == "none"  # the preset's default
    # selective: a block keeps the inputs of its attention norm, attention and FFN norm (3 x 128) and its MoE
    # (2084); the final norm its input and output (8 + 256 + 4*257 + 8). full: a block its input and routing
    # (128 + 8*2), the head as without
    assert sel["act_bytes_per_token"] == 2 * (384 + 352 + 2 * 866) + 1300 == 6236
    assert full["act_bytes_per_token"] == 2 * (128 + 16) + 1560 == 1848
    # recomputed forward FLOPs per token: selective the attention sub-layers (2 x 12288 params + scores and
    # values 2 x 64 x 4 x 32 per layer), full every block (2 x 99648 active non-embedding params + the same)
    tokens = 16 * 64
    assert sel["flops_recompute_per_step"] == tokens * 2 * (2 * 12288 + 2 * 64 * 4 * 32) == tokens * 81920
    assert full["flops_recompute_per_step"] == tokens * (2 * 99648 + 2 * 2 * 64 * 4 * 32) == tokens * 232064
    assert none["flops_recompute_per_step"] == 0 and sel["t_compute_s"] > none["t_compute_s"]
    # full AC dispatches and combines again in the recomputation
    assert full["a2a_bytes_per_step"] == 1.5 * none["a2a_bytes_per_step"] == sel["a2a_bytes_per_step"] * 1.5
    with pytest.raises(ConfigError, match="--activation-checkpointing: got 'some'; allowed: none, selective, full"):
        make_plan(rc, PlanInputs(gpus=4, activation_checkpointing="some"))


def test_more_gpus_shrink_memory_and_ep1_has_no_all_to_all():
    rc = preset("moe-1b")
    r8, r64 = (make_plan(rc, PlanInputs(gpus=g, ep=8)) for g in (8, 64))
    assert r64["mem_params_gib"] == pytest.approx(r8["mem_params_gib"] / 8)
    assert r64["flops_per_gpu_step"] == pytest.approx(r8["flops_per_gpu_step"] / 8)
    assert make_plan(rc, PlanInputs(gpus=8, ep=1))["a2a_bytes_per_step"] == 0


@pytest.mark.parametrize("gpus,ep,kw,match", [
    (64, 6, {}, r"--ep: got 6; allowed: a divisor of the preset's model.moe.n_experts=64 and a divisor of --gpus=64"),
    (48, 32, {}, r"--ep: got 32; allowed: a divisor of --gpus=48"),
    (64, 48, {}, r"--ep: got 48; allowed: a divisor of the preset's model.moe.n_experts=64"),
    (512, 8, {}, r"--batch / --micro-batch: .* 512 GPUs x 4 .*--micro-batch in \[1\], or --batch a multiple of 2048"),
    (8, 8, {"mfu": 1.5}, r"--mfu"),
])
def test_layouts_that_cannot_work_are_refused_naming_the_flag(gpus, ep, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(preset("moe-1b"), PlanInputs(gpus=gpus, ep=ep, **kw))


def test_dense_preset_refuses_ep():
    with pytest.raises(ConfigError, match="--ep: got 2; allowed: 1 for the dense preset"):
        make_plan(preset("1b"), PlanInputs(gpus=8, ep=2))


def test_cli(capsys):
    assert main(["plan", "--preset", "moe-1b", "--gpus", "64", "--ep", "8"]) == 0
    out = capsys.readouterr().out
    assert "moe-1b on 64 GPUs: ep 8 x dp_shard 8" in out and "all-to-all bytes" in out and "step time" in out
    assert main(["plan", "--preset", "moe-tiny", "--gpus", "4", "--ep", "2", "--seq", "64", "--micro-batch", "2",
                 "--batch", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["a2a_bytes_per_step"] > 0
    assert main(["plan", "--gpus", "64", "--ep", "6"]) == 2
    assert "--ep: got 6" in capsys.readouterr().err
    assert main(["plan", "--gpus", "8", "--ep", "8", "--activation-checkpointing", "full", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["activation_checkpointing"] == "full"
    none = make_plan(preset("moe-1b"), PlanInputs(gpus=8, ep=8))
    assert full["mem_activations_gib"] < none["mem_activations_gib"] / 10
    assert main(["plan", "--gpus", "64", "--ep", "6"]) == 2
    assert "--ep: got 6" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "moelab", "plan", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "example" in r.stdout and "moelab plan --preset moe-1b --gpus 64 --ep 8" in r.stdout
