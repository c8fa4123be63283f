"""Multi-token prediction (DeepSeek-V3 §2.2): the loss against modules run by hand on the raw batch, gradients
into the shared head and embedding, the training loop's objective, metrics and evaluation, accounting,
checkpoints, upcycling, and EP + FSDP on two gloo ranks."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, load_run_config
from moelab.trainers.model import build_model
from moelab.trainers.moe import MoE


def _cfg(**kw):
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, mtp_depth=2)
    base.update(kw)
    return ModelConfig(**base).validate()


def _manual_mtp(model, batch):
    """batch: [B, S+1]. Depth j at position t reads the main model's hidden at t (before the final norm) or the
    previous depth's, and the embedding of batch[t+j]; its target is batch[t+j+1]. Returns [CE_1, .., CE_D]."""
    S = batch.shape[1] - 1
    cos, sin = model.rope_cos, model.rope_sin
    h = model.embed(batch[:, :S])
    for layer in model.layers:
        h = layer(h, cos, sin)
    out = []
    for j, m in enumerate(model.mtp, start=1):
        n = S - j  # positions t = 0 .. S-1-j have a target batch[t+j+1] inside the batch
        e = model.embed(batch[:, j:j + n])
        x = m.proj(torch.cat([m.embed_norm(e), m.hidden_norm(h[:, :n])], dim=-1))
        h = m.block(x, cos, sin)
        logits = model.lm_head(m.out_norm(h))
        out.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, j + 1:j + 1 + n].reshape(-1)))
    return out


@pytest.mark.parametrize("kw", [dict(mtp_depth=1), dict(mtp_depth=2),
                                dict(mtp_depth=2, moe=MoEConfig(n_experts=4, top_k=2)),
                                dict(mtp_depth=1, attention="mla", q_lora_rank=8)],
                         ids=["D1", "D2", "D2-moe", "D1-mla"])
def test_mtp_losses_equal_modules_run_by_hand(kw):
    model = build_model(_cfg(**kw), seed=0)
    batch = torch.randint(0, 40, (3, 13))
    logits = model(batch[:, :-1], batch[:, 1:])
    assert logits.shape == (3, 12, 40)
    got = model.mtp_ce
    want = _manual_mtp(model, batch)
    assert len(got) == kw["mtp_depth"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # without targets the logits are the same and no MTP loss is computed
    torch.testing.assert_close(model(batch[:, :-1]), logits)
    assert model.mtp_ce == []


def test_mtp_blocks_follow_the_last_layer_and_join_moe_layers():
    moe = MoEConfig(n_experts=4, top_k=2)
    m = build_model(_cfg(moe=moe), seed=0)
    assert all(isinstance(x.block.ffn, MoE) for x in m.mtp)
    assert [i for i, _ in m.moe_layers()] == [0, 1, 2, 3]  # main layers 0, 1; MTP depths 1, 2 as 2, 3
    dense_last = build_model(_cfg(moe=dataclasses.replace(moe, dense_layers=(1,))), seed=0)
    assert not any(isinstance(x.block.ffn, MoE) for x in dense_last.mtp)
    assert [i for i, _ in dense_last.moe_layers()] == [0]


def test_mtp_gradient_reaches_shared_head_and_embedding_not_final_norm():
    model = build_model(_cfg(mtp_depth=1), seed=0)
    S = 10
    batch = torch.arange(S + 1).view(1, -1) % 40  # every token id once: the last input token is id S-1
    model(batch[:, :-1], batch[:, 1:])
    sum(model.mtp_ce).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    # Input token S-1 reaches the trunk only at the last position, which depth 1 does not read (no target):
    # its embedding row gets a gradient only through the MTP module's own embedding input.
    assert model.embed.weight.grad[S - 1].abs().sum() > 0
    assert model.layers[0].attn.wq.weight.grad.abs().sum() > 0  # the trunk is trained by MTP too (h^0)
    # h^0 is taken before the final norm, so the main model's final norm gets nothing from the MTP loss
    assert model.norm.weight.grad is None or float(model.norm.weight.grad.abs().sum()) == 0.0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.mtp.named_parameters()
               if not n.endswith("bias")), "every MTP parameter is trained"


