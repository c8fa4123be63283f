import json

import pytest
import torch

from moelab.trainers.config import load_run_config
from moelab.trainers.loop import FAULT_NAN_ENV, Diverged, Trainer, train


def _rc(preset="moe-tiny", **overrides):
    base = {"train.log_every": 1, "train.eval_every": 0, "train.batch_size": 4, "train.seq_len": 32,
            "train.ckpt_every": 4, "train.steps": 12}
    base.update(overrides)
    return load_run_config(preset, base)


def _losses(path):
    rows = [json.loads(l) for l in open(path)]
    return {r["step"]: r["loss"] for r in rows}, rows


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = train(_rc(**{"model.moe.bias_update_rate": 0.01}), tmp_path / "a", progress=False)
    assert full["steps"] == 12

    def crash_at_6(row, ckpt):
        if row["step"] == 6:
            raise _Interrupt

    tr = Trainer(_rc(**{"model.moe.bias_update_rate": 0.01}), tmp_path / "b", progress=False, report=crash_at_6)
    with pytest.raises(_Interrupt):
        tr.run()
    partial, _ = _losses(tmp_path / "b" / "metrics.jsonl")
    assert max(partial) == 6  # steps 5 and 6 ran past the step-4 checkpoint
    train(_rc(**{"model.moe.bias_update_rate": 0.01}), tmp_path / "b", resume=tmp_path / "b", progress=False)
    a, _ = _losses(tmp_path / "a" / "metrics.jsonl")
    b, rows_b = _losses(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 13))  # nothing duplicated, nothing missing
    assert a == b  # bit-identical trajectory
    _, rows_a = _losses(tmp_path / "a" / "metrics.jsonl")
    assert [r["expert_domain"] for r in rows_a] == [r["expert_domain"] for r in rows_b]  # routing counts too
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_rc(), tmp_path / "x", resume=tmp_path / "nowhere", progress=False)


def test_metrics_rows_hold_design_fields(tmp_path):
    out = train(_rc(**{"train.eval_every": 6, "train.log_every": 3}), tmp_path, progress=False)
    _, rows = _losses(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    want = {"loss", "tokens", "flops", "wall_s", "lr", "grad_norm", "aux_loss", "z_loss", "seq_aux_loss",
            "tokens_per_s", "mfu", "max_mem_gib", "drop_frac", "imbalance", "router_entropy", "expert_load"}
    assert want <= set(rows[0])
    assert "eval_loss" in rows[1] and "eval_loss" not in rows[0]
    load = rows[0]["expert_load"]
    assert len(load) == 2 and len(load[0]) == 8 and sum(load[0]) == pytest.approx(1.0)
    assert rows[-1]["tokens"] == 12 * 4 * 32
    assert out["bayes_loss"] > 0 and out["status"] == "finished"
    for name in ("config.json", "summary.json", "checkpoint.pt"):
        assert (tmp_path / name).exists()


def test_nan_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_NAN_ENV, "2")
    with pytest.raises(Diverged, match="step 2"):
        train(_rc(), tmp_path, progress=False)


def test_dense_tiny_and_micro_batches_match(tmp_path):
    whole = train(_rc("tiny", **{"train.steps": 3}), tmp_path / "w", progress=False)
    micro = train(_rc("tiny", **{"train.steps": 3, "train.micro_batch_size": 2}), tmp_path / "m", progress=False)
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_moe_tiny_learns_toward_bayes_floor(tmp_path):
    rc = load_run_config("moe-tiny", {"train.steps": 150, "train.log_every": 10, "train.eval_every": 150,
                                      "train.ckpt_every": 0, "optim.warmup_steps": 10})
    out = train(rc, tmp_path, progress=False)
    _, rows = _losses(tmp_path / "metrics.jsonl")
    first, floor = rows[0]["loss"], out["bayes_loss"]
    # at least 60% of the way from the first logged loss to the Bayes-optimal floor, never below it
    assert out["eval_loss"] < first - 0.6 * (first - floor), (first, out["eval_loss"], floor)
    assert out["eval_loss"] > floor - 0.05


