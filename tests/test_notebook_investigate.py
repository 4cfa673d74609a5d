"""notebooks/investigate_neurons.ipynb runs top to bottom on the embedded model and shows the
rich displays and neuron views (checked in the outputs a reader sees)."""
import pytest


@pytest.mark.slow
def test_investigate_neurons_notebook_executes(run_notebook):
    run = run_notebook("investigate_neurons.ipynb")
    assert not run.errors
    html, text = run.html, run.text
    assert any("LoadedModel" in h and "smollm2" in h for h in html)
    assert any("Relative performance" in h for h in html)             # the audit results
    assert any("neurons selected" in h and "Fitted on" in h for h in html)  # the fitted NA
    views = [h for h in html if "Top activating contexts" in h]
    assert len(views) == 2 and all("<mark>" in h and "data:image/png" in h for h in views)
    assert "saved neuron.html True" in text and "report: True" in text
