"""`train.compile`: every block under torch.compile, in one graph, training exactly as the eager model does.

Backend "aot_eager" on CPU: Dynamo's graph capture and AOTAutograd's forward/backward graphs (what Inductor
compiles), run without code generation, so the check is cheap and the numbers comparable bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from moelab.trainers.config import ConfigError, load_run_config
from moelab.trainers.loop import COMPILE_BACKEND_ENV, compile_blocks, train
from moelab.trainers.model import build_model


def _one_graph(module, *args) -> None:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("preset", ["moe-tiny", "mla-mtp-tiny"])  # GQA; MLA + MTP (made an MoE below)
def test_a_block_compiles_to_one_graph(preset):
    """An MoE block (router, capacity limit, experts as the custom op, balance losses, statistics) with GQA
    or MLA attention, and the MTP module's block: no graph break, so nothing runs eagerly inside a block."""
    rc = load_run_config(preset, {"model.moe.n_experts": 8, "model.moe.top_k": 2, "model.moe.capacity_factor": 1.0})
    model = build_model(rc.model)
    x = torch.randn(2, 16, rc.model.d_model)
    assert hasattr(model.layers[-1].ffn, "router") and all(hasattr(m.block.ffn, "router") for m in model.mtp)
    _one_graph(model.layers[-1], x, model.rope_cos, model.rope_sin)
    for m in model.mtp:
        _one_graph(m.block, x[:, :15], model.rope_cos, model.rope_sin)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_compiled_training_equals_eager(tmp_path, monkeypatch):
    """moe-tiny for 4 steps with train.compile: the same losses, balance losses, gradient norms and final
    weights as the eager run, bit for bit; and the checkpoint keeps the eager parameter names."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    over = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": 0,
            "train.batch_size": 4, "train.seq_len": 32}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(load_run_config("moe-tiny", over), tmp_path / "eager", progress=False)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(load_run_config("moe-tiny", {**over, "train.compile": True}), tmp_path / "compiled", progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    keys = ("loss", "aux_loss", "z_loss", "grad_norm", "imbalance", "expert_load")
    eager, compiled = _rows(tmp_path / "eager" / "metrics.jsonl"), _rows(tmp_path / "compiled" / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in compiled] == [[r[k] for k in keys] for r in eager]
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)["model"]
    assert list(a) == list(b)  # no `_orig_mod.` in the names: compiled in place
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compile_settings_are_validated(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.compile: got 'sometimes'; allowed: true or false"):
        load_run_config("moe-tiny", {"train.compile": "sometimes"})
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "fastest")
    with pytest.raises(ConfigError, match=rf"\${COMPILE_BACKEND_ENV}: got 'fastest'; allowed: .*aot_eager"):
        compile_blocks(build_model(load_run_config("moe-tiny").model))
