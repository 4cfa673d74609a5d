"""notebooks/investigate_neurons.ipynb runs top to bottom on the embedded model and shows the
rich displays and neuron views (checked in the outputs a reader sees)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_investigate_neurons_notebook_executes(data_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "investigate_neurons.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert any("LoadedModel" in h and "smollm2" in h for h in html)
    assert any("Relative performance" in h for h in html)             # the audit results
    assert any("neurons selected" in h and "Fitted on" in h for h in html)  # the fitted NA
    views = [h for h in html if "Top activating contexts" in h]
    assert len(views) == 2 and all("<mark>" in h and "data:image/png" in h for h in views)
    assert "saved neuron.html True" in text and "report: True" in text
