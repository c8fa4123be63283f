"""The sweep controller on the session's local Ray (2 CPUs), on both trial paths: a 1-worker trial trains
inside its Tune trial ("tune", the default) or, with `resources.ray_train`, as a Ray Train run ("train").
For each path: a 2-axis x 2-seed grid with a dense baseline, one worker killed mid-trial and one
NaN-injected trial (one sweep, read by several tests); a controller killed mid-sweep and resumed. Then the
two grids side by side (a trial logs the same rows on both paths), and the pieces that need no Ray
(concurrency, fault selectors, W&B sink, checkpoints of a trial inside Tune).

The grid runs with worker_retries=0, so the killed worker fails its run and the trial is rerun by Tune
(the driver-level retry), resuming from its checkpoint: on Ray Train the Train run resumes by name, inside
a Tune trial the trial finds its own newest checkpoint. The worker-level restart (Ray Train's own
FailureConfig, `worker_retries` >= 1, the default) is tested in test_worker.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

import moelab.results as mr
from moelab.platform.controller import (FAULT_NAN_TRIAL_ENV, FAULT_TRIAL_ENV, RAY_DIR, SweepError,
                                        format_report, max_concurrent_trials, run_sweep, trial_env)
from moelab.platform.spec import SpecError, expand, load_spec, parse_spec
from moelab.platform.store import Lease, Store
from moelab.platform.worker import FAULT_ENV, FAULT_MARKER
from moelab.trainers.loop import FAULT_NAN_ENV

# Tiny trials: 6 steps of 4 x 16 tokens, a row every 2 steps, a checkpoint every 2 steps.
TINY = {"data.source": "synthetic", "train.steps": 6, "train.batch_size": 4, "train.seq_len": 16,
        "train.log_every": 2, "train.ckpt_every": 2, "train.eval_every": 0}
LOGGED = [2, 4, 6]
RESOURCES = {"workers": 1, "cpus_per_worker": 0.5}  # on 2 CPUs: see refs.md
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # Ray Train's controller polls workers faster


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # axis order names the trials
    return path


PATHS = ["tune", "train"]  # a 1-worker trial inside its Tune trial (default), or as a Ray Train run


def resources(path: str) -> dict:
    return {**RESOURCES, "ray_train": path == "train"}


def grid_doc(name: str, path: str = "tune") -> dict:
    return {"name": name, "common": TINY, "baselines": [{"preset": "tiny", "seeds": [0]}],
            "base": {"preset": "moe-tiny"},
            "axes": {"upcycle_from": [None, "tiny"], "model.moe.top_k": [1, 2]},
            "seeds": [0, 1], "resources": resources(path)}


def blank(value) -> bool:
    """None, NaN (a null in a pandas column) or ""."""
    return value is None or value == "" or (isinstance(value, float) and value != value)


def trial_rows(root, sweep):
    return {r["trial_id"]: r for r in mr.open(root).trials(sweep).to_dict("records")}


def steps_by_trial(root, sweep):
    m = mr.open(root).metrics(sweep)
    return {tid: list(g["step"]) for tid, g in m.groupby("trial_id")}, m


# ----------------------------------------------------------------------------------------------------------------
# One sweep, several tests


NAN_TRIAL = "moe-scratch-top_k1-s1"  # diverges at its 4th step
KILL_TRIAL = "moe-from-tiny-top_k2-s0"  # loses a worker after logged step 4 (checkpoint 4), resumes there


def run_grid(tmp_path_factory, path: str) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp(f"grid-{path}")
    spec = load_spec(write_spec(tmp / "grid.yaml", grid_doc("grid", path)))
    root = str(tmp / "results")
    env = {**FAST_POLL, FAULT_NAN_ENV: "3", FAULT_NAN_TRIAL_ENV: NAN_TRIAL, FAULT_ENV: "4", FAULT_TRIAL_ENV: KILL_TRIAL}
    lines: list[str] = []
    progress: list = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        t0 = time.time()
        report = run_sweep(spec, storage=root, max_concurrent=2, worker_retries=0, trial_retries=1,
                           log=lambda m: lines.append(f"{time.time() - t0:.1f} {m}"), progress=progress.append)
    print("\n".join(lines))
    print(format_report(report))
    trials = expand(spec)
    ids = {t.trial_id: t for t in trials}
    pick = lambda prefix: next(t for t in ids if t.startswith(prefix))  # noqa: E731
    return SimpleNamespace(path=path, report=report, root=root, trials=trials, ids=ids, lines=lines,
                           progress=progress, nan=pick(NAN_TRIAL), killed=pick(KILL_TRIAL))


@pytest.fixture(scope="module")
def grid_tune(ray_local, tmp_path_factory):
    return run_grid(tmp_path_factory, "tune")


@pytest.fixture(scope="module")
def grid_train(ray_local, tmp_path_factory):
    return run_grid(tmp_path_factory, "train")


@pytest.fixture(params=PATHS)
def grid(request):
    """The grid sweep of one path (each runs once per module, shared by the tests of that path)."""
    return request.getfixturevalue(f"grid_{request.param}")


def test_grid_has_one_trials_row_per_trial_and_the_expected_statuses(grid):
    assert len(grid.trials) == 9  # 1 baseline + 2 x 2 axis values x 2 seeds
    assert grid.report.path == grid.path
    rows = trial_rows(grid.root, "grid")
    assert set(rows) == set(grid.ids)
    assert len(mr.open(grid.root).trials("grid")) == 9
    expected = {tid: ("diverged" if tid == grid.nan else "finished") for tid in grid.ids}
    assert {tid: r["status"] for tid, r in rows.items()} == expected
    assert grid.report.status == expected and grid.report.ok  # diverged is an outcome, not a failure
    for tid, r in rows.items():
        if r["status"] == "finished":
            assert r["final_step"] == 6 and r["final_loss"] > 0 and r["final_eval_loss"] > 0, tid
            assert blank(r["error"]), tid
            ckpt = Path(r["checkpoint"])
            assert ckpt.name == "checkpoint-00000006" and (ckpt / "checkpoint.pt").is_file(), tid
        t = grid.ids[tid]
        assert r["family"] == t.family and r["seed"] == t.seed and r["params_total"] == t.params_total


def test_every_logged_step_is_stored_once(grid):
    steps, m = steps_by_trial(grid.root, "grid")
    for tid in grid.ids:
        want = LOGGED[:1] if tid == grid.nan else LOGGED
        assert steps[tid] == want, tid
    assert not m.duplicated(["trial_id", "step"]).any()
    assert m["loss"].notna().all() and m["tokens"].tolist() == [s * 64 for s in m["step"]]
    # Finished trials were compacted into one file per table.
    files = os.listdir(Path(grid.root) / "metrics" / "sweep=grid")
    assert sorted(f.split(".")[0] for f in files) == sorted(grid.ids)


def moe_rows(grid, table):
    """(trial_id, trial, its rows of `table`, the steps it logged) for each MoE trial; a dense trial has none."""
    frame = getattr(mr.open(grid.root), table)("grid")
    for tid, t in grid.ids.items():
        rows = frame[frame.trial_id == tid]
        if t.family == "dense":
            assert rows.empty, tid
            continue
        yield tid, t, rows, (LOGGED[:1] if tid == grid.nan else LOGGED)


def test_expert_rows_per_step_layer_and_expert(grid):
    for tid, t, rows, want in moe_rows(grid, "experts"):
        n_layers, n_experts = t.config.model.n_layers, t.config.model.moe.n_experts
        assert len(rows) == len(want) * n_layers * n_experts, tid
        assert not rows.duplicated(["step", "layer", "expert"]).any()
        assert sorted(rows.step.unique()) == want
        sums = rows.groupby(["step", "layer"])["load"].sum()
        assert sums.to_numpy() == pytest.approx(1.0, abs=1e-4)


def test_routing_rows_per_step_layer_domain_and_expert(grid):
    """Synthetic data: the trainer's per-domain counts reach the `routing` table through Ray and the sink."""
    e = mr.open(grid.root).experts("grid")
    for tid, t, rows, want in moe_rows(grid, "routing"):
        n_layers, n_experts = t.config.model.n_layers, t.config.model.moe.n_experts
        assert len(rows) == len(want) * n_layers * t.config.data.n_domains * n_experts, tid
        assert sorted(rows.step.unique()) == want
        assert not rows.duplicated(["step", "layer", "domain", "expert"]).any()
        per = rows.groupby(["step", "layer", "expert"]).tokens.sum()  # over domains: the experts table's load
        frac = per / per.groupby(level=[0, 1]).transform("sum")
        load = e[e.trial_id == tid].set_index(["step", "layer", "expert"]).load
        assert frac.to_numpy() == pytest.approx(load.reindex(frac.index).to_numpy(), abs=1e-5)


