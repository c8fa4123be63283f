"""FSDP2 + expert parallelism on CPU: gloo ranks on 127.0.0.1 against one process on the same global batch.

The rank functions (`_...`) run inside the ranks that `run_distributed` starts; the tests compare what they
return with a single-process computation.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distributed import free_port, run_distributed
from moelab.trainers.config import ConfigError, load_run_config
from moelab.trainers.loop import Trainer, train

TINY = {"train.batch_size": 4, "train.seq_len": 16, "train.log_every": 1, "train.eval_every": 0}


def _rc(**overrides):
    return load_run_config("moe-tiny", {**TINY, **overrides})


def _objective(model, tokens, rc):
    """The loop's objective: cross-entropy + aux and z losses (global balance statistics on many ranks)."""
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    layers = [m for _, m in model.moe_layers()]
    m = rc.model.moe
    return ce + m.aux_loss_coef * sum(l.aux_loss for l in layers) + m.z_loss_coef * sum(l.z_loss for l in layers)


def _skew(model, on: bool):
    """Route every token to experts 0..E/2-1 (the first EP rank's): the bias steers top-k selection only."""
    if on:
        for _, m in model.moe_layers():
            m.router.expert_bias[: m.n_experts // 2] = 100.0


def _batch(rc):
    from moelab.trainers.data import build_source

    return build_source(rc.data, 0).batch("train", 0, rc.train.batch_size, rc.train.seq_len).tokens


# -- EP: forward loss and every gradient ------------------------------------------------------------------


def _ep_grads(rank, world_size, ep, overrides):
    from moelab.trainers.model import build_model
    from moelab.trainers.parallel import full_tensor, init_parallel, parallelize

    rc = _rc(**overrides)
    par = init_parallel(ep, rc.model.moe.n_experts)
    out = []
    for skew in (False, True):
        model = build_model(rc.model, seed=0)
        _skew(model, skew)
        parallelize(model, par)
        obj = _objective(model, par.local_rows(_batch(rc)), rc)
        obj.backward()
        load = par.all_reduce(torch.stack([m.stats["load"] for _, m in model.moe_layers()]))
        grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}
        out.append({"loss": float(par.all_reduce(obj.detach(), "mean")), "grads": grads, "load": load})
    return out


@pytest.mark.parametrize("world_size,ep,overrides", [
    (2, 2, {}),
    # 2 x 2: experts split over ep and sharded by FSDP over dp_shard; shared expert, capacity drops.
    (4, 2, {"model.moe.n_shared": 1, "model.moe.capacity_factor": 1.0, "train.batch_size": 8}),
], ids=["ws2-ep2", "ws4-dp2-ep2"])
def test_ep_matches_single_process_loss_and_every_grad(world_size, ep, overrides):
    from moelab.trainers.model import build_model

    rc = _rc(**overrides)
    results = run_distributed(_ep_grads, world_size, ep, overrides)
    for case, skew in enumerate((False, True)):
        ref = build_model(rc.model, seed=0)
        _skew(ref, skew)
        obj = _objective(ref, _batch(rc), rc)
        obj.backward()
        obj = obj.detach()
        for rank, res in enumerate(results):
            got = res[case]
            assert abs(got["loss"] - float(obj)) < 1e-5, (rank, skew)
            for name, p in ref.named_parameters():
                assert got["grads"][name].shape == p.grad.shape, name
                torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=0, msg=f"{name} rank {rank}")
        if skew:  # the second EP rank's experts really received no token, and got zero gradients
            n = rc.model.moe.n_experts // 2
            assert results[0][case]["load"][:, n:].sum() == 0
            assert results[0][case]["load"][:, :n].sum() > 0
            assert float(results[0][case]["grads"]["layers.0.ffn.w_down"][n:].abs().max()) == 0.0


