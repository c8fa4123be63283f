"""`moelab sweep`: help, dry run, sweeps that cannot start failing with exit 2 before Ray starts, and a
tiny sweep submitted with `ray job submit` to a real local Ray head, with its results on S3 (moto)."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

import moelab.platform.controller as controller
from moelab.cli import LiveLine, main
from moelab.platform.store import Store

TINY = {"data.source": "synthetic", "train.steps": 6, "train.batch_size": 4, "train.seq_len": 16,
        "train.log_every": 2, "train.ckpt_every": 2, "train.eval_every": 0}


def write(path: Path, doc) -> str:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return str(path)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the sweep gets as far as starting (or joining) Ray."""

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(controller, "_init_ray", boom)
    monkeypatch.setattr(controller, "_tune", boom)


def test_help_shows_usage_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ("FILE_OR_CATALOGUE_NAME", "--dry-run", "--resume", "--storage", "--max-concurrent", "--wandb",
                 "examples:", "ray job submit"):
        assert text in out


def test_dry_run_prints_the_trials_without_ray(capsys, no_ray):
    assert main(["sweep", "noise", "--dry-run"]) == 0  # a catalogue name
    out = capsys.readouterr().out
    assert "trial_id" in out and "FLOPs" in out and "storage: results" in out
    assert "trials (" in out.splitlines()[-2]


def test_set_and_seeds_shrink_a_sweep(capsys, no_ray):
    assert main(["sweep", "expert-ratio", "--dry-run"]) == 0
    full = capsys.readouterr().out
    assert main(["sweep", "expert-ratio", "--dry-run", "--set", "train.steps=10", "--set",
                 "train.batch_size=2", "--seeds", "1"]) == 0
    small = capsys.readouterr().out
    assert "10 trials" in full and "5 trials" in small  # (1 baseline + 4 expert ratios) x 2 seeds, then 1 seed
    assert "-s1-" in small and "-s0-" not in small
    # 10 steps x 2 x the preset's seq_len tokens per trial, printed in the tokens column
    from moelab.platform.spec import expand, load_spec

    trials = expand(load_spec("expert-ratio", common={"train.steps": 10, "train.batch_size": 2}, seeds=[1]))
    assert {t.config.train.steps for t in trials} == {10} and {t.config.train.batch_size for t in trials} == {2}
    assert {t.trial_id for t in trials}.isdisjoint(full.split())  # new values, new trial ids
    # a baseline's own steps and seeds come after --set: the leverage demo's budgets survive a shrink
    demo = expand(load_spec("leverage-demo", common={"train.steps": 10}, seeds=[0]))
    assert sorted({t.config.train.steps for t in demo if t.family == "dense"}) == [200, 400, 800]
    assert {t.config.train.steps for t in demo if t.family == "moe"} == {10}


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.stepz=3"], "train.stepz"),
    (["--set", "train.steps"], "KEY=VALUE"),
    (["--set", "train.steps=-1"], "train.steps"),
])
def test_bad_set_exits_2_naming_the_key(args, needle, capsys, no_ray):
    assert main(["sweep", "leverage-demo", "--dry-run", *args]) == 2
    assert needle in capsys.readouterr().err


