import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO.parent / "shared" / "data").resolve()
os.environ.setdefault("SKILLLENS_DATA", str(DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip("shared data folder ../shared/data not found")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    from skilllens import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    from skilllens import load_model
    return load_model("tiny-llama")