# EP dispatch alone, awkward shapes: 2 ranks of 2 experts each (E = 4, k = 3), token counts that differ between
# the ranks and divide by nothing, dropped slots (-1), experts that receive no slot at all.
_AWKWARD = {
    "uneven-T-dropped-expert3-idle": dict(T=(7, 5), never=(3,), drop=0.25),
    "rank1-receives-nothing": dict(T=(5, 3), never=(2, 3), drop=0.2),
    "rank1-sends-nothing": dict(T=(6, 1), never=(), drop=0.0, all_dropped_rank=1),
}


def _awkward_inputs(case: dict, seed: int = 0):
    """Global inputs for one case, drawn alike on every rank: x [T, 12], w_gate_up [4, 20, 12], w_down
    [4, 12, 10], topk_idx [T, 3] (distinct experts per token, some -1), topk_weight [T, 3], gout [T, 12]."""
    g = torch.Generator().manual_seed(seed)
    T, E, k, d, de = sum(case["T"]), 4, 3, 12, 10
    allowed = [e for e in range(E) if e not in case["never"]]
    idx = torch.stack([torch.tensor(allowed)[torch.randperm(len(allowed), generator=g)[:k]] if len(allowed) >= k
                       else torch.tensor(allowed + [-1] * (k - len(allowed))) for _ in range(T)])
    idx = torch.where(torch.rand(T, k, generator=g) < case["drop"], -1, idx)
    if "all_dropped_rank" in case:
        lo = sum(case["T"][:case["all_dropped_rank"]])
        idx[lo:lo + case["T"][case["all_dropped_rank"]]] = -1
    return (torch.randn(T, d, generator=g), torch.randn(E, 2 * de, d, generator=g) * 0.3,
            torch.randn(E, d, de, generator=g) * 0.3, idx, torch.rand(T, k, generator=g),
            torch.randn(T, d, generator=g))


def _ep_experts_awkward(rank, world_size, name):
    from moelab.trainers.parallel import MoEParallel, init_parallel

    case = _AWKWARD[name]
    x, wgu, wdn, idx, tw, gout = _awkward_inputs(case)
    rows = slice(sum(case["T"][:rank]), sum(case["T"][:rank + 1]))
    mine = slice(2 * rank, 2 * rank + 2)  # this rank's experts
    leaves = [t.clone().requires_grad_() for t in (x[rows], wgu[mine], wdn[mine], tw[rows])]
    out = MoEParallel(init_parallel(2, 4), 4).experts(leaves[0], leaves[1], leaves[2], idx[rows], leaves[3])
    (out * gout[rows]).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("name", list(_AWKWARD))
def test_ep_dispatch_matches_one_device_on_awkward_shapes(name):
    from moelab.kernels import moe_experts

    case = _AWKWARD[name]
    x, wgu, wdn, idx, tw, gout = [t.clone() for t in _awkward_inputs(case)]
    leaves = [t.requires_grad_() for t in (x, wgu, wdn, tw)]
    ref = moe_experts(leaves[0], leaves[1], leaves[2], idx, leaves[3], backend="reference")
    (ref * gout).sum().backward()
    for e in case["never"]:  # the case really leaves these experts idle
        assert not (idx == e).any()
    results = run_distributed(_ep_experts_awkward, 2, name)
    for rank, (out, (dx, dwgu, dwdn, dtw)) in enumerate(results):
        rows = slice(sum(case["T"][:rank]), sum(case["T"][:rank + 1]))
        mine = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(out, ref.detach()[rows], atol=1e-5, rtol=1e-5, msg=f"out, rank {rank}")
        torch.testing.assert_close(dx, x.grad[rows], atol=1e-5, rtol=1e-5, msg=f"dx, rank {rank}")
        torch.testing.assert_close(dtw, tw.grad[rows], atol=1e-5, rtol=1e-5, msg=f"d topk_weight, rank {rank}")
        # An expert's gradient sums the slots of every rank (the all_to_all backward brings them home).
        torch.testing.assert_close(dwgu, wgu.grad[mine], atol=1e-5, rtol=1e-5, msg=f"dw_gate_up, rank {rank}")
        torch.testing.assert_close(dwdn, wdn.grad[mine], atol=1e-5, rtol=1e-5, msg=f"dw_down, rank {rank}")
    if name == "rank1-receives-nothing":  # its experts got exact zero gradients, still defined (FSDP needs them)
        assert float(results[1][1][1].abs().max()) == 0.0 and float(results[1][1][2].abs().max()) == 0.0


