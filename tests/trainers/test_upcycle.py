import json

import pytest
import torch

from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, UpcycleConfig, load_run_config
from moelab.trainers.loop import train
from moelab.trainers.model import build_model
from moelab.trainers.upcycle import initial_model, load_source, scaling_factor, upcycle

D_FF = 48


def _dense(seed=0):
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=D_FF).validate()
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # larger FFN weights so the FFN matters to the logits
        for layer in model.layers:
            layer.ffn.down.weight.mul_(20)
    return model


def _logits(model, seed=1):
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


# G=1: softmax without renormalisation, a uniform router (std 0): F = n_experts / top_k.
# G>1: renormalised gates with a random virtual-group router: F = G for any router draw.
CASES = [
    (1, MoEConfig(n_experts=4, top_k=2, renormalize=False), 0.0, False),
    (2, MoEConfig(n_experts=8, top_k=2, granularity=2, renormalize=True), 0.5, False),
    (4, MoEConfig(n_experts=8, top_k=4, granularity=4, renormalize=True), 0.5, False),
    (2, MoEConfig(n_experts=8, top_k=2, granularity=2, renormalize=True), 0.5, True),
    (4, MoEConfig(n_experts=8, top_k=4, granularity=4, renormalize=True), 0.5, True),
]


@pytest.mark.parametrize("G,moe,router_std,shuffle", CASES)
def test_function_preserving_with_nvidia_scaling(G, moe, router_std, shuffle):
    dense = _dense()
    ucfg = UpcycleConfig(router_init="virtual_group", router_std=router_std, scaling="nvidia", shuffle=shuffle)
    m = upcycle(dense, moe, ucfg)
    assert m.cfg.d_expert == D_FF // G
    torch.testing.assert_close(_logits(m), _logits(dense), rtol=1e-5, atol=1e-5)
    unscaled = upcycle(dense, moe, UpcycleConfig(router_init="virtual_group", router_std=router_std,
                                                 scaling="none", shuffle=shuffle))
    assert (_logits(unscaled) - _logits(dense)).abs().max() > 1e-3


def _units(m, dense, layer, j):
    """The dense units routed expert j holds, found by matching its gate rows (never scaled) to the dense's."""
    g, _, _ = _expert_parts(m, layer, j)
    dense_gate = dense.layers[layer].ffn.gate_up.weight[:D_FF]
    return [int((dense_gate == row).all(1).nonzero().item()) for row in g]


def test_shuffle_gives_each_router_group_its_own_partition_of_the_units():
    dense = _dense()
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2)
    for shuffle in (False, True):
        m = upcycle(dense, moe, UpcycleConfig(router_init="virtual_group", shuffle=shuffle, seed=4))
        for layer in (0, 1):
            partitions = set()
            for group in range(4):
                a, b = (_units(m, dense, layer, 2 * group + s) for s in (0, 1))
                assert sorted(a + b) == list(range(D_FF))  # a group holds every unit exactly once
                partitions.add(frozenset([frozenset(a), frozenset(b)]))
            assert len(partitions) == (4 if shuffle else 1), (shuffle, layer)
    first = upcycle(dense, moe, UpcycleConfig(shuffle=True, seed=4))
    assert _units(first, dense, 0, 0) != _units(first, dense, 1, 0)  # each layer draws its own


def test_shuffle_changes_the_function_under_a_random_router():
    # The old in-shard permutation left this difference at exactly 0.
    dense = _dense()
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2)
    off, on = (upcycle(dense, moe, UpcycleConfig(router_std=0.5, shuffle=s)) for s in (False, True))
    assert torch.equal(off.layers[0].ffn.router.weight, on.layers[0].ffn.router.weight)
    assert (_logits(on) - _logits(off)).abs().max() > 1e-3


