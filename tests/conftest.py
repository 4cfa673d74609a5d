import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests read the data packaged with skilllens unless the user gives a folder ($SKILLLENS_DATA
# still wins); the hub is never tried.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SKILLLENS_ALLOW_HUB", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder the tests read built-in data from: $SKILLLENS_DATA if set, else the packaged
    data (files may be .xz-compressed; use ``data_file`` for a path to one file)."""
    from skilllens.data import data_dir as first_folder
    return first_folder()


@pytest.fixture(scope="session")
def data_file(data_dir):
    """``data_file("xquad/xquad.de.json")``: that upstream file (plain or compressed)."""
    from skilllens.data import find_data_file

    def find(rel: str) -> Path:
        found = find_data_file(rel, data_dir)
        assert found is not None, rel
        return found[1]
    return find


@pytest.fixture
def run_notebook(monkeypatch, data_dir):
    """``run_notebook("grafting.ipynb", cwd=..., timeout=...)``: execute that notebook top to
    bottom (tests/_notebooks.py) and return its outputs. The kernel reads this checkout's
    skilllens (PYTHONPATH), the tests' data folder ($SKILLLENS_DATA) and runs on one thread."""
    from _notebooks import execute_notebook
    monkeypatch.setenv("SKILLLENS_DATA", str(data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return execute_notebook


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (the shared 2-core CPU thrashes with two
    threads on tiny models). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    """tiny-llama, loaded once per test module (a module's own copy: a test that patches it and
    fails leaks no further than its file). Modules that need another model define their own."""
    from skilllens import load_model
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from skilllens import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    from skilllens import load_model
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smol_tok():
    """The SmolLM2 tokenizer alone (a few seconds once the model cache exists)."""
    from transformers import AutoTokenizer

    from skilllens.core.models import _gguf_cached, find_smollm2_gguf
    try:
        return AutoTokenizer.from_pretrained(str(_gguf_cached(find_smollm2_gguf())))
    except Exception as e:  # the embedded model package is not installed
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_smol(smol_tok):
    """A 2-layer random Llama over the SmolLM2 tokenizer (BPE: tokens straddle joins, `` A``
    is one token), as a ``LoadedModel``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from skilllens.core.architectures import ModelAdapter
    from skilllens.core.loaded_model import LoadedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    return LoadedModel(model, smol_tok, ModelAdapter(model), "tiny-smol")