def test_mtp_param_counts_separate_key():
    cfg = _cfg(mtp_depth=2, moe=MoEConfig(n_experts=4, top_k=2))
    model = build_model(cfg)
    pc = cfg.param_counts()
    assert pc["total"] == sum(p.numel() for p in model.parameters())
    assert pc["mtp"] == sum(p.numel() for p in model.mtp.parameters())
    main = _cfg(mtp_depth=0, moe=MoEConfig(n_experts=4, top_k=2)).param_counts()
    assert pc["total"] - pc["mtp"] == main["total"]
    assert pc["active"] - pc["mtp_active"] == main["active"]
    assert pc["routed_experts"] == 2 * main["routed_experts"]  # 2 MTP MoE blocks next to 2 main ones
    # FLOPs: each depth adds 6 x its active parameters, one more head matmul and one more attention layer
    s = 16
    extra = 6 * (pc["mtp_active"] + 2 * 40 * 32) + 2 * 12 * s * 4 * 8
    assert cfg.flops_per_token(s) == pytest.approx(_cfg(mtp_depth=0, moe=cfg.moe).flops_per_token(s) + extra)


def _rc(preset="tiny", **over):
    base = {"train.log_every": 1, "train.eval_every": 3, "train.batch_size": 4, "train.seq_len": 16,
            "train.steps": 3, "train.ckpt_every": 0, "train.eval_batches": 2, "model.mtp_depth": 1}
    base.update(over)
    return load_run_config(preset, base)


def test_loop_objective_adds_weighted_mtp_loss(tmp_path):
    from moelab.trainers.loop import Trainer

    rc = _rc(**{"model.mtp_depth": 2, "train.mtp_loss_weight": 0.3})
    tr = Trainer(rc, tmp_path, progress=False)
    tokens = tr.source.batch("train", 0, 4, 16).tokens
    obj, ce, losses = tr._loss(tokens)
    want = _manual_mtp(tr.model, tokens)
    torch.testing.assert_close(losses["mtp_loss"], sum(want) / 2)
    torch.testing.assert_close(obj, ce + 0.3 * sum(want) / 2)  # dense: no balance losses
    # evaluation: the next-token loss alone, the MTP modules not run
    _, ce_eval, losses_eval = tr._loss(tokens, mtp=False)
    torch.testing.assert_close(ce_eval, ce)
    assert float(losses_eval["mtp_loss"]) == 0.0


def test_short_run_logs_mtp_loss_and_eval_ignores_mtp(tmp_path):
    from moelab.trainers.loop import Trainer

    tr = Trainer(_rc(), tmp_path / "a", progress=False)
    tr.run()
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(math.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0 for r in rows)
    before = tr.evaluate()
    assert before == rows[-1]["eval_loss"]
    with torch.no_grad():
        for p in tr.model.mtp.parameters():
            p.add_(torch.randn_like(p))
    assert tr.evaluate() == before  # MTP weights play no part in the evaluation loss
    # checkpoint round trip: a fresh Trainer loads every tensor, the MTP modules' included
    again = Trainer(_rc(), tmp_path / "b", progress=False)
    again.load_checkpoint(tmp_path / "a")
    sd = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    assert any(k.startswith("mtp.0.") for k in sd)
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a run without MTP logs no mtp_loss column
    Trainer(_rc(**{"model.mtp_depth": 0}), tmp_path / "c", progress=False).run()
    assert all("mtp_loss" not in json.loads(l) for l in open(tmp_path / "c" / "metrics.jsonl"))


