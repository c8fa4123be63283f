"""`moelab export` as a user meets it: --help, a run exported and loaded by transformers, refusals (exit 2)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moelab.cli import main
from moelab.trainers.config import load_run_config
from moelab.trainers.loop import train


def test_help_has_examples():
    r = subprocess.run([sys.executable, "-m", "moelab", "export", "--help"], capture_output=True, text=True,
                       env=os.environ, timeout=300)
    assert r.returncode == 0
    assert "examples:" in r.stdout and "moelab export runs/" in r.stdout
    assert "qwen3_moe" in r.stdout and "--force" in r.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rc = load_run_config("moe-tiny", {"train.steps": 2, "train.batch_size": 2, "train.seq_len": 16,
                                      "train.eval_every": 0, "train.eval_batches": 1})
    train(rc, run, progress=False)
    return run


def test_export_a_run_then_transformers_loads_it(run_dir, tmp_path, capsys):
    import transformers

    from moelab.trainers.hf_export import load_model

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as mixtral" in printed and "config.json, model.safetensors" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["eos_token_id"] == 256  # the byte tokenizer's end-of-document
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(run_dir)[0](tokens)
        got = transformers.AutoModelForCausalLM.from_pretrained(out)(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # again into the same directory: refused, then replaced with --force
    assert main(["export", str(run_dir), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(out), "--format", "qwen3_moe", "--force"]) == 2  # no QK-norm
    assert "qk_norm='none': formats that can: llama, qwen2, mixtral, qwen2_moe" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(out), "--format", "qwen2_moe", "--force"]) == 2  # no shared expert
    assert main(["export", str(run_dir), str(out), "--dtype", "bfloat16", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("args,expected", [
    (["--format", "deepseek_v3"], "model.attention='gqa': formats that can: llama"),  # moe-tiny: GQA, softmax
    (["--format", "llama"], r"(an MoE): formats that can: mixtral"),
    (["--max-shard-gb", "0"], "--max-shard-gb: got 0.0; allowed: a positive number"),
])
def test_refusals_exit_2_naming_the_cause(run_dir, tmp_path, capsys, args, expected):
    assert main(["export", str(run_dir), str(tmp_path / "hf"), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_missing_run_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    assert "no such run directory or checkpoint" in capsys.readouterr().err
