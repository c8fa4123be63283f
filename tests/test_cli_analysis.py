"""`moelab fit` and `moelab dashboard` as a user runs them."""

import subprocess
import sys
import time
import urllib.request

import pytest

from moelab.cli import main
from moelab.platform.fixtures import synthetic_store


@pytest.mark.parametrize("cmd", ["fit", "dashboard"])
def test_help_has_examples(cmd):
    r = subprocess.run([sys.executable, "-m", "moelab", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and f"moelab {cmd} results/" in r.stdout


def test_fit_writes_table_and_report(tmp_path, capsys):
    root = tmp_path / "store"
    synthetic_store(root, n_steps=20)
    assert main(["fit", str(root), "--n-boot", "5", "--report", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and (tmp_path / "r.html").stat().st_size > 10_000
    import moelab.results as results

    fits = results.open(root).sql("SELECT law, status FROM fits")
    assert {"chinchilla", "power_law"} <= set(fits["law"])
    assert main(["fit", str(tmp_path / "nowhere")]) == 2


def test_dashboard_serves_on_loopback(tmp_path):
    root = tmp_path / "store"
    synthetic_store(root, n_steps=10)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "dashboard", str(root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = None
        for _ in range(120):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None and "<html" in body.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
