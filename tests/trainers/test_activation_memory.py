"""Activation checkpointing (`trainers/ac.py`) and `moelab plan`'s activation bytes against what autograd keeps.

Two claims. (1) Checkpointing changes memory, not results: losses, every gradient and the MoE statistics
(load counters of the aux-loss-free bias, per-domain routing) equal those without it, in one process and on
2 gloo ranks with EP + FSDP2. (2) `plan.activation_bytes` is what autograd keeps: a `saved_tensors_hooks`
counter (`SavedBytes`) sums the unique storages of every tensor the graph still holds after the forward
(parameters and buffers excluded, views of one storage counted once), plus the routing `MoE.stats` keeps.
The counts run in bf16 as a GPU run under FSDP2 does (bf16 parameters, fp32 router), on the CPU code path
(reference expert kernel, CPU flash attention): `activation_bytes(device="cpu")`. The plan's per-token terms
dominate at these shapes (T = 256 tokens and up per count); the fixed ones (per-expert vectors, an extra zero
row) stay under 1%.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from moelab.trainers.ac import apply_ac
from moelab.trainers.config import ConfigError, load_run_config
from moelab.trainers.model import build_model
from moelab.trainers.moe import MoE
from moelab.trainers.plan import activation_bytes

MODES = ("none", "selective", "full")
# GQA with full QK-norm, softmax top-2 renormalised, capacity drops; layer 0 dense.
GQA = ("moe-tiny", {"model.qk_norm": "full", "model.moe.capacity_factor": 1.0, "model.moe.dense_layers": [0],
                    "model.moe.bias_update_rate": 0.01})
# MLA (v_head_dim = qk_nope + qk_rope: the CPU flash kernel needs equal widths), DeepSeek-V3 routing (sigmoid,
# 2 of 4 groups, x 2.5), a gated shared expert, the sequence-wise loss, an MTP module; layer 0 dense.
MLA = ("moe-tiny", {"model.attention": "mla", "model.n_kv_heads": 0, "model.q_lora_rank": 32,
                    "model.kv_lora_rank": 40, "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8,
                    "model.v_head_dim": 24, "model.mtp_depth": 1, "model.moe.score_func": "sigmoid",
                    "model.moe.n_group": 4, "model.moe.topk_group": 2, "model.moe.routed_scaling_factor": 2.5,
                    "model.moe.n_shared": 1, "model.moe.shared_gate": True, "model.moe.seq_aux_loss_coef": 0.1,
                    "model.moe.bias_update_rate": 0.01, "model.moe.dense_layers": [0]})


def _rc(case, count=False):
    """count: for the memory counts, a capacity that drops no slot (the plan counts every slot as kept), still
    through the capacity path."""
    name, ov = case
    more = {"model.moe.capacity_factor": 8.0} if count and ov.get("model.moe.capacity_factor") else {}
    return load_run_config(name, {"train.seq_len": 64, **ov, **more})


def _objective(model, tokens, rc):
    """The loop's objective (`Trainer._loss`): cross-entropy, balance and z losses, the MTP loss."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    logits = model(inp, tgt) if rc.model.mtp_depth else model(inp)
    obj = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    m, losses = rc.model.moe, model.moe_losses()
    obj = obj + m.aux_loss_coef * losses["aux_loss"] + m.z_loss_coef * losses["z_loss"]
    obj = obj + m.seq_aux_loss_coef * losses["seq_aux_loss"]
    if model.mtp_ce:
        obj = obj + rc.train.mtp_loss_weight * sum(model.mtp_ce) / len(model.mtp_ce)
    return obj


def _tokens(rc, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rc.model.vocab_size, (batch, rc.train.seq_len + 1), generator=g)


# -- (1) same losses, gradients and statistics -----------------------------------------------------------


def _step(rc, mode, tokens):
    model = apply_ac(build_model(rc.model, seed=0), mode)
    obj = _objective(model, tokens, rc)
    obj.backward()
    moe = [m for _, m in model.moe_layers()]
    return (float(obj.detach()), {n: p.grad.clone() for n, p in model.named_parameters()},
            [m.load_accum.clone() for m in moe], [m.stats["topk_idx"].clone() for m in moe])


@pytest.mark.parametrize("case", [GQA, MLA], ids=["gqa", "mla-dsv3-mtp"])
def test_checkpointing_changes_no_loss_gradient_or_statistic(case):
    rc = _rc(case)
    tokens = _tokens(rc, 4)
    ref = _step(rc, "none", tokens)
    T = 4 * rc.train.seq_len
    for mode in ("selective", "full"):
        loss, grads, loads, idx = _step(rc, mode, tokens)
        assert loss == ref[0], mode
        for name, g in ref[1].items():  # the recomputation runs the same kernels on the same inputs: bit-exact
            assert torch.equal(grads[name], g), (mode, name)
        for got, want, routing in zip(loads, ref[2], idx):
            # the load counter (aux-loss-free bias) counted each forward once: the kept slots of this batch
            assert torch.equal(got, want), mode
            assert float(got.sum()) == float((routing >= 0).sum()) <= T * rc.model.moe.top_k
        assert all(torch.equal(a, b) for a, b in zip(idx, ref[3])), mode  # per-domain counts read these


