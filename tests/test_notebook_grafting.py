"""Execute notebooks/grafting.ipynb top to bottom (tiny model, < 2 min on CPU)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_grafting_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "grafting.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "restored exactly: True" in outputs
    assert "recovered" in outputs
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("parameters grafted" in h and "Grafted entries per tensor" in h for h in html)