# -- FSDP: optimiser steps -------------------------------------------------------------------------------


def _fsdp_steps(rank, world_size, overrides, out):
    from moelab.trainers.loop import StepStats
    from moelab.trainers.parallel import full_tensor, init_parallel

    rc = _rc(**overrides)
    tr = Trainer(rc, out, parallel=init_parallel(1, rc.model.moe.n_experts), progress=False)
    losses = [tr.train_step(StepStats())["loss"] for _ in range(rc.train.steps)]
    params = {n: full_tensor(p.detach()).clone() for n, p in tr.model.named_parameters()}
    biases = {n: b.clone() for n, b in tr.model.named_buffers() if n.endswith("expert_bias")}
    return losses, params, biases


def test_fsdp2_three_steps_match_single_process(tmp_path):
    from moelab.trainers.loop import StepStats

    # Clipping active (small grad_clip), aux-loss-free biases moving, two micro-steps per optimiser step:
    # 2 ranks x 1 sequence per micro-step = one process at micro-batch 2.
    ov = {"train.steps": 3, "optim.grad_clip": 0.5, "model.moe.bias_update_rate": 0.01, "optim.warmup_steps": 0}
    results = run_distributed(_fsdp_steps, 2, {**ov, "train.micro_batch_size": 1}, str(tmp_path / "ws2"))
    single = Trainer(_rc(**{**ov, "train.micro_batch_size": 2}), tmp_path / "ws1", progress=False)
    ref_losses = [single.train_step(StepStats())["loss"] for _ in range(3)]
    for losses, params, biases in results:
        assert losses == pytest.approx(ref_losses, abs=1e-5)
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(params[name], p.detach(), atol=1e-5, rtol=0, msg=name)
        for name, b in single.model.named_buffers():
            if name.endswith("expert_bias"):
                assert torch.equal(biases[name], b), name
    assert any(float(b.abs().sum()) > 0 for b in results[0][2].values())  # the biases did move


# -- DCP: save at one layout, load at another --------------------------------------------------------------


def _train_and_keep(rank, world_size, ep, out, keep, resume):
    """Train 4 steps (checkpoint every 3); rank 0 copies the step-3 checkpoint to `keep`. Returns the
    full parameters at step 3 and the loss of step 4."""
    from moelab.trainers.parallel import full_tensor, init_parallel

    rc = _rc(**{"train.steps": 4, "train.ckpt_every": 3, "train.ep": ep, "model.moe.bias_update_rate": 0.01})
    at3 = {}

    def report(row, ckpt):
        if row["step"] == 3:
            at3.update({n: full_tensor(p.detach()).clone() for n, p in tr.model.named_parameters()})
            at3.update({n: b.clone() for n, b in tr.model.named_buffers() if n.endswith("expert_bias")})
            if rank == 0 and keep:
                shutil.copytree(ckpt, keep)

    tr = Trainer(rc, out, parallel=init_parallel(ep, 8), progress=False, report=report)
    if resume:
        tr.load_checkpoint(resume)
    start = tr.step
    return start, tr.run()["loss"], at3


