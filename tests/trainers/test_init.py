"""Shard-local initialisation (`trainers/init.py`): a model built on `meta`, sharded, then filled rank by rank
holds exactly the values `build_model` draws for one process; upcycling and continued training fill shards
the same way.

The reference for the scheme is `_whole`, written from the module docstring: blocks of rows, concatenated.
"""

import math

import pytest
import torch

from distributed import run_distributed
from moelab.trainers import init
from moelab.trainers.config import load_run_config
from moelab.trainers.model import build_model

TINY = {"train.batch_size": 4, "train.seq_len": 16, "train.log_every": 1, "train.eval_every": 0}


def _whole(shape, name, seed, std, block_elems=init.BLOCK_ELEMS):
    """The documented value of a whole parameter: (R, C) rows in blocks of max(1, block_elems // C)."""
    C = shape[-1] if len(shape) >= 2 else math.prod(shape)
    R = math.prod(shape) // C
    B = max(1, block_elems // C)
    blocks = [std * torch.randn(min(B, R - b * B), C, generator=torch.Generator().manual_seed(
        init.stream_seed(seed, name, b))) for b in range(math.ceil(R / B))]
    return torch.cat(blocks).reshape(shape)


@pytest.mark.parametrize("shape,box", [
    ((10, 7), (slice(3, 9), slice(0, 7))),  # an FSDP row shard, across block edges
    ((10, 7), (slice(0, 10), slice(2, 5))),  # a column slice
    ((6, 5, 7), (slice(2, 5), slice(1, 4), slice(0, 7))),  # EP experts x an FSDP dim-1 shard; blocks span experts
    ((6, 5, 7), (slice(4, 6), slice(0, 5), slice(3, 7))),  # EP experts x an FSDP dim-2 shard
    ((13,), (slice(5, 11),)),  # a vector
    ((4, 7), (slice(4, 4), slice(0, 7))),  # an empty shard (more ranks than rows)
])
def test_any_box_holds_the_slice_of_the_whole_parameter(monkeypatch, shape, box):
    monkeypatch.setattr(init, "BLOCK_ELEMS", 16)  # blocks of 2 rows of 7: many edges inside each box
    want = _whole(shape, "layers.0.w", 5, 0.5, block_elems=16)
    local = torch.full(want[box].shape, float("nan"))
    init.normal_box_(local, shape, box, "layers.0.w", 5, 0.5)
    assert torch.equal(local, want[box])


def test_build_model_draws_the_documented_values():
    cfg = load_run_config("moe-tiny").model
    model = build_model(cfg, seed=7)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    ffn = model.layers[0].ffn
    assert torch.equal(model.embed.weight, _whole((cfg.vocab_size, cfg.d_model), "embed.weight", 7, cfg.init_std))
    assert torch.equal(ffn.w_down, _whole(tuple(ffn.w_down.shape), "layers.0.ffn.w_down", 7, out_std))
    assert torch.equal(model.layers[1].attn.wo.weight, _whole((cfg.d_model,) * 2, "layers.1.attn.wo.weight", 7,
                                                             out_std))
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))
    assert not torch.equal(build_model(cfg, seed=8).embed.weight, model.embed.weight)


# -- many ranks: each rank's shards against one process ------------------------------------------------------


def _shards(model):
    """{name: (box as (start, stop) pairs, local values)} of every parameter and persistent buffer."""
    out = {}
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        box = init.local_box(p)
        out[name] = ([(s.start, s.stop) for s in box], init.local_tensor(p).detach().clone())
    return out


def _trainer_shards(rank, world_size, ep, overrides, out):
    from moelab.trainers.loop import Trainer
    from moelab.trainers.parallel import init_parallel

    rc = load_run_config("moe-tiny", {**TINY, "train.ep": ep, **overrides})
    tr = Trainer(rc, out, parallel=init_parallel(ep, rc.model.moe.n_experts), progress=False)
    return _shards(tr.model)


def _check_shards(results, ref, what):
    """Every rank's shards equal the slices of `ref`, and together the ranks hold each element once per
    replica (so no rank holds a whole sharded parameter)."""
    state = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for name, want in state.items():
        held = 0
        for rank, shards in enumerate(results):
            box, local = shards[name]
            torch.testing.assert_close(local, want.detach()[tuple(slice(a, b) for a, b in box)], rtol=0, atol=0,
                                       msg=f"{what}: {name} rank {rank}")
            held += local.numel()
        if name.endswith(("w_gate_up", "w_down", "embed.weight")):
            assert held == want.numel(), (what, name)