def test_moe_mtp_run_counts_routing_per_domain(tmp_path):
    from moelab.trainers.loop import train

    train(_rc("moe-tiny", **{"train.eval_every": 0, "train.steps": 2}), tmp_path, progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    row = rows[-1]
    assert len(row["expert_load"]) == 3  # two main MoE layers and the MTP block's
    # per-domain counts: the MTP block sees S - 1 = 15 positions of each of the 4 sequences, top-2
    assert [sum(map(sum, d)) for d in row["expert_domain"]] == [4 * 16 * 2, 4 * 16 * 2, 4 * 15 * 2]


def test_seq_len_must_exceed_mtp_depth():
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        _rc(**{"train.seq_len": 2, "model.mtp_depth": 2})
    with pytest.raises(ConfigError, match=r"model\.mtp_depth"):
        _rc(**{"model.mtp_depth": -1})
    with pytest.raises(ConfigError, match=r"train\.mtp_loss_weight"):
        _rc(**{"train.mtp_loss_weight": -0.1})


def test_upcycle_keeps_mtp_function():
    """A dense MLA + MTP model upcycled at G = 1 with renormalised gates computes the same function: the MTP
    block became an MoE of copies of its dense FFN (exact, see upcycle.py)."""
    from moelab.trainers.upcycle import upcycle

    dense = build_model(_cfg(mtp_depth=2, attention="mla"), seed=0)
    moe = upcycle(dense, MoEConfig(n_experts=4, top_k=2, renormalize=True))
    assert all(isinstance(m.block.ffn, MoE) for m in moe.mtp)
    batch = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        want = dense(batch[:, :-1], batch[:, 1:]), dense.mtp_ce
        got = moe(batch[:, :-1], batch[:, 1:]), moe.mtp_ce
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# -- two gloo ranks: EP over the MTP block's experts, FSDP over the MTP modules ----------------------------

PAR = {"train.batch_size": 4, "train.seq_len": 16, "model.mtp_depth": 1, "model.attention": "mla",
       "model.n_kv_heads": 0, "model.q_lora_rank": 16}


def _objective(model, tokens, rc):
    """The loop's objective (see Trainer._loss): CE + balance losses + weighted mean MTP loss."""
    logits = model(tokens[:, :-1], tokens[:, 1:])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    layers = [m for _, m in model.moe_layers()]
    m = rc.model.moe
    balance = m.aux_loss_coef * sum(l.aux_loss for l in layers) + m.z_loss_coef * sum(l.z_loss for l in layers)
    return ce + balance + rc.train.mtp_loss_weight * sum(model.mtp_ce) / len(model.mtp_ce)


def _batch(rc):
    from moelab.trainers.data import build_source

    return build_source(rc.data, 0).batch("train", 0, rc.train.batch_size, rc.train.seq_len).tokens


def _ep_fsdp_grads(rank, world_size):
    from torch.distributed.fsdp import FSDPModule

    from moelab.trainers.parallel import full_tensor, init_parallel, parallelize

    rc = load_run_config("moe-tiny", PAR)
    par = init_parallel(2, rc.model.moe.n_experts)
    model = build_model(rc.model, seed=0)
    parallelize(model, par)
    assert all(isinstance(m, FSDPModule) and isinstance(m.block, FSDPModule) for m in model.mtp)
    assert model.mtp[0].block.ffn.parallel is not None  # EP hook installed on the MTP block's MoE
    obj = _objective(model, par.local_rows(_batch(rc)), rc)
    obj.backward()
    return float(par.all_reduce(obj.detach(), "mean")), {n: full_tensor(p.grad).clone()
                                                         for n, p in model.named_parameters()}


def test_ep2_fsdp_two_ranks_match_single_process_with_mtp_and_mla():
    rc = load_run_config("moe-tiny", PAR)
    ref = build_model(rc.model, seed=0)
    obj = _objective(ref, _batch(rc), rc)
    obj.backward()
    obj = obj.detach()
    for rank, (loss, grads) in enumerate(run_distributed(_ep_fsdp_grads, 2)):
        assert loss == pytest.approx(float(obj), abs=1e-5), rank
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0, msg=f"{name} rank {rank}")