def test_dcp_checkpoint_saved_at_ws2_ep2_loads_at_ws1_and_ws2_ep1(tmp_path):
    keep = tmp_path / "step3"
    (start, loss4, at3), _ = run_distributed(_train_and_keep, 2, 2, str(tmp_path / "a"), str(keep), None)
    assert start == 0 and (keep / ".metadata").exists() and (keep / "meta.json").exists()
    assert sorted(p.name for p in keep.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded
    assert json.loads((keep / "meta.json").read_text())["step"] == 3

    rc = _rc(**{"train.steps": 4, "train.ckpt_every": 3, "model.moe.bias_update_rate": 0.01})
    tr = Trainer(rc, tmp_path / "b", progress=False)
    tr.load_checkpoint(keep)
    assert tr.step == 3
    state = dict(tr.model.named_parameters())
    state.update({n: b for n, b in tr.model.named_buffers() if n.endswith("expert_bias")})
    assert set(state) == set(at3)
    for name, value in at3.items():
        assert torch.equal(state[name].detach(), value), name
    assert tr.run()["loss"] == pytest.approx(loss4, abs=1e-5)

    # The same checkpoint at 2 ranks without EP, and a single process's checkpoint.pt at 2 ranks with EP.
    (start, loss_ep1, _), _ = run_distributed(_train_and_keep, 2, 1, str(tmp_path / "c"), None, str(keep))
    assert start == 3 and loss_ep1 == pytest.approx(loss4, abs=1e-5)
    Trainer(_rc(**{"train.steps": 3, "model.moe.bias_update_rate": 0.01}), tmp_path / "d", progress=False).run()
    (start, loss_pt, _), _ = run_distributed(_train_and_keep, 2, 2, str(tmp_path / "e"), None,
                                              str(tmp_path / "d" / "checkpoint.pt"))
    assert start == 3 and loss_pt == pytest.approx(loss4, abs=1e-5)


# -- torchrun ----------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_ep2_matches_single_process(tmp_path):
    args = ["--preset", "moe-tiny", "--steps", "5", "--train.batch_size", "4", "--train.seq_len", "32",
            "--train.log_every", "1", "--train.eval_every", "0", "--train.ckpt_every", "0"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), "-m", "moelab", "train"]
    r = subprocess.run(torchrun + args + ["--ep", "2", "--out", str(tmp_path / "tr"), "--metrics-jsonl",
                                          str(tmp_path / "tr.jsonl")],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("moelab train: preset") == 1  # rank 0 alone prints
    assert "2 ranks (ep 2 x dp_shard 1)" in r.stdout
    assert (tmp_path / "tr" / "ckpt-00000005" / "meta.json").exists()
    r1 = subprocess.run([sys.executable, "-m", "moelab", "train"] + args +
                        ["--ep", "1", "--out", str(tmp_path / "one"), "--metrics-jsonl", str(tmp_path / "one.jsonl")],
                        capture_output=True, text=True, env=env, timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "tr.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-4)
    assert rows[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], abs=1e-4)
    flat = lambda load: [x for layer in load for x in layer]  # noqa: E731
    assert flat(rows[-1]["expert_load"]) == pytest.approx(flat(ref[-1]["expert_load"]), abs=1e-6)  # all ranks
    # per-domain routing counts: each rank tallies its rows, the all-reduce gives the single process's counts
    assert [r["expert_domain"] for r in rows] == [r["expert_domain"] for r in ref]


# -- layouts that cannot work -------------------------------------------------------------------------------


def test_bad_layouts_are_refused_naming_the_field(tmp_path):
    from moelab.trainers.parallel import check_layout

    with pytest.raises(ConfigError, match=r"train.ep .*divisor of model.moe.n_experts=8"):
        check_layout(6, 3, 8)
    with pytest.raises(ConfigError, match=r"train.ep .*divisor of the world size 4"):
        check_layout(4, 8, 8)
    assert check_layout(8, 4, 8) == 2
    with pytest.raises(ConfigError, match=r"train.ep: got 3; allowed: 1, or a divisor of model.moe.n_experts=8"):
        _rc(**{"train.ep": 3})
    with pytest.raises(ConfigError, match="single process"):
        Trainer(_rc(**{"train.ep": 2}), tmp_path, progress=False)
    r = subprocess.run([sys.executable, "-m", "moelab", "train", "--preset", "tiny", "--ep", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "train.ep" in r.stderr