def test_upcycled_trials_start_after_their_baseline_from_its_final_checkpoint(grid):
    rows = trial_rows(grid.root, "grid")
    base = next(t for t in grid.ids.values() if t.family == "dense").trial_id
    finished_at = next(float(l.split()[0]) for l in grid.lines if l.split()[1] == f"{base}:" and "finished" in l)
    dependents = [t for t in grid.ids.values() if t.depends_on == base]
    assert len(dependents) == 4  # seeds 0 and 1 both upcycle from the seed-0 baseline
    for t in dependents:
        started = next(float(l.split()[0]) for l in grid.lines if l.split()[1] == f"{t.trial_id}:" and "running" in l)
        assert started >= finished_at, t.trial_id
        assert rows[t.trial_id]["upcycle.source"] == rows[base]["checkpoint"]
    for t in grid.ids.values():
        if t.family == "moe" and t.depends_on is None:
            assert blank(rows[t.trial_id]["upcycle.source"])


def test_killed_worker_resumes_from_its_checkpoint_without_missing_or_duplicate_steps(grid):
    run_dir = Path(grid.root) / RAY_DIR / "grid" / "train" / grid.killed / "run"
    assert (run_dir / FAULT_MARKER).exists()  # the fault happened
    others = [tid for tid in grid.ids if tid not in (grid.killed,)]
    assert not any((Path(grid.root) / RAY_DIR / "grid" / "train" / t / "run" / FAULT_MARKER).exists() for t in others)
    _, m = steps_by_trial(grid.root, "grid")
    rows = m[m.trial_id == grid.killed]
    assert rows.step.tolist() == LOGGED
    # Attempt 1 resumed from checkpoint 4 (or 2, had Ray not registered 4 yet): it re-sent the rows up to its
    # checkpoint and computed the rest; readers keep attempt 1's rows.
    assert rows.attempt.tolist() in ([0, 1, 1], [1, 1, 1])
    raw = pq.read_table(Path(grid.root) / "metrics" / "sweep=grid").to_pandas()
    assert raw[raw.trial_id == grid.killed].step.tolist().count(6) == 1
    assert trial_rows(grid.root, "grid")[grid.killed]["attempt"] == 1
    assert any(grid.killed in l and "failed, retrying" in l for l in grid.lines)  # Tune reran the trial
    assert any(grid.killed in l and "resumed from" in l for l in grid.lines)  # from its Train checkpoint