def test_shuffle_arms_share_the_router_and_noise_draws():
    # A shuffle contrast should measure the partition, not a different random stream.
    dense = _dense()
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2)
    noise = {}
    for shuffle in (False, True):
        clean, noisy = (upcycle(dense, moe, UpcycleConfig(noise_std=s, shuffle=shuffle, seed=2)) for s in (0, 1e-3))
        noise[shuffle] = (noisy.layers[1].ffn.w_down - clean.layers[1].ffn.w_down).detach()
        noise[shuffle, "router"] = noisy.layers[1].ffn.router.weight.detach()
    torch.testing.assert_close(noise[True], noise[False], rtol=0, atol=1e-6)
    assert noise[False].abs().max() > 1e-4
    assert torch.equal(noise[True, "router"], noise[False, "router"])


def test_shuffle_at_granularity_1_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"upcycle.shuffle: got True.*G = .* is 1.*upcycle.shuffle=false"):
        load_run_config("moe-tiny", {"model.moe.granularity": 1, "model.moe.top_k": 1, "upcycle.shuffle": True,
                                     "upcycle.source": "/nonexistent/dense"})
    with pytest.raises(ConfigError, match="upcycle.shuffle"):
        upcycle(_dense(), MoEConfig(n_experts=4, top_k=2), UpcycleConfig(shuffle=True))
    load_run_config("moe-tiny", {"upcycle.shuffle": True})  # G = 2: allowed
    load_run_config("tiny", {"upcycle.shuffle": True})  # a dense run never upcycles


def test_scaling_factor_values():
    # He et al.: softmax-then-top-k without renormalisation -> E * G^2 / T, E = n_experts / G
    assert scaling_factor(MoEConfig(n_experts=64, top_k=8, granularity=8, renormalize=False), 1024, 128,
                          "nvidia") == pytest.approx(8 * 8**2 / 8)
    assert scaling_factor(MoEConfig(n_experts=8, top_k=2, renormalize=True), 64, 32, "nvidia") == 2
    assert scaling_factor(MoEConfig(n_experts=8, top_k=2), 64, 64, 1.5) == 1.5
    assert scaling_factor(MoEConfig(n_experts=8, top_k=2), 64, 64, "none") == 1.0


def test_copy_attention_and_norms_unchanged():
    dense = _dense()
    m = upcycle(dense, MoEConfig(n_experts=4, top_k=1), UpcycleConfig(noise_std=0.1, reset_ratio=0.5))
    for name, p in dense.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(m.state_dict()[name], p), name


def _expert_parts(m, layer, j):
    ffn = m.layers[layer].ffn
    de = ffn.d_expert
    return ffn.w_gate_up[j, :de], ffn.w_gate_up[j, de:], ffn.w_down[j]


def test_reset_ratio_changes_exactly_the_chosen_units():
    dense = _dense()
    r = 0.25
    m = upcycle(dense, MoEConfig(n_experts=4, top_k=1), UpcycleConfig(reset_ratio=r, seed=3))
    gate_up = dense.layers[0].ffn.gate_up.weight
    gate, down = gate_up[:D_FF], dense.layers[0].ffn.down.weight
    chosen = []
    for j in range(4):
        g, u, dn = _expert_parts(m, 0, j)
        changed = (g != gate).any(1)
        assert int(changed.sum()) == round(r * D_FF)
        idx = changed.nonzero().flatten()
        assert torch.equal((dn != down).any(0).nonzero().flatten(), idx)  # the same units in down
        chosen.append(tuple(idx.tolist()))
        # resampled rows follow the statistics of the slice they replace
        assert g[idx].mean().item() == pytest.approx(gate[idx].mean().item(), abs=0.02)
        assert g[idx].std().item() == pytest.approx(gate[idx].std().item(), rel=0.25)
    assert len(set(chosen)) == 4  # each expert draws its own units


