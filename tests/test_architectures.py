"""FFN sites resolve on every supported architecture and mean what METHODS.md says."""
import pytest
import torch
import torch.nn.functional as F

import skilllens
from skilllens.core.architectures import Architecture, ModelAdapter, register_architecture, REGISTRY
from skilllens.errors import SiteError, UnknownArchitectureError
from skilllens.core.hooks import Hook, run_with_hooks
from skilllens.core.models import TINY_MODELS


@pytest.mark.parametrize("name", TINY_MODELS)
def test_sites_resolve_and_capture_shapes(name):
    lm = skilllens.load_model(name)
    ad = lm.adapter
    assert ad.n_layers == 2 and ad.d_ff == 64 and ad.d_model == 32
    seen = {}
    hooks = [Hook(s, l, lambda a, k=(s, l): seen.__setitem__(k, a))
             for s in ad.sites if s != "value" for l in range(2)]
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        run_with_hooks(lm, {"input_ids": x, "attention_mask": torch.ones_like(x)}, hooks)
    assert set(seen) == {(h.site, h.layer) for h in hooks}
    for act in seen.values():
        assert act.shape == (2, 5, 64)
    assert ad.value_vectors(1).shape == (64, 32)
    assert ad.unembedding().shape[1] == 32


def _capture(lm, sites, layer=1):
    seen = {}
    x = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run_with_hooks(lm, {"input_ids": x}, [Hook(s, layer, lambda a, s=s: seen.__setitem__(s, a)) for s in sites])
    return seen


def test_llama_key_is_act_gate_times_up():
    lm = skilllens.load_model("tiny-llama")
    seen = _capture(lm, ["gate", "up", "key"])
    torch.testing.assert_close(seen["key"], F.silu(seen["gate"]) * seen["up"])


def test_gpt2_key_is_activation_of_gate():
    lm = skilllens.load_model("tiny-gpt2")
    seen = _capture(lm, ["gate", "key"])
    torch.testing.assert_close(seen["key"], F.gelu(seen["gate"], approximate="tanh"))


def test_value_vector_is_what_down_projection_adds():
    """Setting key to the one-hot e_j makes the FFN output W_down e_j = value vector j."""
    for name in ("tiny-llama", "tiny-gpt2"):
        lm = skilllens.load_model(name)
        ad = lm.adapter
        mlp_out = {}
        down, _ = ad.site_module("key", 1)
        h = down.register_forward_hook(lambda m, i, o: mlp_out.__setitem__("o", o))
        onehot = torch.zeros(64)
        onehot[7] = 1.0
        x = torch.randint(0, 256, (1, 4))
        with torch.no_grad():
            run_with_hooks(lm, {"input_ids": x}, [Hook("key", 1, lambda a: onehot.expand_as(a).clone())])
        h.remove()
        bias = getattr(down, "bias", None)
        expected = ad.value_vectors(1)[7] + (bias if bias is not None else 0)
        torch.testing.assert_close(mlp_out["o"][0, 0], expected)


def test_unknown_architecture_lists_supported_and_how_to_register():
    from transformers import PretrainedConfig

    class Weird(torch.nn.Module):
        config = PretrainedConfig()
        config.model_type = "weird"

    with pytest.raises(UnknownArchitectureError) as e:
        ModelAdapter(Weird())
    msg = str(e.value)
    assert "llama" in msg and "gpt2" in msg and "register_architecture" in msg


def test_registering_an_architecture_is_one_entry():
    from transformers import LlamaConfig

    lm = skilllens.load_model("tiny-llama")
    arch = register_architecture(Architecture(
        name="test-arch", model_types=("test_arch",), layers=("model.layers",),
        gate=("mlp.gate_proj", "output"), key=("mlp.down_proj", "input"), value="mlp.down_proj"))
    try:
        ad = ModelAdapter(lm.model, arch)
        assert ad.sites == ("gate", "key", "value")
        with pytest.raises(SiteError, match="does not exist"):
            ad.site_module("up", 0)
    finally:
        REGISTRY.pop("test-arch")


def test_layer_and_site_errors():
    ad = skilllens.load_model("tiny-llama").adapter
    with pytest.raises(SiteError, match="out of range"):
        ad.check_layers([2])
    assert ad.check_layers([-1]) == [1]
    with pytest.raises(SiteError, match="unknown site"):
        ad.site_module("neuron", 0)