def test_compiled_blocks_recompute_without_counting_twice(tmp_path, monkeypatch):
    """train.compile with checkpointing: each block compiles to one graph (no break at the checkpoint over the
    MoE's side effects), which recomputes by itself; the objective and the load counters match the eager
    model without checkpointing."""
    from torch._dynamo.utils import counters

    from moelab.trainers.loop import COMPILE_BACKEND_ENV, Trainer

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")  # the graphs without code generation
    counters.clear()
    tokens = _tokens(_rc(GQA), 2)
    got = {}
    for mode, compile_ in (("none", False), ("full", True)):
        rc = load_run_config("moe-tiny", {"train.seq_len": 64, "train.compile": compile_,
                                          "train.activation_checkpointing": mode})
        tr = Trainer(rc, tmp_path / mode, progress=False)
        obj = tr._loss(tokens)[0]
        obj.backward()
        got[mode] = (float(obj.detach()), [m.load_accum.clone() for _, m in tr.model.moe_layers()],
                     tr.model.layers[0].attn.wq.weight.grad.clone())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert got["full"][0] == pytest.approx(got["none"][0], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got["full"][1], got["none"][1]))
    assert float(got["full"][1][0].sum()) == 2 * 64 * 2
    torch.testing.assert_close(got["full"][2], got["none"][2], rtol=1e-4, atol=1e-6)


def test_eval_forward_and_model_surface_unchanged():
    rc = _rc(MLA)
    plain, ckpt = build_model(rc.model, seed=0), apply_ac(build_model(rc.model, seed=0), "full")
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # checkpoints load either way
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    assert len(ckpt.moe_layers()) == len(plain.moe_layers()) == 2
    tokens = _tokens(rc, 2)[:, :-1]
    with torch.no_grad():
        assert torch.equal(ckpt(tokens), plain(tokens))
    with pytest.raises(ValueError, match="applied already"):
        apply_ac(ckpt, "selective")
    with pytest.raises(ValueError, match="allowed: none, selective, full"):
        apply_ac(plain, "some")
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: got 'blocks'; allowed: 'none', "
                                          r"'selective', 'full'"):
        load_run_config("moe-tiny", {"train.activation_checkpointing": "blocks"})


# -- (2) what autograd keeps -------------------------------------------------------------------------------


class _Held:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedBytes:
    """While active, every tensor autograd saves goes through `pack` into a holder the graph owns; `nbytes()`
    sums the storages of the holders still alive (a node freed with its graph, e.g. a discarded top-k's, takes
    its holder along), each storage once, parameters and buffers (`exclude`) not counted. Tensors saved inside
    a checkpointed region go to the checkpoint's own hooks and are not seen: they are not kept."""

    def __init__(self, exclude):
        self.exclude = {_local(t).untyped_storage().data_ptr() for t in exclude}
        self.held: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t)

    def _pack(self, t):
        h = _Held(t)
        self.held.append(weakref.ref(h))
        return h

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def nbytes(self, also=()) -> int:
        storages = {}
        for t in [*(h().t for h in self.held if h() is not None), *also]:
            st = t.untyped_storage()
            if st.data_ptr() not in self.exclude and st.nbytes():
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _bf16(model):
    """The model as FSDP2's bf16 mixed precision runs it: bf16 parameters, the router and RoPE tables fp32."""
    model.to(torch.bfloat16)
    model.rope_cos.data = model.rope_cos.float()
    model.rope_sin.data = model.rope_sin.float()
    for _, m in model.moe_layers():
        m.router.float()
    return model


def _routing_kept(model):
    """What MoE.stats keeps of the last forward: the [T, k] routing the loop reads after the backward."""
    return [m.stats["topk_idx"] for _, m in model.moe_layers()]


def _block_bytes_per_token(model, i, batch, seed=0):
    """Bytes kept per token by block i of `model` (main layers, then MTP blocks) on a fresh bf16 input."""
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    d, S = model.cfg.d_model, 128
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, S, d, generator=g).to(torch.bfloat16).requires_grad_()
    with SavedBytes([*model.parameters(), *model.buffers()]) as sb:
        y = blocks[i](x, model.rope_cos, model.rope_sin)  # held: its graph holds what is counted
    ffn = blocks[i].ffn
    n = sb.nbytes([ffn.stats["topk_idx"]] if isinstance(ffn, MoE) else [])
    del y
    return n / (batch * S)


@pytest.mark.parametrize("case", [GQA, MLA], ids=["gqa", "mla-dsv3-mtp"])
@pytest.mark.parametrize("mode", MODES)
def test_plan_block_bytes_equal_the_saved_tensors(case, mode):
    rc = _rc(case, count=True)
    model = _bf16(apply_ac(build_model(rc.model, seed=0), mode))
    want = activation_bytes(rc.model, ac=mode, device="cpu")["layers"]
    for i in range(rc.model.n_layers):  # layer 0 dense, layer 1 MoE
        got = _block_bytes_per_token(model, i, batch=2)
        assert got == pytest.approx(want[i], rel=0.02), (mode, i, got, want[i])


