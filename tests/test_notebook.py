"""notebooks/analysis.ipynb executes top to bottom against a small generated store."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from moelab.platform.fixtures import synthetic_store

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "analysis.ipynb"


def test_notebook_runs_against_a_store(tmp_path, monkeypatch):
    synthetic_store(tmp_path / "store", n_steps=20)
    monkeypatch.setenv("MOELAB_STORE", str(tmp_path / "store"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "sweeps: ['synthetic']" in text
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 5  # curves, at least one effects plot, scaling, domain routing, specialisation
    titles = [f["data"]["application/vnd.plotly.v1+json"]["layout"].get("title", {}).get("text", "")
              for f in figures]
    assert any("where each domain's tokens go" in t for t in titles)
    assert any("specialisation" in t.lower() for t in titles)