# -- out of the box: discovery, fused sites, flat tokens, per-layer d_ff, (1 + w) norms --

def _tiny(model_type, **overrides):
    import warnings

    from skilllens.core.tiny_configs import tiny_model
    from skilllens.core.tokenizers import byte_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(model_type, **overrides)
    return skilllens.load_model((model, byte_tokenizer()), device="cpu")


def _ids(b=2, t=5):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(1))


def test_fused_gate_up_halves_are_sites_for_read_and_edit():
    """Phi-3 computes ``gate, up = gate_up_proj(x).chunk(2, -1)``: reading gate/up gives the
    halves, and an edit of the gate replaces its half only (key = silu(0) * up = 0)."""
    lm = _tiny("phi3")
    ad = lm.adapter
    assert ad.arch.gate == ("mlp.gate_up_proj", "output", "first")
    assert ad.arch.up == ("mlp.gate_up_proj", "output", "second")
    fused, seen = {}, {}
    h = ad.blocks[1].mlp.gate_up_proj.register_forward_hook(
        lambda m, a, o: fused.__setitem__("o", o.detach().clone()))
    x = _ids()
    try:
        with torch.no_grad():
            run_with_hooks(lm, {"input_ids": x}, [
                Hook("gate", 1, lambda a: seen.__setitem__("gate", a.clone())),
                Hook("up", 1, lambda a: seen.__setitem__("up", a.clone())),
                Hook("key", 1, lambda a: seen.__setitem__("key", a.clone()))])
            gate, up = fused["o"].chunk(2, dim=-1)
            torch.testing.assert_close(seen["gate"], gate)
            torch.testing.assert_close(seen["up"], up)
            torch.testing.assert_close(seen["key"], F.silu(gate) * up)
            run_with_hooks(lm, {"input_ids": x}, [
                Hook("gate", 1, lambda a: torch.zeros_like(a)),
                Hook("up", 1, lambda a: seen.__setitem__("up2", a.clone())),
                Hook("key", 1, lambda a: seen.__setitem__("key2", a.clone()))])
    finally:
        h.remove()
    torch.testing.assert_close(seen["up2"], up)  # the other half is untouched
    assert torch.equal(seen["key2"], torch.zeros_like(seen["key2"]))


def test_flat_token_blocks_are_seen_as_batch_seq_dff():
    """OPT flattens tokens to [B*T, d] before fc1: hooks and masks still see [B, T, d_ff]."""
    from skilllens.core.collect import collect

    lm = _tiny("opt")
    assert lm.adapter.arch.flat_tokens
    seen = {}
    with torch.no_grad():
        run_with_hooks(lm, {"input_ids": _ids(2, 5)},
                       [Hook("gate", 0, lambda a: seen.__setitem__("gate", a))])
    assert seen["gate"].shape == (2, 5, 64)
    res = collect(lm, ["a short one", "and a somewhat longer text here"], sites=["gate", "key"],
                  batch_size=2, progress=False)
    assert res["key", 1].mean.shape == (64,)


def test_per_layer_d_ff_collect_and_methods():
    """Gemma-4 ``use_double_wide_mlp`` doubles d_ff on KV-shared layers: statistics, KSD and
    Neuron Adjust are sized per layer."""
    from skilllens.core.collect import collect
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    full = {"head_dim": 16}
    lm = _tiny("gemma4_text", use_double_wide_mlp=True, num_kv_shared_layers=1,
               num_hidden_layers=3, per_layer_config={1: full, 2: full},
               layer_types=["sliding_attention", "full_attention", "full_attention"])
    ad = lm.adapter
    assert ad.d_ffs == [64, 64, 128] and not ad.uniform_d_ff and ad.d_ff_at(-1) == 128
    texts = ["one two three", "four five six seven", "eight nine", "ten eleven twelve"]
    res = collect(lm, texts, sites=["gate", "key"], progress=False)
    assert res["gate", 0].mean.shape == (64,) and res["key", 2].mean.shape == (128,)
    assert res.stacked("gate").shape == (3, 128)  # narrower layers padded with NaN
    assert KeySpaceDetector().fit(lm, texts, progress=False).m_.shape == (128,)
    na = NeuronAdjuster(percent=30, site="gate").fit(lm, texts[:2], texts[2:], progress=False)
    assert na.n_selected > 0 and all(int(p.index.max()) < ad.d_ff_at(l)
                                     for l, p in na.params_.items())


