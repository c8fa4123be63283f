import pytest
import torch

from moelab.trainers.config import OptimConfig, preset
from moelab.trainers.model import build_model
from moelab.trainers.optim import build_optimizer, lr_factor, param_groups, set_lr


def test_groups_split_decay_and_expert_lr():
    model = build_model(preset("moe-tiny").model)
    cfg = OptimConfig(lr=1e-3, expert_lr_fraction=0.3, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("w_gate_up", "w_down")) for p in groups["experts"]["params"])
    assert all(p.dim() == 1 or "embed" in names[id(p)] for p in groups["no_decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))
    opt = build_optimizer(model, cfg)
    set_lr(opt, 100, 200, OptimConfig(lr=1e-3, expert_lr_fraction=0.3, schedule="constant", warmup_steps=0))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["experts"] == pytest.approx(0.3e-3) and lrs["decay"] == pytest.approx(1e-3)


def test_expert_lr_fraction_changes_expert_updates_only():
    def one_step(frac):
        torch.manual_seed(0)
        model = build_model(preset("moe-tiny").model, seed=0)
        opt = build_optimizer(model, OptimConfig(lr=1e-2, expert_lr_fraction=frac))
        model(torch.randint(0, 257, (2, 8))).square().mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}

    full, third = one_step(1.0), one_step(1 / 3)
    key = "layers.0.ffn.w_down"
    assert third[key] == pytest.approx(full[key] / 3, rel=1e-4)
    assert third["layers.0.attn.wq.weight"] == pytest.approx(full["layers.0.attn.wq.weight"], rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "deepseek", "constant"])
def test_schedules_warmup_and_end(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 200, cfg) for s in range(200)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert max(f) == pytest.approx(1.0)
    assert min(f) >= 0.1 - 1e-9
    if schedule != "constant":
        assert f[-1] == pytest.approx(0.1, abs=1e-6)


def test_wsd_and_deepseek_shapes():
    wsd = OptimConfig(schedule="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.25)
    f = [lr_factor(s, 100, wsd) for s in range(100)]
    assert f[:75] == [1.0] * 75 and f[87] == pytest.approx(1 - 13 / 25)
    ds = OptimConfig(schedule="deepseek", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.1)
    g = [lr_factor(s, 148, ds) for s in range(148)]
    assert g[99] == 1.0  # stable through 10/14.8 of the run
    assert 0.1 < g[115] < 1.0  # cosine phase
    assert g[-10:] == [0.1] * 10  # final constant phase
