"""The Ray Train worker (Train V2): 2 CPU workers, expert parallel, one worker killed mid-run, resumed."""

import json
from pathlib import Path

import pytest

from moelab.platform.worker import FAULT_ENV, FAULT_MARKER, _rank_files, fit
from moelab.trainers.config import load_run_config
from moelab.trainers.loop import train


RUN = {"train.batch_size": 4, "train.seq_len": 16, "train.log_every": 2, "train.eval_every": 0,
       "train.ckpt_every": 4, "train.steps": 8, "model.moe.bias_update_rate": 0.01}


def test_two_workers_survive_a_killed_worker_and_match_one_process(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "6")  # after step 6: the step-4 checkpoint is the newest
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the controller polls workers faster
    rc = load_run_config("moe-tiny", {**RUN, "train.ep": 2})
    result = fit(rc, storage_path=str(tmp_path / "ray"), name="fault", num_workers=2, cpus_per_worker=0.5,
                 max_failures=1)
    assert result.error is None
    run = tmp_path / "ray" / "fault" / "run"
    assert (run / FAULT_MARKER).exists()  # the fault did happen
    assert result.metrics["step"] == 8 and result.metrics["attempt"] == 1  # finished by the restarted attempt
    assert len(result.metrics["expert_load"]) == 2 and "eval_loss" in result.metrics
    ckpt = result.checkpoint.path  # Ray merged both ranks' shard files into one DCP directory
    names = {p.name for p in Path(ckpt).iterdir()}
    assert {".metadata", "meta.json", "__0_0.distcp", "__1_0.distcp"} <= names

    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # steps 5-6 recomputed after the restart, not duplicated
    single = load_run_config("moe-tiny", RUN)
    train(single, tmp_path / "single", progress=False)
    ref = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-4)


def test_rank_files_split_a_checkpoint(tmp_path):
    for name in (".metadata", "meta.json", "__0_0.distcp", "__1_0.distcp"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in _rank_files(tmp_path, 1)] == ["__1_0.distcp"]
    assert [p.name for p in _rank_files(tmp_path, 0)] == ["__0_0.distcp", ".metadata", "meta.json"]
    (tmp_path / "checkpoint.pt").write_text("x")
    assert _rank_files(tmp_path / "checkpoint.pt", 1) == []