BAD = {
    "unknown key": ({"name": "b", "base": {"preset": "tiny"}, "sedes": [0]}, "sedes"),
    "wrong type": ({"name": "b", "base": {"preset": "tiny"}, "seeds": "zero"}, "seeds"),
    "empty axis": ({"name": "b", "base": {"preset": "moe-tiny"}, "axes": {"model.moe.top_k": []}}, "model.moe.top_k"),
    "unknown config key": ({"name": "b", "base": {"preset": "moe-tiny"}, "axes": {"model.moe.topk": [1]}},
                           "model.moe.topk"),
    "bad value": ({"name": "b", "base": {"preset": "moe-tiny"}, "axes": {"model.moe.top_k": [1, 99]}},
                  "model.moe.top_k"),
    "ep not dividing experts": ({"name": "b", "base": {"preset": "moe-tiny"},
                                 "resources": {"workers": 3, "ep": 3}}, "resources.ep"),
    "not yaml": ("name: [unclosed", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_files_exit_2_naming_the_key_before_ray(case, tmp_path, capsys, no_ray):
    doc, key = BAD[case]
    path = write(tmp_path / "bad.yaml", doc)
    assert main(["sweep", path, "--storage", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert key in err and err.startswith("moelab sweep:"), err
    assert not (tmp_path / "r").exists()  # nothing written


def test_missing_sweep_file_and_bad_max_concurrent_exit_2(tmp_path, capsys, no_ray):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep", "no-such-sweep"]) == 2
    assert "noise" in capsys.readouterr().err  # names the catalogue
    path = write(tmp_path / "ok.yaml", {"name": "ok", "common": TINY, "base": {"preset": "tiny"}})
    assert main(["sweep", path, "--max-concurrent", "0"]) == 2
    assert "--max-concurrent" in capsys.readouterr().err


def test_existing_results_need_resume(tmp_path, capsys, no_ray):
    path = write(tmp_path / "s.yaml", {"name": "again", "common": TINY, "base": {"preset": "tiny"}})
    Store(tmp_path / "r").write_trial({"sweep": "again", "trial_id": "x-s0-000000", "status": "finished"})
    assert main(["sweep", path, "--storage", str(tmp_path / "r")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_wandb_without_the_package_names_the_install(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    path = write(tmp_path / "s.yaml", {"name": "wb", "common": TINY, "base": {"preset": "tiny"}})
    assert main(["sweep", path, "--storage", str(tmp_path / "r"), "--wandb"]) == 2
    assert "pip install 'moelab[wandb]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# ray job submit


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head that `ray start --block` runs: SIGINT (as Ctrl-C: a clean stop in seconds; SIGTERM takes
    a minute), SIGKILL to its process group if it lingers, then any process of this head's session left
    over (its command line names the head's temp dir)."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGINT)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ray_job_submit_runs_a_sweep_on_a_local_head(tmp_path, s3_root):
    ray_cli = Path(sys.executable).with_name("ray")
    assert ray_cli.exists(), "the ray CLI comes with ray[default] (dev extra)"
    import ray.dashboard  # noqa: F401  (ray[default])
    port, dash, client, agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled",  # a local test head without token auth (refs.md)
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # Ray then uses 127.0.0.1, not the host's address
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray puts unix sockets under it
    # --block keeps `ray start` in the foreground: ending its process group stops this head and nothing else
    # (`ray stop` would stop every Ray on the machine, the test session's own included).
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
         "--object-manager-port", str(obj_mgr), "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        work = tmp_path / "job"
        work.mkdir()
        write(work / "job.yaml", {"name": "job", "common": TINY, "base": {"preset": "moe-tiny"},
                                  "axes": {"model.moe.top_k": [1, 2]}, "seeds": [0],
                                  "resources": {"workers": 1, "cpus_per_worker": 0.5}})
        runtime = {"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                             "AWS_DEFAULT_REGION")}}
        runtime["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
        entry = f"{shlex.quote(sys.executable)} -m moelab sweep job.yaml --storage {shlex.quote(s3_root)}"
        job = subprocess.run(
            [str(ray_cli), "job", "submit", "--address", address, "--working-dir", str(work),
             "--runtime-env-json", json.dumps(runtime), "--", *shlex.split(entry)],
            env=env, capture_output=True, text=True, timeout=400)
        out = job.stdout + job.stderr
        print(out[-6000:])
        assert job.returncode == 0, out[-4000:]
        assert "succeeded" in out and "2 trials (2 finished)" in out
        assert "sweep job: 2/2 done, 0 running, 0 pending" in out  # the progress line, without --verbose
        assert not any(f"{t}: running" in out for t in ("moe-top_k1", "moe-top_k2"))  # no per-trial lines
    finally:
        _stop_head(head, temp_dir)

    import moelab.results as mr

    r = mr.open(s3_root)
    trials = r.trials("job")
    assert sorted(trials.status) == ["finished", "finished"]
    m = r.metrics("job")
    assert sorted(m.groupby("trial_id").step.apply(list).tolist()) == [[2, 4, 6], [2, 4, 6]]
    assert len(r.experts("job")) == 2 * 3 * 2 * 8  # trials x steps x layers x experts
    # Ray's state went to the same S3 prefix: Tune's experiment and each trial's Train checkpoints.
    fs, path = pafs.FileSystem.from_uri(s3_root)
    for tid in trials.trial_id:
        infos = fs.get_file_info(pafs.FileSelector(f"{path}/_ray/job/train/{tid}", allow_not_found=True))
        assert any(i.base_name == "checkpoint-00000006" for i in infos), tid
        assert trials.set_index("trial_id").loc[tid, "checkpoint"].endswith(f"_ray/job/train/{tid}/checkpoint-00000006")


# ----------------------------------------------------------------------------------------------------------------
# Progress


def _progress(done: int, running: int):
    from moelab.platform.progress import SweepProgress

    return SweepProgress(sweep="sw", total=4, finished=done, diverged=0, failed=0, running=running,
                         pending=4 - done - running, tokens_per_s=1500.0, eta_s=75.0, elapsed_s=5.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """What a terminal shows after `text`: per line, what follows the last carriage return + erase-line."""
    return [line.rsplit("\r\x1b[K", 1)[-1] for line in text.split("\n")]


def test_live_line_is_redrawn_in_place_on_a_terminal_under_the_log_lines():
    term = _Terminal()
    live = LiveLine(term)
    live.progress(_progress(0, 1))
    live.log("t1: running")  # a --verbose line goes above the progress line, which is drawn again below it
    live.progress(_progress(0, 2))
    live.progress(_progress(1, 1))
    live.close()
    assert _screen(term.getvalue()) == [
        "[moelab sweep] t1: running",
        "sweep sw: 1/4 done, 1 running, 2 pending | 1.5k tok/s | ETA 1m15s | 5s elapsed",
        ""]


def test_live_line_prints_only_changes_when_not_a_terminal():
    out = io.StringIO()
    live = LiveLine(out, every_s=3600)
    for p in (_progress(0, 1), _progress(0, 1), _progress(0, 2), _progress(0, 2), _progress(1, 1)):
        live.progress(p)
    live.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3  # counts changed twice after the first line
    assert lines[-1].startswith("sweep sw: 1/4 done, 1 running")


def _ray_daemons() -> int:
    """Running raylet processes on this machine (one per local Ray node)."""
    out = subprocess.run(["pgrep", "-f", "raylet/raylet"], capture_output=True, text=True).stdout
    return len(out.split())


def _terminal_sigint() -> None:
    """In the child: SIGINT delivered as from a terminal, even when this test runs as a background job
    (which starts with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_sweep_and_its_ray(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) mid-sweep: exit 130 with the resume command, and the
    local Ray the sweep started is gone."""
    doc = {"name": "ctrlc", "common": {**TINY, "train.steps": 2000, "train.ckpt_every": 0}, "base": {"preset": "tiny"},
           "seeds": [0], "storage": str(tmp_path / "results")}
    path = write(tmp_path / "ctrlc.yaml", doc)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    before = _ray_daemons()
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "sweep", path], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_terminal_sigint)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # wait until the trial runs (not a terminal: the progress line prints on changes)
            lines.append(line)
            if ", 1 running," in line:
                break
        assert _ray_daemons() == before + 1, "".join(lines)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + out
    assert proc.returncode == 130, text[-3000:]
    assert f"moelab sweep {path} --storage {tmp_path / 'results'} --resume" in text
    deadline = time.time() + 30
    while _ray_daemons() > before and time.time() < deadline:
        time.sleep(0.5)
    assert _ray_daemons() == before