def test_nan_trial_is_diverged_and_not_retried(grid):
    row = trial_rows(grid.root, "grid")[grid.nan]
    assert row["status"] == "diverged" and "diverged at step 3" in row["error"]
    assert row["attempt"] == 0 and row["final_step"] == 2
    run_dir = Path(grid.root) / RAY_DIR / "grid" / "train" / grid.nan / "run"
    assert sorted(p.name for p in run_dir.glob("attempt-*")) == ["attempt-0"]  # one start: no retry


def test_the_progress_line_counts_every_trial_once(grid):
    """Snapshots at every trial start and end: never more running than allowed, and at the end every trial done
    (the NaN trial as diverged), nothing pending."""
    snaps = grid.progress
    assert snaps and all(p.total == 9 and p.running <= 2 for p in snaps)
    assert all(p.done + p.running + p.pending == 9 for p in snaps)
    assert [p.done for p in snaps] == sorted(p.done for p in snaps)  # done never goes back
    last = snaps[-1]
    assert (last.finished, last.diverged, last.failed, last.running, last.pending) == (8, 1, 0, 0, 0)
    assert last.line().startswith("sweep grid: 9/9 done (1 diverged), 0 running, 0 pending | ")
    assert max(p.tokens_per_s for p in snaps) > 0 and any(p.eta_s is not None for p in snaps)


def test_a_second_run_without_resume_is_refused(grid):
    spec = parse_spec(grid_doc("grid", grid.path))
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(spec, storage=grid.root)