@pytest.mark.parametrize("ep,overrides", [
    (2, {}),
    (1, {}),  # FSDP only
    (2, {"model.mtp_depth": 1, "model.attention": "mla", "model.n_kv_heads": 0, "model.q_lora_rank": 16,
         "model.moe.n_shared": 1}),
], ids=["ep2", "fsdp-only", "ep2-mla-mtp-shared"])
def test_meta_init_shards_equal_the_single_process_model(tmp_path, ep, overrides):
    rc = load_run_config("moe-tiny", {**TINY, **overrides})
    results = run_distributed(_trainer_shards, 2, ep, overrides, str(tmp_path))
    _check_shards(results, build_model(rc.model, seed=rc.train.seed), "init")


def _strided(rank, world_size):
    """A placement whose local part is no box (FSDP's strided sharding): drawn whole, this rank's part kept."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2,))
    placements = [_StridedShard(0, split_factor=2)]
    p = distribute_tensor(torch.zeros(8, 3), mesh, placements)
    assert init.local_box(p) is None
    init.normal_(p, "w", 1, 2.0)
    want = distribute_tensor(_whole((8, 3), "w", 1, 2.0), mesh, placements, src_data_rank=None).to_local()
    return torch.equal(p.to_local(), want) and not torch.equal(p.to_local(), _whole((8, 3), "w", 1, 2.0)[:4])


def test_a_strided_placement_falls_back_to_the_whole_parameter():
    assert run_distributed(_strided, 2) == [True, True]


# -- upcycling and continued training into a sharded model ----------------------------------------------------


UPCYCLE = {"upcycle.noise_std": 1e-3, "upcycle.reset_ratio": 0.25, "upcycle.shuffle": True,
           "model.moe.n_shared": 1, "upcycle.shared_init": "dense"}


def test_upcycled_and_continued_shards_equal_the_single_process_model(tmp_path):
    from moelab.trainers.loop import train
    from moelab.trainers.upcycle import initial_model

    train(load_run_config("tiny", {**TINY, "train.steps": 1}), tmp_path / "dense", progress=False)
    ov = {**UPCYCLE, "upcycle.source": str(tmp_path / "dense")}
    up = run_distributed(_trainer_shards, 2, 2, ov, str(tmp_path / "up"))
    _check_shards(up, initial_model(load_run_config("moe-tiny", {**TINY, **ov})), "upcycle")

    # Continued training from an MoE: a checkpoint.pt (memory-mapped) and a DCP directory, read shard by shard.
    bias = {"model.moe.bias_update_rate": 0.01}
    train(load_run_config("moe-tiny", {**TINY, **bias, "train.steps": 2}), tmp_path / "moe", progress=False)
    ov = {**bias, "upcycle.source": str(tmp_path / "moe")}
    ref = initial_model(load_run_config("moe-tiny", {**TINY, **ov}))
    assert float(ref.layers[0].ffn.router.expert_bias.abs().sum()) > 0  # the biases came with the weights
    _check_shards(run_distributed(_trainer_shards, 2, 2, ov, str(tmp_path / "c")), ref, "checkpoint.pt")
    dcp_dir = tmp_path / "dcp"
    run_distributed(_save_dcp, 2, str(dcp_dir), ov)
    ov = {**bias, "upcycle.source": str(next(dcp_dir.glob("ckpt-*")))}
    _check_shards(run_distributed(_trainer_shards, 2, 1, ov, str(tmp_path / "d")), ref, "dcp")
    _check_shards([_shards(initial_model(load_run_config("moe-tiny", {**TINY, **ov})))], ref, "dcp, one process")


def _save_dcp(rank, world_size, out, overrides):
    """A DCP checkpoint of the weights `overrides` start from, written at ws 2 / ep 2."""
    from moelab.trainers.loop import Trainer
    from moelab.trainers.parallel import init_parallel

    rc = load_run_config("moe-tiny", {**TINY, "train.ep": 2, **overrides})
    tr = Trainer(rc, out, parallel=init_parallel(2, 8), progress=False)
    tr.save_checkpoint()