@pytest.mark.parametrize("model_type,offset", [("vaultgemma", 1.0), ("nemotron", 1.0),
                                               ("qwen3_5", 1.0), ("gemma3", 1.0),
                                               ("llama", 0.0)])
def test_norm_offset_is_measured_from_the_models_own_final_norm(model_type, offset):
    from skilllens.concepts.vocab import norm_scale

    lm = _tiny(model_type)
    norm = lm.adapter.final_norm()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(lm.adapter.d_model) * 0.5 + 0.25)
    assert lm.adapter.arch.norm_offset == offset
    torch.testing.assert_close(norm_scale(lm), norm.weight + offset)


def test_a_wrong_norm_offset_declaration_is_refused():
    import dataclasses

    lm = _tiny("vaultgemma")
    wrong = dataclasses.replace(lm.adapter.arch, name="vault-wrong", norm_offset=0.0)
    with pytest.raises(UnknownArchitectureError, match=r"\(1 \+ w\).*norm_offset=1.0"):
        ModelAdapter(lm.model, wrong).norm_scale()


def test_moe_models_get_per_expert_sites():
    """Issue 23: MoE models open with per-expert sites (core/moe.py); the dense discovery
    still refuses them with a pointer there."""
    from skilllens.core.coverage import check_type
    from skilllens.core.moe import MoeAdapter

    lm = _tiny("mixtral")
    assert isinstance(lm.adapter, MoeAdapter) and lm.adapter.moe_layers == [0, 1]
    with pytest.raises(UnknownArchitectureError, match="MoeAdapter") as e:
        ModelAdapter(lm.model)
    assert "fc1" not in str(e.value)
    assert check_type("mixtral", lm.model)["status"] == "supported"


def test_dead_fields_are_mended():
    with pytest.warns(DeprecationWarning, match="d_ff_attr"):
        Architecture(name="x", model_types=("x",), layers=("model.layers",),
                     gate=("mlp.fc1", "output"), key=("mlp.fc2", "input"), value="mlp.fc2",
                     d_ff_attr="intermediate_size")
    with pytest.raises(SiteError, match="gated"):
        Architecture(name="x", model_types=("x",), layers=("model.layers",), gated=True,
                     gate=("mlp.fc1", "output"), key=("mlp.fc2", "input"), value="mlp.fc2")
    assert not any("mixtral_dense" in a.model_types for a in REGISTRY.values())


@pytest.mark.parametrize("model_type", ["phi3", "opt", "gemma3", "modernbert"])
def test_backends_agree_with_torch_or_refuse(model_type):
    lm = _tiny(model_type)
    sites = [s for s in lm.adapter.sites if s != "value"]
    x = _ids()
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}

    def run(backend):
        seen = {}
        edit = Hook("gate", 1, lambda a: a * 0.5)
        out = run_with_hooks(lm, inputs, [edit] + [
            Hook(s, 1, lambda a, s=s: seen.__setitem__(s, a.detach().clone())) for s in sites
            if s != "gate"], backend=backend)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return seen, logits.detach()

    with torch.no_grad():
        ref, ref_logits = run("torch")
        for backend in ("nnsight", "lens"):
            try:
                seen, logits = run(backend)
            except SiteError as e:
                assert backend == "lens" and "does not support" in str(e)
                continue
            for s in ref:
                torch.testing.assert_close(seen[s], ref[s], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_info_architectures_prints_the_table_rows_of_docs(capsys):
    """``skilllens info --architectures`` prints the rows docs/ARCHITECTURES.md holds."""
    from pathlib import Path

    from skilllens.cli import main

    assert main(["info", "--architectures", "--types", "phi3", "mixtral", "albert"]) == 0
    out = capsys.readouterr().out
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURES.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(row in doc.splitlines() for row in rows)
    assert "| `phi3` | supported |" in out
    assert "| `mixtral` | supported | mixture of experts" in out  # issue 23: per-expert sites
