"""Every model type skilllens supports, out of the box: a tiny random model of each, built from
the installed transformers' own config, must give collect statistics equal to an independent
float64 computation with plain torch hooks, value vectors equal to ``down(e_j) - down(0)``, the
unembedding scale of the model's own final norm, and working KSD / Neuron Adjust (``applied``
changes the logits and restores them bit-exactly).

The types are the ``supported`` rows of ``docs/ARCHITECTURES.md`` (written by
``skilllens info --architectures``); each test also checks its row is what the command prints.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from skilllens.core.tiny_configs import tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURES.md"
ROW = re.compile(r"^\| `([^`]+)` \| (\w+) \| (.*) \|$")
#: named in the issue: each must be supported or refused with its reason in the table
NAMED = ("phi3 gemma3 mistral3 qwen2_5_vl olmo3 smollm3 granite cohere stablelm phi gptj falcon "
         "bloom starcoder2 gpt_bigcode opt glm glm4 exaone4 ernie4_5 seed_oss hunyuan_v1_dense "
         "nemotron vaultgemma qwen3_5 gemma4 lfm2 apertus arcee ministral distilbert "
         "modernbert").split()
TEXTS = ["the cat sat on the mat", "2 + 3 = 5", "hello, world!", "skills live in neurons too"]


def doc_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


ROWS = doc_rows()
#: dense FFNs; mixture-of-experts types ("mixture of experts: ...") are tested in
#: tests/test_moe_families.py
SUPPORTED = sorted(t for t, (status, how) in ROWS.items()
                   if status == "supported" and not how.startswith("mixture of experts"))
MOE_SUPPORTED = sorted(t for t, (status, how) in ROWS.items()
                       if status == "supported" and how.startswith("mixture of experts"))


def test_table_covers_the_issue_and_enough_types():
    assert len(SUPPORTED) >= 53
    for t in NAMED:
        assert t in ROWS and ROWS[t][0] in ("supported", "refused"), t
        if ROWS[t][0] == "refused":
            assert ROWS[t][1].strip(), t


def _lm(model_type):
    import skilllens
    from skilllens.core.tokenizers import byte_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(model_type)
    return skilllens.load_model((model, byte_tokenizer()), device="cpu")


def _act(ad):
    """The activation by its config name (transformers' ACT2FN) or the block's own module."""
    from transformers.activations import ACT2FN

    if ad.arch.activation in ACT2FN:
        return ACT2FN[ad.arch.activation]
    return next(m for m in ad.blocks[0].modules() if type(m).__name__ == ad.arch.activation)


def _reference(lm, texts):
    """``{(site, layer): [tokens, d_ff] float64}`` from plain torch hooks, one text at a time
    (no padding), slicing fused outputs by hand."""
    ad, out = lm.adapter, {}
    for text in texts:
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        seen, handles = {}, []
        for site in (s for s in ad.sites if s != "value"):
            for layer in range(ad.n_layers):
                mod, where = ad.site_module(site, layer)
                part = ad.site_part(site)

                def grab(t, site=site, layer=layer, part=part):
                    t = t.reshape(-1, t.shape[-1]).double()
                    d = t.shape[-1] // 2
                    t = {None: t, "first": t[:, :d], "second": t[:, d:], "even": t[:, 0::2],
                         "odd": t[:, 1::2]}[part]
                    seen[(site, layer)] = t

                if where == "output":
                    handles.append(mod.register_forward_hook(lambda m, a, o, g=grab: g(o)))
                else:
                    handles.append(mod.register_forward_pre_hook(lambda m, a, g=grab: g(a[0])))
        try:
            with torch.no_grad():
                _forward(lm.model, ids)
        finally:
            for h in handles:
                h.remove()
        for k, v in seen.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def _forward(model, ids):
    """The model's output on ``ids`` (no KV cache where the model takes the flag)."""
    try:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except TypeError:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))


def _logits(lm, ids):
    with torch.no_grad():
        return _forward(lm.model, ids).logits


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_supported_type_end_to_end(model_type):
    from skilllens.core.collect import collect
    from skilllens.core.coverage import check_type
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    lm = _lm(model_type)
    ad = lm.adapter
    sites = [s for s in ad.sites if s != "value"]
    # collect == float64 statistics of plain-hook activations; key == act(gate) * up
    res = collect(lm, TEXTS, sites=sites, stats=("moments",), batch_size=4, progress=False)
    ref = _reference(lm, TEXTS)
    for (site, layer), x in ref.items():
        st = res[site, layer]
        assert x.shape[1] == ad.d_ff_at(layer)
        torch.testing.assert_close(st.mean.double().cpu(), x.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.std.double().cpu(), x.std(0, correction=0), rtol=1e-3,
                                   atol=1e-6)
    act = _act(ad)
    for layer in range(ad.n_layers):
        want = act(ref["gate", layer]) * (ref["up", layer] if "up" in sites else 1)
        torch.testing.assert_close(ref["key", layer], want, rtol=1e-3, atol=1e-5)
    # value vector j == down(e_j) - down(0)
    for layer in range(ad.n_layers):
        down = ad.blocks[layer].get_submodule(ad.arch.value)
        d_ff = ad.d_ff_at(layer)
        with torch.no_grad():
            diff = down(torch.eye(d_ff)) - down(torch.zeros(1, d_ff))
        torch.testing.assert_close(ad.value_vectors(layer).detach(), diff, rtol=1e-5, atol=1e-6)
    # the unembedding scale is the one the model's own final norm applies
    norm, scale = ad.final_norm(), ad.norm_scale()
    if scale is not None:
        sign = torch.ones(ad.d_model)
        sign[1::2] = -1
        with torch.no_grad():
            y = norm((3.0 * sign).reshape(1, 1, -1)).reshape(-1).double()
        bias = getattr(norm, "bias", None)
        y = y - (bias.double() if isinstance(bias, torch.Tensor) else 0)
        torch.testing.assert_close(y * sign, scale.detach().double(), rtol=1e-4, atol=1e-5)
    # KSD and Neuron Adjust fit; applied changes the logits and restores them bit-exactly
    ksd = KeySpaceDetector(layer=-1).fit(lm, TEXTS, progress=False)
    assert ksd.m_.shape == (ad.d_ff_at(-1),) and ksd.k_ > 0
    assert ksd.abstains(lm, TEXTS[:2]).dtype == torch.bool
    na = NeuronAdjuster(percent=20, site="gate").fit(lm, TEXTS[:2], TEXTS[2:], progress=False)
    ids = torch.tensor([lm.tokenizer(TEXTS[3])["input_ids"]])
    before = _logits(lm, ids)
    with na.applied(lm):
        during = _logits(lm, ids)
    assert not torch.equal(before, during)
    assert torch.equal(before, _logits(lm, ids))
    # the table row is what the command reports for this type
    row = check_type(model_type, lm.model)
    assert (row["status"], row["how"]) == ROWS[model_type]
