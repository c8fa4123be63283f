"""FSDP2 with bf16 parameters (`apply_fsdp(param_dtype=bf16)`, what a CUDA run uses) on 2 gloo ranks, against
one process under bf16 autocast with fp32 weights, on the same global batch.

What must stay fp32 under FSDP's mixed precision, as in the single process: the RoPE tables (FSDP casts the
floating arguments of a unit's forward, and the blocks take the tables as arguments) and the router (its
logits choose the experts). The rest runs in bf16 on both sides, with roundings in different places (FSDP's
residual stream is bf16, autocast's fp32), so the runs agree to bf16 tolerance, not exactly.
"""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from moelab.trainers.config import load_run_config

CASES = {
    "moe-tiny": ("moe-tiny", {}),
    # MLA attention (decoupled rope key) and an MTP module whose block is an MoE block.
    "mla-mtp-moe": ("mla-mtp-tiny", {"model.moe.n_experts": 8, "model.moe.top_k": 2}),
}
STEPS = 3


def _rc(case):
    preset, overrides = CASES[case]
    return load_run_config(preset, {"train.batch_size": 4, "train.seq_len": 16, "optim.warmup_steps": 0,
                                    "optim.lr": 3e-3, **overrides})


def _batch(rc, step):
    from moelab.trainers.data import build_source

    return build_source(rc.data, 0).batch("train", step, rc.train.batch_size, rc.train.seq_len).tokens


def _watch(model):
    """Forward hooks recording what the attention layers got as RoPE tables and what each router computed:
    {"rope": [(cos, sin) per attention call], "router": [(module, x, logits) per router call]}."""
    from moelab.trainers.model import MLA, Attention
    from moelab.trainers.moe import Router

    seen = {"rope": [], "router": []}
    for m in model.modules():
        if isinstance(m, (Attention, MLA)):
            m.register_forward_pre_hook(lambda mod, args: seen["rope"].append((args[1], args[2])))
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, args, out: seen["router"].append((mod, args[0].detach(),
                                                                                   out[0].detach())))
    return seen


def _check_fp32(seen, model, router_weights):
    """The tables as the model holds them (fp32), and router logits equal to an fp32 matmul of the router's
    input with its fp32 (master) weight."""
    assert seen["rope"] and seen["router"]
    for cos, sin in seen["rope"]:
        assert cos.dtype == sin.dtype == torch.float32
        assert torch.equal(cos, model.rope_cos) and torch.equal(sin, model.rope_sin)
    for mod, x, logits in seen["router"]:
        assert logits.dtype == torch.float32
        want = F.linear(x.float(), router_weights[id(mod)])
        torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-6)


def _train(model, rc, rows, steps, fsdp_mean=None):
    """`steps` AdamW steps on the loop's objective under bf16 autocast. Returns (logits of the first forward
    [B', S, V] float, the cross-entropy of every step, over the global batch)."""
    from moelab.trainers.optim import build_optimizer

    opt = build_optimizer(model, rc.optim)
    m = rc.model.moe
    first, losses = None, []
    for step in range(steps):
        tokens = rows(_batch(rc, step))
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inp, tgt) if rc.model.mtp_depth else model(inp)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        layers = [l for _, l in model.moe_layers() if l.aux_loss is not None]
        obj = ce + sum(m.aux_loss_coef * l.aux_loss + m.z_loss_coef * l.z_loss for l in layers)
        if rc.model.mtp_depth:
            obj = obj + rc.train.mtp_loss_weight * sum(model.mtp_ce) / len(model.mtp_ce)
        obj.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first is None:
            first = logits.detach().float()
        losses.append(float(fsdp_mean(ce.detach()) if fsdp_mean else ce.detach()))
    return first, losses


def _fsdp_bf16(rank, world_size, case, ep):
    from moelab.trainers.model import build_model
    from moelab.trainers.moe import Router
    from moelab.trainers.parallel import full_tensor, init_parallel, parallelize

    rc = _rc(case)
    par = init_parallel(ep, rc.model.moe.n_experts)
    model = parallelize(build_model(rc.model, seed=0), par, torch.bfloat16)
    seen = _watch(model)
    weights = {id(r): full_tensor(r.weight.detach()) for r in model.modules() if isinstance(r, Router)}
    assert all(w.dtype == torch.float32 for w in weights.values())
    logits, losses = _train(model, rc, par.local_rows, 1, lambda t: par.all_reduce(t, "mean"))
    _check_fp32(seen, model, weights)
    _, more = _train(model, rc, par.local_rows, STEPS, lambda t: par.all_reduce(t, "mean"))
    return logits, losses + more


@pytest.mark.parametrize("case,ep", [("moe-tiny", 1), ("moe-tiny", 2), ("mla-mtp-moe", 1)])
def test_fsdp_bf16_params_keep_rope_and_router_fp32_and_match_one_process(case, ep):
    from moelab.trainers.model import build_model
    from moelab.trainers.moe import Router

    rc = _rc(case)
    ref = build_model(rc.model, seed=0)
    seen = _watch(ref)
    weights = {id(r): r.weight.detach().clone() for r in ref.modules() if isinstance(r, Router)}
    ref_logits, ref_losses = _train(ref, rc, lambda t: t, 1)
    _check_fp32(seen, ref, weights)  # one process too: the router outside autocast
    _, more = _train(ref, rc, lambda t: t, STEPS)
    ref_losses += more

    results = run_distributed(_fsdp_bf16, 2, case, ep)
    got_logits = torch.cat([r[0] for r in results])  # rank r holds rows [r B/2, (r+1) B/2)
    # bf16 tolerance: logits of size ~3 carry bf16 roundings (2^-8 relative) from a dozen matmuls and norms.
    torch.testing.assert_close(got_logits, ref_logits, atol=0.05, rtol=0.02)
    for _, losses in results:
        assert losses == pytest.approx(ref_losses, abs=0.02)
