"""Execute notebooks/grafting.ipynb top to bottom (tiny model, < 2 min on CPU)."""


def test_grafting_notebook_runs(run_notebook):
    run = run_notebook("grafting.ipynb")
    assert "restored exactly: True" in run.text
    assert "recovered" in run.text
    assert any("parameters grafted" in h and "Grafted entries per tensor" in h for h in run.html)
