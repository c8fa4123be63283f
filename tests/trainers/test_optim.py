import copy
import json

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


def _params(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 4, 3), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _groups(ps):
    return [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1},
            {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.0}]


def _run(opt, ps, seed, steps):
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        for i, p in enumerate(ps):
            # parameter 1 gets no gradient on every third step (a routed expert that received no tokens)
            p.grad = None if (i == 1 and t % 3 == 2) else torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_adamw_makes_torchs_update_on_fresh_inputs(dtype, seed):
    """The same parameters and state as torch.optim.AdamW after 7 steps, on the CPU path (a loop, as torch's
    default there) and on the foreach path (used off the CPU), including a parameter skipped on some steps."""
    from moelab.trainers.optim import AdamW

    ref_ps = _params(seed, dtype)
    ref = torch.optim.AdamW(_groups(ref_ps), betas=(0.9, 0.95), eps=1e-8, foreach=False)
    _run(ref, ref_ps, seed, 7)
    ref_fe_ps = _params(seed, dtype)
    ref_fe = torch.optim.AdamW(_groups(ref_fe_ps), betas=(0.9, 0.95), eps=1e-8, foreach=True)
    _run(ref_fe, ref_fe_ps, seed, 7)

    ours_ps = _params(seed, dtype)
    ours = AdamW(_groups(ours_ps), betas=(0.9, 0.95), eps=1e-8)
    _run(ours, ours_ps, seed, 7)

    class Foreach(AdamW):  # every parameter through the foreach path, on the CPU
        def step(self, closure=None):
            with torch.no_grad():
                for g in self.param_groups:
                    ps = [p for p in g["params"] if p.grad is not None]
                    self._update_foreach(ps, g["lr"], g["weight_decay"], g["eps"], *g["betas"])

    fe_ps = _params(seed, dtype)
    fe = Foreach(_groups(fe_ps), betas=(0.9, 0.95), eps=1e-8)
    _run(fe, fe_ps, seed, 7)

    for (a, b, want) in [(ours, ours_ps, ref_ps), (fe, fe_ps, ref_fe_ps)]:
        for p, q in zip(b, want):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        want_opt = ref if a is ours else ref_fe
        for p, q in zip(b, want):
            sa, sb = a.state[p], want_opt.state[q]
            assert sa["step"].device.type == "cpu" and sa["step"].dtype == sb["step"].dtype
            for k in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert ours.state[ours_ps[1]]["step"].item() == 5  # skipped on steps 3 and 6


def test_adamw_state_dicts_load_either_way():
    """A checkpoint written with torch.optim.AdamW loads into moelab's and trains on identically, and back."""
    from moelab.trainers.optim import AdamW

    ps_ref, ps_ours = _params(3, torch.float32), _params(3, torch.float32)
    ref = torch.optim.AdamW(_groups(ps_ref), foreach=False)
    _run(ref, ps_ref, 3, 4)
    ours = AdamW(_groups(ps_ours))
    with torch.no_grad():
        for p, q in zip(ps_ours, ps_ref):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # state_dict() hands out the live moments
    _run(ref, ps_ref, 4, 3)
    _run(ours, ps_ours, 4, 3)
    for p, q in zip(ps_ours, ps_ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    back = torch.optim.AdamW(_groups(_params(3, torch.float32)), foreach=False)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert back.state_dict()["state"][0]["step"].item() == 7


def test_one_process_training_never_imports_dynamo_dtensor_or_sympy(tmp_path):
    """A run builds its model on `meta`, trains, checkpoints and resumes without importing torch._dynamo
    (1.6 s of CPU in every trial process: see moelab.trainers.optim.AdamW), torch.distributed.tensor or
    sympy (0.6 s: `init.is_dtensor`, `Transformer.to_empty`)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, sys
        from moelab.trainers.config import load_run_config
        from moelab.trainers.loop import Trainer
        over = {{"train.steps": 6, "train.batch_size": 2, "train.seq_len": 16, "train.log_every": 2,
                 "train.eval_every": 3, "train.ckpt_every": 3}}
        Trainer(load_run_config("moe-tiny", over), {str(tmp_path)!r}, progress=False).run()
        over["train.steps"] = 9
        tr = Trainer(load_run_config("moe-tiny", over), {str(tmp_path)!r}, progress=False)
        tr.run()
        print(json.dumps({{"step": tr.step, "loaded": [m for m in ("torch._dynamo", "torch.distributed.tensor", "sympy")
                                                       if m in sys.modules]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"step": 9, "loaded": []}
