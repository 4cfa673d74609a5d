"""Every mixture-of-experts family of the installed transformers: per-expert statistics at
gate/up/key and router statistics against a float64 re-computation with plain torch; applied
edits change the logits and restore them bit-exactly; Neuron Adjust and KSD fit."""
import pytest
import torch
import torch.nn.functional as F

from moe_families import FAMILIES, tiny_moe
from skilllens.core.batching import encode_items, iter_batches
from skilllens.core.collect import collect
from skilllens.core.hooks import hooks_applied
from skilllens.core.moe_hooks import ExpertHook, RouterHook
from skilllens.data import Item

TEXTS = ["Mixture of experts route tokens.", "2+2=4", "The cat sat on the mat today!",
         "abc def"]
SITES = ["gate", "up", "key", "router", "routing"]


def _reference(lm, fam):
    """float64 per-expert gate/up/key, router logits and dense routing weights on the masked
    tokens of the same batches as ``collect``: ``{(site, layer): list of per-expert [n, f]}``."""
    ad = lm.adapter
    got = {}
    encoded = encode_items([Item(f"t{i}", t) for i, t in enumerate(TEXTS)], lm.tokenizer, 512)
    for batch in iter_batches(encoded, 2, lm.tokenizer.pad_token_id, lm.device):
        mask = batch.token_mask("all").reshape(-1)
        captured, handles = {}, []
        for layer in ad.moe_layers:
            info = ad.layers_info[layer]
            if info.dense_bmm:
                handles.append(info.router.register_forward_hook(
                    lambda m, a, o, l=layer: captured.__setitem__(l, (a[0], o))))
            else:
                handles.append(info.experts.register_forward_pre_hook(
                    lambda m, a, l=layer: captured.__setitem__(l, a)))
            for s, mlp in enumerate(info.shared):
                handles.append(mlp.register_forward_pre_hook(
                    lambda m, a, l=layer, s=s: captured.__setitem__((l, s), a[0])))
        with torch.no_grad():
            lm.model(**batch.inputs)
        for h in handles:
            h.remove()
        for layer in ad.moe_layers:
            _reference_layer(ad.layers_info[layer], fam, layer, captured, mask, got)
    return got


def _reference_layer(info, fam, layer, captured, mask, got):
    ex, E = info.experts, info.n_experts
    if info.dense_bmm:  # Llama-4: sigmoid scores of the top-k logits scale the expert input
        x, (scores, logits) = captured[layer]
        x, logits = x.double(), logits.double()
        k = info.router.top_k
        index = torch.topk(logits, k, dim=1).indices
        dense = torch.zeros_like(logits).scatter(1, index, torch.sigmoid(logits.gather(1, index)))
    else:
        x, index, weights = captured[layer]
        x = x.double()
        w_r = info.router.weight.double()
        logits = x @ w_r.t() + (info.router.bias.double() if getattr(info.router, "bias", None)
                                is not None else 0)
        dense = torch.zeros(x.shape[0], E, dtype=torch.float64).scatter(
            1, index, weights.double())
    got.setdefault(("router", layer), []).append(logits[mask])
    got.setdefault(("routing", layer), []).append(dense[mask])
    for e in range(E):
        rows = (index == e).any(-1) & mask
        xe = x[rows] * (dense[rows, e:e + 1] if info.dense_bmm else 1)
        W = ex.gate_up_proj[e].double()
        h = xe @ W if (info.dense_bmm or ex.is_transposed) else xe @ W.t()
        if not info.dense_bmm and ex.has_bias:
            h = h + ex.gate_up_proj_bias[e].double()
        if not info.dense_bmm and not ex.is_concatenated:
            gate, up = h[:, ::2], h[:, 1::2]
        else:
            gate, up = h.chunk(2, dim=-1)
        if fam == "gpt_oss":  # clamped GLU of gpt-oss (alpha, limit from the module)
            g, u = gate.clamp(max=ex.limit), up.clamp(-ex.limit, ex.limit)
            key = (u + 1) * g * torch.sigmoid(g * ex.alpha)
        else:
            key = F.silu(gate) * up
        for site, v in (("gate", gate), ("up", up), ("key", key)):
            got.setdefault((site, layer, e), []).append(v)
    for s, mlp in enumerate(info.shared):
        xs = captured[(layer, s)].double().reshape(-1, x.shape[-1])[mask]
        gate = xs @ mlp.gate_proj.weight.double().t()
        up = xs @ mlp.up_proj.weight.double().t()
        for site, v in (("gate", gate), ("up", up), ("key", F.silu(gate) * up)):
            got.setdefault((site, layer, E + s), []).append(v)


