"""The README's 5-minute tour, command by command, as a newcomer types it (issue: end to end).

The commands are read from the README itself, so a tour that drifts from what works fails here. They run in
a scratch directory on the session's local Ray; the sweep command gets `--set`/`--seeds` appended so the
`leverage-demo` sweep (what `make demo` runs) trains its MoE trials for a few steps with one seed and every
trial on tiny batches: 16 trials instead of 78 (the dense baselines keep their own step budgets: the sweep
file sets them per baseline, after `--set`; `--seeds` replaces theirs too), otherwise the same sweep, fits and report. The store it leaves is then checked table by table, and the
sweep is run a second time to show that finished results are reused (what a second `make demo` does).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import moelab.results as results
from moelab.platform.spec import expand, load_spec

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SHRINK = ["--set", "train.steps=8", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
          "--set", "train.log_every=2", "--set", "train.eval_every=4", "--set", "train.eval_batches=2",
          "--seeds", "0"]
SHRUNK = {"train.steps": 8, "train.batch_size": 4, "train.seq_len": 32, "train.log_every": 2,
          "train.eval_every": 4, "train.eval_batches": 2}


def tour_commands() -> list[str]:
    """The lines of the first ```bash block under the README's tour heading, comments removed."""
    text = README.read_text()
    start = text.index("## A 5-minute tour")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, "the README tour has no bash block"
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def as_argv(line: str) -> tuple[dict[str, str], list[str]]:
    """`VAR=x .venv/bin/tool args` -> ({VAR: x}, [this interpreter's tool, args])."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith((".", "/")):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    tool = words.pop(0)
    assert tool.startswith(".venv/bin/"), f"tour commands run the venv's tools: {line}"
    name = tool.removeprefix(".venv/bin/")
    if name == "moelab":
        return env, [sys.executable, "-m", "moelab", *words]
    return env, [str(Path(sys.executable).parent / name), *words]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(argv)} -> {proc.returncode}\n{out[-4000:]}"
    return out


def serve_then_interrupt(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Start the dashboard, load its page, then Ctrl-C it: it must answer and stop cleanly (exit 0)."""
    port = free_port()
    proc = subprocess.Popen([*argv, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body, f"the dashboard did not answer on port {port}"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out  # the URL is printed for the user
    return body


@pytest.fixture(scope="module")
def tour(ray_local, tmp_path_factory):
    """Every tour command, in order, in a scratch directory laid out like the repository (notebooks/)."""
    cwd = tmp_path_factory.mktemp("tour")
    (cwd / "notebooks").mkdir()  # a copy, not a symlink: Jupyter's `..` from a symlinked dir is the repo's
    shutil.copy(REPO / "notebooks" / "analysis.ipynb", cwd / "notebooks")
    base_env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "OMP_NUM_THREADS": "1"}
    outputs: dict[str, str] = {}
    for line in tour_commands():
        env, argv = as_argv(line)
        env = {**base_env, **env}
        if argv[3:4] == ["sweep"] and "--dry-run" not in argv:
            argv = [*argv, *SHRINK]
        t0 = time.time()
        if argv[3:4] == ["dashboard"]:
            outputs[line] = serve_then_interrupt(argv, cwd, env)
        else:
            outputs[line] = run(argv, cwd, env)
        print(f"{time.time() - t0:6.1f} s  {line}")
    return cwd, outputs


def test_the_tour_covers_train_sweep_fit_dashboard_and_notebook():
    words = [shlex.split(line) for line in tour_commands()]
    tools = [w[1] if w[0].endswith("moelab") else w[0] for w in (x for x in words)]
    assert {"train", "sweep", "fit", "dashboard"} <= set(tools)
    assert any("jupyter" in " ".join(w) and "notebooks/analysis.ipynb" in w for w in words)


def test_tour_train_leaves_a_run_directory(tour):
    cwd, _ = tour
    run_dir = cwd / "runs" / "tour"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= {p.name for p in run_dir.iterdir()}


def test_tour_sweep_fills_every_table(tour):
    cwd, _ = tour
    store = results.open(cwd / "results")
    spec = load_spec("leverage-demo", common=SHRUNK, seeds=[0])
    ids = {t.trial_id for t in expand(spec)}
    trials = store.trials("leverage-demo")
    # 4 widths x (200, 400, 800 steps) dense, one seed each (--seeds replaces the baselines' seeds too)
    # + 2 expert ratios x {scratch, upcycled}
    assert set(trials["trial_id"]) == ids and len(ids) == 16
    assert set(trials["status"]) == {"finished"}
    dense = trials.loc[trials["family"] == "dense"].set_index("trial_id")
    assert sorted(dense["final_step"].tolist()) == [200] * 4 + [400] * 4 + [800] * 4
    moe = set(trials.loc[trials["family"] == "moe", "trial_id"])
    assert len(moe) == 4
    metrics = store.metrics("leverage-demo")
    m = metrics[metrics["trial_id"].isin(moe)]
    assert sorted(set(m["step"])) == [2, 4, 6, 8]
    assert m.groupby("trial_id").size().to_dict() == {t: 4 for t in moe}
    assert m["eval_loss"].notna().sum() == 2 * 4  # steps 4 and 8
    experts = store.experts("leverage-demo")
    assert set(experts["trial_id"]) == moe
    # every MoE trial's expert loads are fractions summing to 1 per (step, layer)
    sums = experts.groupby(["trial_id", "step", "layer"])["load"].sum()
    assert ((sums - 1).abs() < 1e-4).all()
    # synthetic data: per-domain routing of every MoE trial, each logged step routing every token top_k times
    routing = store.routing("leverage-demo")
    assert set(routing["trial_id"]) == moe
    per_step = routing.groupby(["trial_id", "step", "layer"])["tokens"].sum()
    assert (per_step == 2 * 4 * 32 * 2).all()  # top-2 x (batch 4 x seq 32) tokens x 2 steps per log interval


def test_tour_fit_writes_a_fits_row_per_family_and_a_self_contained_report(tour):
    cwd, outputs = tour
    fits = results.open(cwd / "results").fits()
    fits = fits[fits["sweep"] == "leverage-demo"]
    families = set(fits["family"])
    # dense + the 4 MoE families (2 expert ratios x scratch/upcycled) + "moe": the sweep-wide Eq. 13 row
    # (skipped here: the families vary A but not G, and the row says so)
    assert "dense" in families and len([f for f in families if f.startswith("moe[")]) == 4, families
    el = fits[fits["law"] == "efficiency_leverage"]
    assert set(el["family"]) == {"moe"} and set(el["status"]) == {"skipped"}
    assert {"chinchilla", "parameter_leverage", "compute_leverage"} <= set(fits["law"])
    for fam in families - {"dense", "moe"}:
        assert {"parameter_leverage", "compute_leverage"} <= set(fits.loc[fits["family"] == fam, "law"]), fam
    report = cwd / "results" / "reports" / "fit-leverage-demo.html"
    html = report.read_text()
    assert "<script src=\"http" not in html and "plotly" in html.lower()  # figures embedded, no network
    assert report.stat().st_size > 100_000
    out = next(v for k, v in outputs.items() if " fit " in f" {k} ")
    assert "leverage" in out and str(report.relative_to(cwd)) in out


def test_tour_dashboard_answered_and_notebook_ran(tour):
    _, outputs = tour
    body = next(v for k, v in outputs.items() if " dashboard " in f" {k} ")
    assert "_dash-config" in body  # the Dash app's page (its views load through callbacks)
    nb = next(v for k, v in outputs.items() if "jupyter" in k)  # `run` already required exit 0 (no cell error)
    assert "Executing notebook" in nb


def test_a_second_run_reuses_the_finished_results(tour, ray_local):
    cwd, _ = tour
    line = next(ln for ln in tour_commands() if " sweep " in ln and "--dry-run" not in ln)
    env, argv = as_argv(line)
    env = {**os.environ, **env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    before = {p: p.stat().st_mtime_ns for p in (cwd / "results" / "metrics").rglob("*.parquet")}
    out = run([*argv, *SHRINK], cwd, env)
    assert "ran 0, skipped 16 already done" in out, out[-2000:]
    after = {p: p.stat().st_mtime_ns for p in (cwd / "results" / "metrics").rglob("*.parquet")}
    assert after == before  # no metrics file written or rewritten: nothing was retrained


def test_tour_report_opens_offline_in_a_browser(tour):
    """The fit report renders its figures in headless chromium with every network request refused."""
    from playwright.sync_api import sync_playwright

    cwd, _ = tour
    report = cwd / "results" / "reports" / "fit-leverage-demo.html"
    chromium = os.environ.get("MOELAB_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            remote: list[str] = []
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                       else (remote.append(route.request.url), route.abort()))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            n_plots = page.locator(".js-plotly-plot").count()
        finally:
            browser.close()
    assert not remote and not errors, (remote, errors)
    assert n_plots >= 3  # loss vs compute, leverage per family, per-axis effects