def test_resuming_a_finished_sweep_runs_nothing(grid):
    before = trial_rows(grid.root, "grid")
    report = run_sweep(parse_spec(grid_doc("grid", grid.path)), storage=grid.root, resume=True, log=lambda m: None)
    assert report.ran == [] and sorted(report.skipped) == sorted(grid.ids)
    after = trial_rows(grid.root, "grid")
    assert {t: r["updated_at"] for t, r in after.items()} == {t: r["updated_at"] for t, r in before.items()}


def test_a_second_writer_is_refused_naming_the_first(grid_tune):
    """Two `--resume` runs of one sweep would hide each other's rows: the second stops before it reads the
    store or starts anything, and says who holds the sweep."""
    spec = parse_spec(grid_doc("grid", grid_tune.path))
    holder = Store(grid_tune.root).lease("grid", owner="alice@node7 pid 4242", settle_s=0)
    with holder:
        with pytest.raises(SweepError, match="alice@node7 pid 4242") as e:
            run_sweep(spec, storage=grid_tune.root, resume=True, log=lambda m: None)
        assert "lapses" in str(e.value)
    # released: the next resume runs (nothing left to do) and leaves no lease behind
    report = run_sweep(spec, storage=grid_tune.root, resume=True, log=lambda m: None, lease_kw={"settle_s": 0})
    assert report.ran == [] and holder.read() is None


def after_lease_call(monkeypatch, method: str, then) -> None:
    """Every sweep lease made from now on runs `then(lease)` right after its `method` (claim / confirm)."""
    real = Store.lease

    def patched(self, sweep, **kw):
        lease = real(self, sweep, **kw)
        original = getattr(lease, method)

        def wrapped():
            original()
            then(lease)
            return lease
        setattr(lease, method, wrapped)
        return lease

    monkeypatch.setattr(Store, "lease", patched)


def test_a_rival_that_wins_the_settle_wait_stops_the_sweep_before_it_writes(tmp_path, ray_local, monkeypatch):
    """The lease is claimed, then confirmed after its settle wait, while Ray and Tune start. A rival whose
    record replaced this run's claim in between wins: this run stops naming it and has written nothing, no
    trials row and no Tune experiment."""
    def rival_writes(lease):  # the rival's record lands after this run's claim
        Lease(lease.store, lease.sweep, owner="bob@node3 pid 77", settle_s=0)._write()

    after_lease_call(monkeypatch, "claim", rival_writes)
    doc = {"name": "rival", "common": TINY, "base": {"preset": "tiny"}, "seeds": [0], "resources": RESOURCES}
    with pytest.raises(SweepError, match="bob@node3 pid 77"):
        run_sweep(parse_spec(doc), storage=str(tmp_path), log=lambda m: None, lease_kw={"settle_s": 0.2})
    assert not list(tmp_path.glob("trials/**/*.parquet"))
    assert not (tmp_path / "_ray" / "rival").exists()


def test_a_crashed_writers_lease_lapses(grid_tune):
    spec = parse_spec(grid_doc("grid", grid_tune.path))
    dead = Store(grid_tune.root).lease("grid", owner="crashed pid 1", settle_s=0, ttl_s=0.01)
    dead._write()  # a record whose owner never renews it (killed -9)
    time.sleep(0.05)
    report = run_sweep(spec, storage=grid_tune.root, resume=True, log=lambda m: None, lease_kw={"settle_s": 0})
    assert report.ran == [] and dead.read() is None


def test_a_lost_lease_is_an_error_not_a_silent_success(grid_tune, monkeypatch):
    spec = parse_spec(grid_doc("grid", grid_tune.path))
    # what the heartbeat sets when another process took the lease over
    after_lease_call(monkeypatch, "confirm", lambda lease: setattr(lease, "lost", True))
    with pytest.raises(SweepError, match="took over its lease"):
        run_sweep(spec, storage=grid_tune.root, resume=True, log=lambda m: None, lease_kw={"settle_s": 0})


TIMING = ["wall_s", "tokens_per_s", "mfu"]  # clocks: the only columns that differ between runs