@pytest.mark.parametrize("case", [GQA, MLA], ids=["gqa", "mla-dsv3-mtp"])
@pytest.mark.parametrize("mode", MODES)
def test_plan_model_bytes_equal_the_saved_tensors(case, mode):
    """The whole forward and loss: blocks, final norm and head, MTP module, token ids and targets."""
    rc = _rc(case, count=True)
    model = _bf16(apply_ac(build_model(rc.model, seed=0), mode))
    tokens = _tokens(rc, 4)
    with SavedBytes([*model.parameters(), *model.buffers()]) as sb:
        obj = _objective(model, tokens, rc)  # held: its graph holds what is counted
    got = sb.nbytes(_routing_kept(model)) / (4 * rc.train.seq_len)
    del obj
    want = activation_bytes(rc.model, ac=mode, device="cpu")["total"]
    assert got == pytest.approx(want, rel=0.02), (got, want)


# -- expert parallelism: 2 gloo ranks --------------------------------------------------------------------------


def _ep_rank(rank, world_size, cases, out_dir):
    """Per case and mode: (a) EP + FSDP2 in fp32: the objective, every full gradient, the load counters; (b) EP
    alone in bf16: the bytes the MoE block keeps and its tokens (FSDP changes where parameters live, not what
    the activations are)."""
    from moelab.trainers.loop import StepStats, Trainer
    from moelab.trainers.parallel import apply_ep, full_tensor, init_parallel, parallelize

    out = {}
    par = init_parallel(2, 8)  # ep 2: the 8 experts of either case, 4 per rank
    for key, case in cases.items():
        rc = _rc(case, count=True)
        tokens = par.local_rows(_tokens(rc, 4))
        for mode in MODES:
            model = parallelize(apply_ac(build_model(rc.model, seed=0), mode), par)
            obj = _objective(model, tokens, rc)
            obj.backward()
            grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}
            loads = par.all_reduce(torch.stack([m.load_accum for _, m in model.moe_layers()]))
            model = apply_ep(_bf16(apply_ac(build_model(rc.model, seed=0), mode)), par)
            n, T = _block_bytes_per_token(model, 1, batch=2, seed=rank), 2 * 128
            out[key, mode] = float(par.all_reduce(obj.detach(), "mean")), grads, loads, n * T, T
    # The loop's own wiring (AC on the meta model, then EP + FSDP2): two optimiser steps of two micro-steps, the
    # aux-loss-free biases moving.
    for mode in ("none", "full"):
        rc = load_run_config("moe-tiny", {**MLA[1], "train.seq_len": 32, "train.batch_size": 4, "train.steps": 2,
                                          "train.micro_batch_size": 1, "train.ep": 2, "train.log_every": 1,
                                          "train.eval_every": 0, "train.activation_checkpointing": mode})
        tr = Trainer(rc, out_dir, parallel=par, progress=False)
        losses = [tr.train_step(StepStats())["loss"] for _ in range(2)]
        out["trainer", mode] = losses, [m.router.expert_bias.clone() for _, m in tr.model.moe_layers()]
    return out


def test_ep_two_ranks_same_gradients_and_plan_bytes(tmp_path):
    """EP 2 (+ FSDP2 over both ranks): checkpointing changes no loss, gradient or load counter; the MoE block
    keeps what `activation_bytes(ep=True)` says, summed over the ranks (every slot is received by one rank,
    so the received rows total the sent ones whatever the routing)."""
    res = run_distributed(_ep_rank, 2, {"gqa": GQA, "mla": MLA}, str(tmp_path))
    for r in res:
        assert r["trainer", "full"][0] == r["trainer", "none"][0]
        assert all(torch.equal(a, b) for a, b in zip(r["trainer", "full"][1], r["trainer", "none"][1]))
        assert any(float(b.abs().sum()) > 0 for b in r["trainer", "none"][1])  # the biases did move
    for case, key in ((GQA, "gqa"), (MLA, "mla")):
        rc = _rc(case, count=True)
        # every slot of the batch (4 rows; MTP depth j has S - j positions), no drops
        S, L = rc.train.seq_len, rc.model.n_layers
        positions = [S if i < L else S - (i - L + 1) for i, _ in build_model(rc.model).moe_layers()]
        for mode in MODES:
            for rank, r in enumerate(res):
                loss, grads, loads, _, _ = r[key, mode]
                ref = r[key, "none"]
                assert loss == ref[0], (key, mode, rank)
                for name, g in ref[1].items():
                    assert torch.equal(grads[name], g), (key, mode, name, rank)
                assert torch.equal(loads, ref[2]), (key, mode, rank)
                assert loads.sum(1).tolist() == [4 * p * rc.model.moe.top_k for p in positions], (key, mode)
            got = sum(r[key, mode][3] for r in res) / sum(r[key, mode][4] for r in res)
            want = activation_bytes(rc.model, ep=True, ac=mode, device="cpu")["layers"][1]
            assert got == pytest.approx(want, rel=0.02), (key, mode, got, want)
