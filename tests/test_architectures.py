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