def test_a_trial_logs_the_same_rows_on_both_paths(grid_tune, grid_train):
    """Same trial id and seed, two paths: every undisturbed trial (baseline, from scratch, upcycled from the
    baseline's checkpoint) stores exactly the same rows in metrics, experts and routing, and the same final
    fields in trials."""
    calm = sorted(t for t in grid_tune.ids if t not in (grid_tune.nan, grid_tune.killed))
    assert set(grid_train.ids) == set(grid_tune.ids) and len(calm) == 7
    keys = {"metrics": ["trial_id", "step"], "experts": ["trial_id", "step", "layer", "expert"],
            "routing": ["trial_id", "step", "layer", "domain", "expert"]}
    for table, by in keys.items():
        a, b = (getattr(mr.open(g.root), table)("grid") for g in (grid_tune, grid_train))
        a, b = ((f[f.trial_id.isin(calm)].drop(columns=[c for c in TIMING if c in f.columns])
                 .sort_values(by).reset_index(drop=True)) for f in (a, b))
        assert len(a) > 0 and set(a.trial_id) == (set(calm) if table == "metrics" else set(a.trial_id))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=table)
    final = ["status", "attempt", "final_step", "final_tokens", "final_flops", "final_loss", "final_eval_loss"]
    rows = [trial_rows(g.root, "grid") for g in (grid_tune, grid_train)]
    assert [[rows[0][t][k] for k in final] for t in calm] == [[rows[1][t][k] for k in final] for t in calm]


# ----------------------------------------------------------------------------------------------------------------
# A crashed controller


