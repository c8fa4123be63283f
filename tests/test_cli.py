"""The command line as a user meets it: --help, presets, a short run, bad flags."""

import json
import os
import subprocess
import sys

import pytest

from moelab.cli import main, parse_overrides


def _moelab(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("cmd", ["train", "presets"])
def test_help_has_an_example(cmd):
    r = _moelab(cmd, "--help")
    assert r.returncode == 0
    assert "example" in r.stdout and f"moelab {cmd}" in r.stdout


def test_presets_lists_counts(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"tiny", "moe-tiny", "small", "moe-small", "moe-1b", "1b", "3b"} <= set(rows)
    assert 0.9e9 < rows["moe-1b"]["active"] < 1.5e9 and rows["moe-1b"]["total"] > 5 * rows["moe-1b"]["active"]
    # the kind names the routing where it is not plain softmax top-k, and the attention / MTP where they differ
    assert rows["moe-1b"]["kind"] == "moe 64e top-8" and rows["tiny"]["kind"] == "dense"
    assert rows["moe-1b-dsv3"]["kind"] == "moe 128e top-15 +1sh sig grp8/4 mla mtp1"
    assert rows["mla-mtp-tiny"]["kind"] == "dense mla mtp1"
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert len(table) == len(rows) + 1 and "moe-1b-dsv3" in out and "grpG/K" in out
    # columns sized from the content: no name or kind pushes its row out of line (the last column is right-aligned)
    assert len({len(line) for line in table}) == 1, table
    assert all(line.split()[0] == name for line, name in zip(table[1:], rows))


def test_train_short_run_and_overrides(tmp_path):
    m = tmp_path / "m.jsonl"
    r = _moelab("train", "--preset", "moe-tiny", "--steps", "4", "--out", str(tmp_path / "run"),
                "--metrics-jsonl", str(m), "--train.log_every", "2", "--model.moe.top_k=1", "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr
    assert f"metrics: {m}" in r.stdout
    rows = [json.loads(l) for l in m.read_text().splitlines()]
    assert [x["step"] for x in rows] == [2, 4]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["moe"]["top_k"] == 1 and cfg["train"]["batch_size"] == 4
    # --resume continues to a larger budget from the saved step
    r = _moelab("train", "--preset", "moe-tiny", "--steps", "6", "--out", str(tmp_path / "run"), "--resume",
                "--metrics-jsonl", str(m), "--train.log_every", "2", "--model.moe.top_k=1", "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["step"] for l in m.read_text().splitlines()] == [2, 4, 6]


def test_bad_field_fails_fast_naming_it():
    r = _moelab("train", "--preset", "moe-tiny", "--model.moe.top_k", "99")
    assert r.returncode == 2
    assert "model.moe.top_k" in r.stderr and "1..model.moe.n_experts=8" in r.stderr


def test_divergence_exits_nonzero(tmp_path):
    r = _moelab("train", "--preset", "tiny", "--steps", "5", "--out", str(tmp_path),
                env={"MOELAB_FAULT_NAN_AT_STEP": "1"})
    assert r.returncode == 3
    assert "diverged at step 1" in r.stderr


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c.d=x"]) == {"a.b": "1", "c.d": "x"}
    with pytest.raises(SystemExit, match="unrecognised argument"):
        parse_overrides(["--stpes", "3"])
    with pytest.raises(SystemExit, match="needs a value"):
        parse_overrides(["--a.b"])


def test_bare_resume_starts_fresh_then_is_a_no_op_when_finished(tmp_path):
    args = ("train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path), "--train.log_every", "1",
            "--resume")
    first = _moelab(*args)
    assert first.returncode == 0, first.stderr
    assert "starting from step 0" in first.stdout
    again = _moelab(*args)
    assert again.returncode == 0 and "starting from step 0" not in again.stdout
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a fresh run into the same directory starts a fresh log instead of appending to the old one
    fresh = _moelab(*args[:-1])
    assert fresh.returncode == 0
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