def test_expert_domain_counts_match_router_choices(tmp_path):
    """Per-domain routing counts = a hand tally of every training forward's top-k choices (capacity drops
    excluded) by each row's synthetic domain; eval forwards add nothing; summed over domains = expert_load."""
    rc = _rc(**{"train.steps": 2, "train.log_every": 2, "train.eval_every": 2, "train.ckpt_every": 0,
                "train.micro_batch_size": 2, "model.moe.capacity_factor": 1.0})
    rows = []
    tr = Trainer(rc, tmp_path, progress=False, report=lambda row, ckpt: rows.append(row))
    layers = tr.model.moe_layers()
    seen = {"train": [], "eval": []}  # per forward and MoE layer: the top-k indices after capacity drops
    for i, (_, m) in enumerate(layers):
        m.register_forward_hook(lambda mod, inp, out, i=i: seen["train" if torch.is_grad_enabled() else "eval"]
                                .append((i, mod.stats["topk_idx"].clone())))
    tr.run()
    (row,) = rows
    K, E, S, micro = rc.data.n_domains, rc.model.moe.n_experts, rc.train.seq_len, 2
    want = torch.zeros(len(layers), K, E, dtype=torch.int64)
    forwards = iter(seen["train"])
    for step in range(2):
        domains = tr.source.batch("train", step, rc.train.batch_size, S).domains
        for first in range(0, rc.train.batch_size, micro):
            for _ in layers:
                layer, idx = next(forwards)
                for t, slots in enumerate(idx.tolist()):
                    for e in slots:
                        if e >= 0:
                            want[layer, domains[first + t // S], e] += 1
    assert next(forwards, None) is None and seen["eval"]  # every training forward used; eval did run
    assert row["expert_domain"] == want.tolist()
    counts = want.sum(1).double()  # [layers, E]: routed slots per expert
    assert counts.sum() < 2 * rc.train.batch_size * S * rc.model.moe.top_k * len(layers)  # some slots dropped
    assert row["drop_frac"] > 0
    torch.testing.assert_close((counts / counts.sum(1, keepdim=True)).tolist(), row["expert_load"])
    assert "expert_domain" not in json.loads((tmp_path / "summary.json").read_text())


def test_no_expert_domain_without_domains(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    rc = _rc(**{"train.steps": 2, "data.source": "files", "data.paths": [str(tmp_path / "a.txt")],
                "data.eval_fraction": 0.2})
    train(rc, tmp_path / "run", progress=False)
    _, rows = _losses(tmp_path / "run" / "metrics.jsonl")
    assert rows and all("expert_load" in r and "expert_domain" not in r for r in rows)
    train(_rc("tiny", **{"train.steps": 2}), tmp_path / "dense", progress=False)  # dense, synthetic
    _, rows = _losses(tmp_path / "dense" / "metrics.jsonl")
    assert rows and all("expert_domain" not in r for r in rows)


def _prefetch_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "moelab-prefetch"]


def test_batches_come_from_the_prefetch_thread_which_stops_when_the_run_ends_or_raises(tmp_path, monkeypatch):
    import threading

    tr = Trainer(_rc(**{"train.steps": 3}), tmp_path / "a", progress=False)
    built = []
    real = tr._train_batches
    monkeypatch.setattr(tr, "_train_batches", lambda step: built.append((step, threading.current_thread().name))
                        or real(step))
    tr.run()
    assert built == [(0, "moelab-prefetch"), (1, "moelab-prefetch"), (2, "moelab-prefetch")]
    assert tr._prefetch is None and not _prefetch_threads()
    monkeypatch.setenv(FAULT_NAN_ENV, "1")
    with pytest.raises(Diverged, match="step 1"):
        Trainer(_rc(), tmp_path / "b", progress=False).run()
    assert not _prefetch_threads()


def test_nan_between_log_lines_is_named_by_its_step_before_the_next_checkpoint(tmp_path):
    """Losses are read once per log line (and before a checkpoint), not per step: a NaN loss at step 1, with
    log lines every 4 steps and checkpoints every 3, raises at step 3, naming step 1, before that checkpoint."""
    import math

    tr = Trainer(_rc(**{"train.log_every": 4, "train.ckpt_every": 3}), tmp_path, progress=False)
    real = tr._loss

    def nan_at_step_1(tokens, mtp=True):  # a real NaN on the device, through backward and optimiser
        obj, ce, moe = real(tokens, mtp)
        bad = float("nan") if tr.step == 1 else 0.0
        return obj + bad, ce + bad, moe

    tr._loss = nan_at_step_1
    with pytest.raises(Diverged, match="diverged at step 1") as e:
        tr.run()
    assert math.isnan(e.value.loss) and tr.step == 3
    assert not (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