def test_noise_and_reset_arms_share_the_router():
    """Arms that differ only in noise or reset (same upcycle.seed) start from the same router: a paired-by-seed
    contrast then measures the knob, not a router redraw. Another seed draws another router."""
    dense = _dense()
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2)
    arms = [UpcycleConfig(seed=3), UpcycleConfig(noise_std=1e-2, seed=3), UpcycleConfig(reset_ratio=0.5, seed=3),
            UpcycleConfig(noise_std=1e-3, reset_ratio=0.05, seed=3)]
    routers = [upcycle(dense, moe, c).layers[1].ffn.router.weight.detach() for c in arms]
    for r in routers[1:]:
        assert torch.equal(r, routers[0])
    other = upcycle(dense, moe, UpcycleConfig(seed=4)).layers[1].ffn.router.weight.detach()
    assert not torch.equal(other, routers[0])


def test_noise_std_and_seed():
    dense = _dense()
    sigma = 1e-3
    moe = MoEConfig(n_experts=8, top_k=2)
    m = upcycle(dense, moe, UpcycleConfig(noise_std=sigma, seed=1))
    g, _, _ = _expert_parts(m, 1, 5)
    diff = g - dense.layers[1].ffn.gate_up.weight[:D_FF]
    assert diff.std().item() == pytest.approx(sigma, rel=0.05)
    assert diff.mean().abs().item() < 0.1 * sigma
    again = upcycle(dense, moe, UpcycleConfig(noise_std=sigma, seed=1))
    other = upcycle(dense, moe, UpcycleConfig(noise_std=sigma, seed=2))
    assert torch.equal(again.layers[1].ffn.w_gate_up, m.layers[1].ffn.w_gate_up)
    assert not torch.equal(other.layers[1].ffn.w_gate_up, m.layers[1].ffn.w_gate_up)


def test_granular_split_and_virtual_group_router():
    dense = _dense()
    m = upcycle(dense, MoEConfig(n_experts=8, top_k=4, granularity=4), UpcycleConfig(router_init="virtual_group"))
    de = D_FF // 4
    gate = dense.layers[0].ffn.gate_up.weight[:D_FF]
    up = dense.layers[0].ffn.gate_up.weight[D_FF:]
    for j in range(8):
        g, u, dn = _expert_parts(m, 0, j)
        s = slice((j % 4) * de, (j % 4 + 1) * de)
        assert torch.equal(g, gate[s]) and torch.equal(u, up[s])
        assert torch.equal(dn, dense.layers[0].ffn.down.weight[:, s])
    w = m.layers[0].ffn.router.weight
    assert torch.equal(w[0], w[3]) and not torch.equal(w[3], w[4])


