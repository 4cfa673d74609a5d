"""The skill unlearning notebook runs top to bottom (on the embedded model, small samples)."""
import pytest


@pytest.mark.slow
def test_skill_unlearning_notebook_executes(run_notebook):
    run = run_notebook("skill_unlearning.ipynb")
    assert not run.errors
    assert "AUC=" in run.text
    html = run.html
    assert any("LoadedModel" in h and "fingerprint" in h for h in html)
    assert any("NeuronAdjuster:" in h and "neurons selected" in h for h in html)
    assert any("Detector calibration" in h for h in html)          # the fitted KSD
    assert any("DetectorReport: AUC" in h and "data:image/png" in h for h in html)
    assert any("Top activating contexts: gsm8k" in h and "<mark>" in h for h in html)
