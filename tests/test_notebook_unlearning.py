"""The skill unlearning notebook runs top to bottom (on the embedded model, small samples)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_skill_unlearning_notebook_executes(data_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "skill_unlearning.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "AUC=" in text
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("LoadedModel" in h and "fingerprint" in h for h in html)
    assert any("NeuronAdjuster:" in h and "neurons selected" in h for h in html)
    assert any("Detector calibration" in h for h in html)          # the fitted KSD
    assert any("DetectorReport: AUC" in h and "data:image/png" in h for h in html)
    assert any("Top activating contexts: gsm8k" in h and "<mark>" in h for h in html)