def test_shared_experts_from_dense_split_each_unit_with_the_routed_experts():
    dense = _dense()
    gate_up, down = dense.layers[0].ffn.gate_up.weight, dense.layers[0].ffn.down.weight
    half = 0.5 ** 0.5
    m = upcycle(dense, MoEConfig(n_experts=4, top_k=1, n_shared=1, d_shared=D_FF), UpcycleConfig(scaling=3.0))
    shared = m.layers[0].ffn.shared
    torch.testing.assert_close(shared.gate_up.weight[:D_FF], gate_up[:D_FF], rtol=0, atol=0)
    torch.testing.assert_close(shared.gate_up.weight[D_FF:], gate_up[D_FF:] * half)
    torch.testing.assert_close(shared.down.weight, down * half)
    g, u, dn = _expert_parts(m, 0, 2)  # the routed copy: half of each unit, times F = 3
    torch.testing.assert_close(u, gate_up[D_FF:] * (3 * 0.5) ** 0.5)
    torch.testing.assert_close(dn, down * (3 * 0.5) ** 0.5)
    # G = 2, one shared expert of width d_ff / 2: it holds shard 0, so only shard 0's units are split
    m2 = upcycle(dense, MoEConfig(n_experts=4, top_k=2, granularity=2, n_shared=1), UpcycleConfig())
    torch.testing.assert_close(m2.layers[0].ffn.shared.down.weight, down[:, :D_FF // 2] * half)
    torch.testing.assert_close(_expert_parts(m2, 0, 0)[2], down[:, :D_FF // 2] * half)
    torch.testing.assert_close(_expert_parts(m2, 0, 1)[2], down[:, D_FF // 2:], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="d_shared"):
        upcycle(dense, MoEConfig(n_experts=4, top_k=1, n_shared=1, d_shared=40), UpcycleConfig())


@pytest.mark.parametrize("moe,shuffle", [
    (MoEConfig(n_experts=4, top_k=2, n_shared=1, d_shared=D_FF), False),  # shared = the whole FFN: halves
    (MoEConfig(n_experts=4, top_k=1, n_shared=2, d_shared=D_FF), False),  # every unit held 3 times: thirds
    (MoEConfig(n_experts=8, top_k=2, granularity=2, n_shared=1), False),  # shard 0 split, shard 1 whole
    (MoEConfig(n_experts=8, top_k=4, granularity=2, n_shared=3), True),  # shard 0 in quarters, 1 in halves
])
def test_shared_experts_from_dense_preserve_the_function(moe, shuffle):
    dense = _dense()
    m = upcycle(dense, moe, UpcycleConfig(router_init="virtual_group", router_std=0.5, scaling="nvidia",
                                          shuffle=shuffle))
    torch.testing.assert_close(_logits(m), _logits(dense), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the shared experts carry a real part of the function
        for layer in m.layers:
            layer.ffn.shared.down.weight.zero_()
    assert (_logits(m) - _logits(dense)).abs().max() > 1e-3


@pytest.mark.parametrize("ucfg,match", [
    (dict(scaling="huge"), "upcycle.scaling"), (dict(scaling=-1.0), "upcycle.scaling"),
    (dict(reset_ratio=1.5), "upcycle.reset_ratio"), (dict(router_init="zeros"), "upcycle.router_init"),
])
def test_bad_upcycle_config(ucfg, match):
    with pytest.raises(ConfigError, match=match):
        UpcycleConfig(**ucfg).validate()


def test_virtual_group_needs_multiples_of_g():
    with pytest.raises(ConfigError, match="virtual_group"):
        upcycle(_dense(), MoEConfig(n_experts=8, top_k=3, granularity=2), UpcycleConfig(router_init="virtual_group"))
    with pytest.raises(ConfigError, match="already an MoE"):
        upcycle(build_model(load_run_config("moe-tiny").model), MoEConfig(n_experts=4, top_k=1))


def test_continued_training_from_dense_checkpoint_lowers_loss(tmp_path):
    dense_rc = load_run_config("tiny", {"train.steps": 40, "train.log_every": 40, "train.eval_every": 0})
    train(dense_rc, tmp_path / "dense", progress=False)
    rc = load_run_config("moe-tiny", {"upcycle.source": str(tmp_path / "dense"), "upcycle.noise_std": 1e-3,
                                      "train.steps": 20, "train.log_every": 1, "train.eval_every": 0,
                                      "optim.expert_lr_fraction": 0.3, "optim.warmup_steps": 2})
    start = initial_model(rc)
    assert start.cfg.moe.n_experts == 8
    train(rc, tmp_path / "moe", progress=False, model=start)
    rows = [json.loads(l) for l in open(tmp_path / "moe" / "metrics.jsonl")]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.05
    # the upcycled model starts near where the dense model ended, not at a random init's ln(vocab)
    dense_final = [json.loads(l) for l in open(tmp_path / "dense" / "metrics.jsonl")][-1]["loss"]
    assert first < dense_final + 0.5 < 5.0


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        load_source(tmp_path)
    rc = load_run_config("tiny", {"train.steps": 1, "train.eval_every": 0})
    train(rc, tmp_path / "d", progress=False)
    bad = load_run_config("moe-small", {"upcycle.source": str(tmp_path / "d")})
    with pytest.raises(ConfigError, match="differs from model"):
        initial_model(bad)