@pytest.mark.parametrize("fam", FAMILIES)
def test_expert_and_router_statistics_match_float64_reference(fam):
    lm = tiny_moe(fam)
    res = collect(lm, TEXTS, sites=SITES, batch_size=2, progress=False,
                  stats=("moments", "extrema", "abs", "positive"))
    ref = _reference(lm, fam)
    ad = lm.adapter
    assert res.meta["experts"][str(ad.moe_layers[0])]["widths"] == ad.moe_layer(
        ad.moe_layers[0]).widths
    for layer in ad.moe_layers:
        info = ad.layers_info[layer]
        for site in ("router", "routing"):
            r = torch.cat(ref[(site, layer)])
            st = res[site, layer]
            assert torch.equal(st.count, torch.full((info.n_experts,), float(r.shape[0]),
                                                    dtype=torch.float64))
            torch.testing.assert_close(st.mean, r.mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(st.std, r.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
        routed = torch.cat(ref[("routing", layer)]) > 0
        torch.testing.assert_close(res["routing", layer].frac_pos, routed.double().mean(0))
        for site in ("gate", "up", "key"):
            st = res[site, layer]
            for e, lo in enumerate(st.offsets):
                r = torch.cat(ref[(site, layer, e)])
                w = info.widths[e]
                cnt = st.count[lo:lo + w]
                assert torch.equal(cnt, torch.full((w,), float(r.shape[0]), dtype=torch.float64))
                if r.shape[0] == 0:
                    continue
                torch.testing.assert_close(st.mean[lo:lo + w], r.mean(0), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(st.std[lo:lo + w], r.std(0, unbiased=False),
                                           rtol=1e-3, atol=1e-5)
                torch.testing.assert_close(st.max[lo:lo + w], r.max(0).values, rtol=1e-4,
                                           atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_edits_change_logits_and_restore_bit_exactly(fam):
    lm = tiny_moe(fam)
    ids = lm.tokenizer(["Route this, please."], return_tensors="pt")
    inputs = {"input_ids": ids["input_ids"]}
    impl = lm.model.config._experts_implementation
    with torch.no_grad():
        before = lm.model(**inputs).logits
        layer = lm.adapter.moe_layers[-1]
        info = lm.adapter.layers_info[layer]
        for hooks in ([ExpertHook("key", layer, e, torch.zeros_like)
                       for e in range(info.n_experts)],
                      [ExpertHook("gate", layer, e, lambda a: a + 1.0)
                       for e in range(len(info.widths))],
                      [RouterHook(layer, lambda r: type(r)(r.logits, (r.index + 1) % info.n_experts,
                                                           r.weights))]):
            with hooks_applied(lm, hooks):
                edited = lm.model(**inputs).logits
            assert not torch.allclose(edited, before)
            after = lm.model(**inputs).logits
            assert torch.equal(after, before)
            assert lm.model.config._experts_implementation == impl
            assert "forward" not in vars(info.experts)
        # read-only hooks: the per-expert loop gives the same logits up to float rounding
        with hooks_applied(lm, [ExpertHook("key", layer, e, lambda a: None)
                                for e in range(info.n_experts)]):
            torch.testing.assert_close(lm.model(**inputs).logits, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_neuron_adjust_and_ksd_fit(fam):
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    lm = tiny_moe(fam)
    forget, retain = ["2+2=4", "3*3=9", "7-1=6"], ["the cat sat", "a dog ran", "fish swim"]
    na = NeuronAdjuster(percent=10, batch_size=2).fit(lm, forget, retain, progress=False)
    assert na.n_selected > 0
    ids = {"input_ids": lm.tokenizer(["5+5=10"], return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        before = lm.model(**ids).logits
        with na.applied(lm):
            lm.model(**ids)
        assert torch.equal(lm.model(**ids).logits, before)
    ksd = KeySpaceDetector(alpha=1.0).fit(lm, forget, progress=False)
    assert ksd.m_.shape[0] == lm.adapter.width(lm.adapter.n_layers - 1)
    assert ksd.abstains(lm, forget).all()


def test_dense_and_moe_layers_in_one_model():
    """DeepSeek-V3's first dense layer next to a MoE layer: ordinary sites there, per-expert
    sites here, NaN-padded stacking, Neuron Adjust across both."""
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    lm = tiny_moe("deepseek_v3", first_k_dense_replace=1)
    ad = lm.adapter
    assert ad.moe_layers == [1] and ad.d_ffs == [48, 80]
    res = collect(lm, TEXTS, sites=["gate", "key"], batch_size=2, progress=False)
    assert res["gate", 0].mean.shape == (48,) and res["gate", 1].mean.shape == (80,)
    stacked = res.stacked("gate")
    assert stacked.shape == (2, 80) and torch.isnan(stacked[0, 48:]).all()
    na = NeuronAdjuster(percent=20, batch_size=2).fit(lm, TEXTS[:2], TEXTS[2:], progress=False)
    assert set(na.params_) <= {0, 1} and all(int(p.index.max()) < ad.d_ff_at(l)
                                             for l, p in na.params_.items())
    ids = {"input_ids": lm.tokenizer(["mixed layers"], return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        before = lm.model(**ids).logits
        with na.applied(lm):
            lm.model(**ids)
        assert torch.equal(lm.model(**ids).logits, before)


def _doc_moe_types():
    from test_architectures_all import MOE_SUPPORTED
    return MOE_SUPPORTED


@pytest.mark.parametrize("model_type", _doc_moe_types())
def test_every_supported_moe_type_of_the_table(model_type):
    """Each mixture-of-experts row of docs/ARCHITECTURES.md is what the command reports (the
    per-expert loop with read hooks reproduces the logits), and a per-expert edit changes the
    logits and restores them bit-exactly."""
    import warnings

    from test_architectures_all import ROWS

    import skilllens
    from skilllens.core.coverage import check_type
    from skilllens.core.tiny_configs import tiny_model
    from skilllens.core.tokenizers import byte_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(model_type)
        lm = skilllens.load_model((model, byte_tokenizer()), device="cpu")
        row = check_type(model_type, lm.model)
        assert (row["status"], row["how"]) == ROWS[model_type]
        layer = lm.adapter.moe_layers[-1]
        ids = {"input_ids": torch.tensor([[5, 17, 99, 3, 42, 7]])}
        with torch.no_grad():
            before = lm.model(**ids).logits
            with hooks_applied(lm, [ExpertHook("key", layer, e, lambda a: a * 0 + 1.0)
                                    for e in range(len(lm.adapter.layers_info[layer].widths))]):
                during = lm.model(**ids).logits
            assert not torch.equal(before, during)
            assert torch.equal(before, lm.model(**ids).logits)
