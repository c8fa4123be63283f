"""Hostile and damaged inputs to one run (issue 16, points 1 and 6): checkpoints that carry a pickled
payload, truncated or foreign checkpoints, broken metrics.jsonl files, a directory given as a file.

Each payload creates a directory when unpickled; every test checks that moelab refused the file with a clear
message and that the directory does not exist, and the first ones also unpickle the same file the unsafe way
to prove the payload was live (so the test would fail on code that loads with plain pickle)."""

import json
import os
import pickle
import warnings

import pytest
import torch

from moelab.cli import main
from moelab.trainers.config import load_run_config
from moelab.trainers.loop import CheckpointError, Trainer, read_metrics_jsonl, train


class Payload:
    """Unpickles to os.mkdir(marker): the smallest code execution that leaves a trace to check."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _rc(preset="moe-tiny", **overrides):
    base = {"train.log_every": 1, "train.eval_every": 0, "train.batch_size": 4, "train.seq_len": 32,
            "train.ckpt_every": 4, "train.steps": 8}
    base.update(overrides)
    return load_run_config(preset, base)


def _evil_checkpoint(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optim": Payload(marker), "step": 1, "config": {}}, path)
    return path


def _train_cli(capsys, *args):
    code = main(["train", "--preset", "moe-tiny", "--steps", "2", "--train.batch_size", "4",
                 "--train.seq_len", "32", *args])
    return code, capsys.readouterr().err


def test_resume_from_a_pickled_payload_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil" / "checkpoint.pt", marker)
    code, err = _train_cli(capsys, "--out", str(tmp_path / "run"), "--resume", str(evil))
    assert code == 2 and not marker.exists()
    assert "refused" in err and str(evil) in err and "Traceback" not in err
    torch.load(evil, weights_only=False)  # the same file, loaded the unsafe way: the payload is live
    assert marker.exists()


def test_init_from_a_pickled_payload_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "evil" / "checkpoint.pt", marker)
    code, err = _train_cli(capsys, "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "evil"))
    assert code == 2 and not marker.exists()
    assert "refused" in err and "upcycle.source" in err
    # an upcycling source named by a sweep reaches the same loader through the config
    with pytest.raises(CheckpointError, match="refused"):
        Trainer(_rc(**{"upcycle.source": str(tmp_path / "evil")}), tmp_path / "run2", progress=False)
    assert not marker.exists()


def test_dcp_metadata_payload_runs_nothing(tmp_path, capsys):
    """A sharded checkpoint directory: torch.distributed.checkpoint reads `.metadata` with plain pickle."""
    marker = tmp_path / "pwned"
    d = tmp_path / "evil" / "ckpt-00000004"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (d / "meta.json").write_text(json.dumps({"step": 4, "wall_s": 0.0, "config": {}}))
    code, err = _train_cli(capsys, "--out", str(tmp_path / "run"), "--resume", str(d))
    assert code == 2 and not marker.exists()
    assert "refused" in err and ".metadata" in err
    pickle.loads((d / ".metadata").read_bytes())
    assert marker.exists()


def test_dcp_stored_value_payload_runs_nothing(tmp_path):
    """A real DCP checkpoint whose optimizer hyper-parameter (a non-tensor value, stored with torch.save and
    loaded by DCP with weights_only=False) was replaced by a payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    marker = tmp_path / "pwned"
    tr = Trainer(_rc(), tmp_path / "src", progress=False)
    model_sd, optim_sd = get_state_dict(tr.model, tr.opt)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)
    d = tmp_path / "evil" / "ckpt-00000004"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=d, no_dist=True)
    (d / "meta.json").write_text(json.dumps({"step": 4, "wall_s": 0.0, "config": {}}))
    with pytest.raises(CheckpointError, match="refused"):
        Trainer(_rc(), tmp_path / "run", progress=False).load_checkpoint(d)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_say_so(tmp_path, capsys):
    train(_rc(), tmp_path / "a", progress=False)
    ckpt = tmp_path / "a" / "checkpoint.pt"
    cut = tmp_path / "cut" / "checkpoint.pt"
    cut.parent.mkdir()
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy interrupted half way
    code, err = _train_cli(capsys, "--out", str(tmp_path / "r1"), "--resume", str(cut))
    assert code == 2 and "not a readable checkpoint" in err and str(cut) in err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)  # safe to load, but not a moelab checkpoint
    with pytest.raises(CheckpointError, match="not a moelab checkpoint"):
        Trainer(_rc(), tmp_path / "r2", progress=False).load_checkpoint(other)


def test_incompatible_checkpoint_names_the_tensor_and_the_setting(tmp_path, capsys):
    train(_rc(), tmp_path / "a", progress=False)  # 8 experts
    code, err = _train_cli(capsys, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a"),
                           "--model.moe.n_experts", "4")
    assert code == 2 and "Traceback" not in err
    assert "does not fit this model" in err and "tensor 'layers." in err
    assert "[8," in err and "[4," in err and "model.moe.n_experts=8 (this run: 4)" in err


def test_partial_last_metrics_line_is_tolerated_on_resume(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_6(row, ckpt):
        if row["step"] == 6:
            raise Crash

    with pytest.raises(Crash):
        Trainer(_rc(), tmp_path, progress=False, report=crash_at_6).run()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # killed while writing step 7's row
    out = train(_rc(), tmp_path, resume=tmp_path, progress=False)
    assert out["steps"] == 8
    assert [r["step"] for r in read_metrics_jsonl(path, partial_last=False)] == list(range(1, 9))


def test_bad_metrics_line_names_file_and_line(tmp_path):
    train(_rc(), tmp_path, progress=False)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: unreadable metrics line"):
        train(_rc(), tmp_path, resume=tmp_path, progress=False)
    # a complete (newline-terminated) last line that does not parse is damage, not a killed write
    path.write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics_jsonl(path)
    path.write_text('{"step": 1}\n{"step": 2')
    assert read_metrics_jsonl(path) == [{"step": 1}]


def test_metrics_jsonl_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, err = _train_cli(capsys, "--out", str(tmp_path / "run"), "--metrics-jsonl", str(tmp_path / "m"))
    assert code == 2 and "is a directory" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before any step