@pytest.mark.parametrize("path", PATHS)
def test_killed_controller_resumes_without_rerunning_finished_trials(ray_local, tmp_path, path):
    # Inside Tune trials a 10-step trial lasts well under a second: 40 steps leave time to kill the controller
    # while an upcycled trial is part-way.
    steps = 40 if path == "tune" else 10
    doc = {"name": "crash", "common": {**TINY, "train.steps": steps}, "baselines": [{"preset": "tiny"}],
           "base": {"preset": "moe-tiny", "upcycle_from": "tiny"}, "axes": {"model.moe.top_k": [1, 2]},
           "seeds": [0], "resources": resources(path)}
    spec_path = write_spec(tmp_path / "crash.yaml", doc)
    trials = expand(load_spec(spec_path))
    base, deps = trials[0].trial_id, [t.trial_id for t in trials[1:]]
    root = tmp_path / "results"
    env = {**os.environ, **FAST_POLL, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = open(tmp_path / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "sweep", str(spec_path), "--storage", str(root),
                             "--max-concurrent", "2", "--verbose"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    store = Store(root)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            try:
                base_row = store.read_trial("crash", base)
            except OSError:  # pq.read_table(path) can meet the controller's rename of the row mid-read: look again
                continue
            files = list((root / "metrics" / "sweep=crash").glob(f"{deps[0]}.*")) + \
                list((root / "metrics" / "sweep=crash").glob(f"{deps[1]}.*"))
            if base_row and base_row["status"] == "finished" and files:
                break  # the baseline is done and a dependent is part-way (it flushed a checkpoint's rows)
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "controller.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the controller (and nothing else) dies at once
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "controller.log").read_text()
    assert f"[moelab sweep] {base}: finished" in text and "sweep crash: 1/3 done" in text  # --verbose: both kinds
    killed_at = {t: (store.read_trial("crash", t) or {}).get("status") for t in [base, *deps]}
    had_rows = {t for t in deps if list((root / "metrics" / "sweep=crash").glob(f"{t}.*"))}
    assert killed_at[base] == "finished" and "running" in killed_at.values(), killed_at
    base_updated = store.read_trial("crash", base)["updated_at"]
    base_run = root / RAY_DIR / "crash" / "train" / base / "run"
    assert sorted(p.name for p in base_run.glob("attempt-*")) == ["attempt-0"]

    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAST_POLL.items():
            mp.setenv(k, v)
        report = run_sweep(load_spec(spec_path), storage=str(root), resume=True, max_concurrent=2, log=print)
    print(format_report(report))
    assert report.skipped == [base] and sorted(report.ran) == sorted(t for t in deps if killed_at[t] != "finished")
    assert report.status == {t: "finished" for t in [base, *deps]}
    # The baseline did not run again: same row, one start of its run directory.
    assert store.read_trial("crash", base)["updated_at"] == base_updated
    assert sorted(p.name for p in base_run.glob("attempt-*")) == ["attempt-0"]
    logged, m = steps_by_trial(root, "crash")
    assert logged == {t: list(range(2, steps + 1, 2)) for t in [base, *deps]}
    resumed = [t for t in deps if killed_at[t] == "running" and t in had_rows]
    assert resumed  # at least one trial was cut mid-run (it had stored the rows of a checkpoint)
    for t in resumed:  # it resumed from its latest checkpoint (same run directory); new rows, new attempt
        row = store.read_trial("crash", t)
        assert row["attempt"] == 1 and m[m.trial_id == t].attempt.max() == 1
        run_dir = root / RAY_DIR / "crash" / "train" / t / "run"
        assert sorted(p.name for p in run_dir.glob("attempt-*")) == ["attempt-0", "attempt-1"]


# ----------------------------------------------------------------------------------------------------------------
# Pieces without Ray


def test_max_concurrent_trials_from_the_cluster_resources():
    spec = parse_spec({"name": "c", "base": {"preset": "tiny"}, "resources": {"workers": 2, "cpus_per_worker": 1}})
    assert max_concurrent_trials(spec, {"CPU": 8.0}, 10) == 4
    assert max_concurrent_trials(spec, {"CPU": 8.0}, 3) == 3  # no more than there are trials
    assert max_concurrent_trials(spec, {"CPU": 3.0}, 10) == 1
    gpu = parse_spec({"name": "g", "base": {"preset": "tiny"},
                      "resources": {"workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 1}})
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}, 10) == 4  # GPUs bind first
    big = parse_spec({"name": "b", "base": {"preset": "tiny"}, "resources": {"workers": 4}})
    with pytest.raises(SweepError, match="needs 4 CPUs"):
        max_concurrent_trials(big, {"CPU": 2.0}, 10)


def test_fault_hooks_reach_only_the_selected_trials():
    environ = {FAULT_NAN_ENV: "3", FAULT_NAN_TRIAL_ENV: "top_k1-s1", FAULT_ENV: "4", FAULT_TRIAL_ENV: "from-tiny",
               "MOELAB_OTHER": "x", "HOME": "/root"}
    assert trial_env("moe-scratch-top_k1-s1-abc", environ) == {FAULT_NAN_ENV: "3", "MOELAB_OTHER": "x"}
    assert trial_env("moe-from-tiny-top_k2-s0-abc", environ) == {FAULT_ENV: "4", "MOELAB_OTHER": "x"}
    assert trial_env("tiny-s0-abc", {FAULT_NAN_ENV: "3"}) == {FAULT_NAN_ENV: "3"}  # no selector: every trial


def test_wandb_sink_logs_each_trial_offline(tmp_path, monkeypatch):
    import wandb  # noqa: F401  (dev extra)
    from moelab.platform.sink import WandbSink, wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not configured
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert wandb_mode() == "offline"
    trial = SimpleNamespace(config={"trial_id": "t-s0-abc"})
    sink = WandbSink("sw", {"t-s0-abc": {"trial_id": "t-s0-abc", "model.d_model": 64}})
    sink.on_trial_start(0, [], trial)
    for step in (2, 4, 2, 6):  # a repeated step (a restart) is not logged twice
        sink.on_trial_result(0, [], trial, {"step": step, "loss": 5.0 - step / 10, "expert_load": [[0.5, 0.5]]})
    logged = []
    real_log = sink._run("t-s0-abc").log
    sink._run("t-s0-abc").log = lambda data, step: (logged.append(step), real_log(data, step=step))
    sink.on_trial_result(0, [], trial, {"step": 12, "loss": 3.0, "earlier": [{"step": 8, "loss": 4.2},
                                                                             {"step": 10, "loss": 4.0}]})
    assert logged == [8, 10, 12]  # batched rows first, in order
    sink.on_trial_complete(0, [], trial)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert sink.last_step == {"t-s0-abc": 12}


def test_trials_are_handed_out_in_order_and_dependents_wait_for_their_source():
    from ray.tune.search import Searcher

    from moelab.platform.controller import _make_searcher

    queue = [{"trial_id": "base-a", "depends_on": None}, {"trial_id": "base-b", "depends_on": None},
             {"trial_id": "moe-a", "depends_on": "base-a"}, {"trial_id": "moe-b", "depends_on": "base-b"},
             {"trial_id": "moe-x", "depends_on": None}]
    status = {q["trial_id"]: "pending" for q in queue}
    checkpoints: dict[str, str] = {}
    blocked = []
    s = _make_searcher(queue, status, checkpoints, lambda tid, dep, st: blocked.append((tid, dep, st)))
    take = lambda: s.suggest("tune-id")  # noqa: E731
    assert [take()["trial_id"] for _ in range(3)] == ["base-a", "base-b", "moe-x"]  # moe-a/b wait
    assert take() is None  # nothing ready: Tune asks again later
    status["base-a"], checkpoints["base-a"] = "finished", "/ckpt/a"
    status["base-b"] = "diverged"
    got = take()
    assert got["trial_id"] == "moe-a" and got["upcycle_checkpoint"] == "/ckpt/a"
    assert take() == Searcher.FINISHED and blocked == [("moe-b", "base-b", "diverged")]


def test_store_sink_stores_batched_rows_in_order(tmp_path):
    """A worker's report carries the rows it batched before it (`earlier`): all of them reach the store."""
    from moelab.platform.sink import StoreSink
    from moelab.platform.worker import EARLIER_KEY

    store = Store(tmp_path)
    sink = StoreSink(store, "sw", {"t-s0-abc": 8})
    trial = SimpleNamespace(config={"trial_id": "t-s0-abc"})
    row = lambda s: {"step": s, "loss": 5.0 - s / 10, "tokens": 16 * s, "attempt": 0}  # noqa: E731
    sink.on_trial_result(0, [], trial, {**row(6), EARLIER_KEY: [row(2), row(4)]})
    sink.on_trial_result(0, [], trial, row(8))
    store.flush()
    m = mr.open(tmp_path).metrics("sw")
    assert list(m["step"]) == [2, 4, 6, 8] and list(m["loss"]) == pytest.approx([4.8, 4.6, 4.4, 4.2])
    assert set(m["attempt"]) == {0}
    assert sink.state["t-s0-abc"].last_step == 8


def test_resources_choose_the_trial_path():
    one = parse_spec({"name": "p", "base": {"preset": "tiny"}})
    assert one.resources.in_tune  # the default: a 1-worker trial trains inside its Tune trial
    assert not parse_spec({"name": "p", "base": {"preset": "tiny"},
                           "resources": {"ray_train": True}}).resources.in_tune
    assert not parse_spec({"name": "p", "base": {"preset": "tiny"},
                           "resources": {"workers": 2}}).resources.in_tune  # several workers: Ray Train
    with pytest.raises(SpecError, match="ray_train"):
        parse_spec({"name": "p", "base": {"preset": "tiny"}, "resources": {"ray_train": "yes"}})


def test_a_trial_in_tune_keeps_its_two_newest_checkpoints_whole(tmp_path):
    """Inside a Tune trial the run persists its own checkpoints (Ray Train's layout) and resumes from the newest
    complete one."""
    from moelab.platform.worker import _TuneChannel

    root = tmp_path / "train" / "t-s0-abc"
    channel = _TuneChannel(str(root), None)
    run = tmp_path / "run"
    run.mkdir()
    saved = {}
    for step in (2, 4, 6, 4):  # the last: an attempt restarted from checkpoint 2 saves step 4 again
        tmp = run / "checkpoint.pt.tmp"
        tmp.write_text(f"step {step}")
        os.replace(tmp, run / "checkpoint.pt")  # as the trainer saves: a new file each time
        saved[step] = channel._persist(run / "checkpoint.pt", step)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000004", "checkpoint-00000006"]
    assert (root / "checkpoint-00000004" / "checkpoint.pt").read_text() == "step 4"
    assert (root / "checkpoint-00000006" / "checkpoint.pt").read_text() == "step 6"
    (root / "checkpoint-00000008").mkdir()  # no checkpoint file: not complete, never resumed from
    loaded = []
    trainer = SimpleNamespace(load_checkpoint=loaded.append, out_dir=run)
    assert channel.restore(trainer) == saved[6] == str(root / "checkpoint-00000006") and loaded == [saved[6]]
    assert _TuneChannel(str(tmp_path / "nothing"), None).restore(trainer) is None


def test_the_report_never_prints_a_uris_credentials():
    from moelab.platform.controller import SweepReport

    root = "s3://AKIAEXAMPLE:hunter2secret@bucket/results?session_token=tok123"
    report = SweepReport(sweep="s", root=root, status={"t": "finished"}, ran=["t"], skipped=[], max_concurrent=1,
                         wall_s=1.0, rows=[{"trial_id": "t", "status": "finished"}])
    text = format_report(report)
    assert "bucket/results" in text
    assert "hunter2secret" not in text and "tok123" not in text and "AKIAEXAMPLE" not in text
