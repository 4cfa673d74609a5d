"""Neuron views of mixture-of-experts layers: a flat expert neuron is read on the tokens routed
to its expert only, and equals a float64 plain-torch reference (the expert's own gate/up
weights applied to the block input of the routed tokens); the audit shows expert neurons; bad
indices and sites raise SiteError naming the layer's real width."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import skilllens
from skilllens.core.batching import encode_items
from skilllens.data import from_texts
from skilllens.errors import SiteError

TEXTS = ["2+2=4 and 3*3=9", "the cat sat on the mat", "def f(x): return x + 1",
         "Paris is the capital of France", "a", "7 - 1 = 6, 6 * 2 = 12, 12 / 3 = 4",
         "hello hello hello world", "birds fly high over the trees"]


@pytest.fixture(scope="module")
def lm():
    return skilllens.load_model("tiny-mixtral", device="cpu")


def _reference(lm, enc, site: str, layer: int, expert: int, local: int):
    """Per item (alone, unpadded): ``[(item, position, value)]`` of every token the model's
    router sent to ``expert``, the value computed in float64 from the block input with the
    expert's ``gate_up_proj`` (Mixtral layout: ``[2f, d]``, gate rows first, SiLU gate)."""
    mlp = lm.model.model.layers[layer].mlp
    ex = mlp.experts
    assert ex.has_gate and not ex.is_transposed and ex.is_concatenated and not ex.has_bias
    f = ex.gate_up_proj.shape[1] // 2
    W = ex.gate_up_proj[expert].detach().double()
    out = []
    for i, e in enumerate(enc):
        seen = {}
        h1 = mlp.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
        h2 = mlp.gate.register_forward_hook(lambda m, a, o: seen.update(idx=o[2]))
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([e.ids]))
        finally:
            h1.remove()
            h2.remove()
        x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
        routed = torch.nonzero((seen["idx"] == expert).any(-1)).flatten()
        h = x[routed] @ W.T
        gate, up = h[:, :f], h[:, f:]
        act = {"gate": gate, "up": up, "key": F.silu(gate) * up}[site][:, local]
        out += [(i, int(t), float(v)) for t, v in zip(routed, act)]
    return out


@pytest.mark.parametrize("site,layer,neuron", [("key", 1, 70), ("gate", 0, 5), ("up", 1, 127)])
def test_expert_neuron_view_equals_float64_reference(lm, site, layer, neuron):
    k = 5
    skill = from_texts(TEXTS, "toy")
    enc = encode_items(skill.items, lm.tokenizer, 64)
    expert, local = divmod(neuron, 32)  # tiny-mixtral: 4 experts of 32 neurons
    ref = _reference(lm, enc, site, layer, expert, local)
    assert 0 < len(ref) < sum(len(e.ids) for e in enc)  # routed tokens only: a strict subset
    view = skilllens.show_neuron(lm, site, layer, neuron, skills=skill, k=k, batch_size=3,
                                 max_length=64)
    assert (view.expert, view.expert_neuron) == (expert, local)
    assert "routed tokens only" in view.note and f"expert {expert}" in view.note
    e = view.skills[0]
    vals = torch.tensor([v for *_, v in ref], dtype=torch.float64)
    assert e["count"] == len(ref) == sum(e["hist"]["counts"])
    scale = float(vals.abs().max())
    assert e["mean"] == pytest.approx(float(vals.mean()), abs=1e-5 * scale)
    assert e["std"] == pytest.approx(float(vals.std(correction=0)), rel=1e-4, abs=1e-6 * scale)
    best = sorted(ref, key=lambda r: (-r[2], r[0], r[1]))[:k]
    ctx = e["contexts"]
    assert [(c["item"], c["position"]) for c in ctx] == [(i, t) for i, t, _ in best]
    assert [c["value"] for c in ctx] == pytest.approx([v for *_, v in best], abs=1e-5 * scale)
    first = ctx[0]
    assert first["token"] == lm.tokenizer.decode([enc[first["item"]].ids[first["position"]]])
    text = repr(view) + view._repr_html_()
    assert "routed tokens only" in text and "routed tokens" in view._repr_html_()


def test_expert_neuron_vocab_projection_uses_its_experts_down_column(lm):
    from skilllens.core.neuron_view import vocab_projection

    v = lm.model.model.layers[1].mlp.experts.down_proj[2][:, 6].detach().double()  # flat 70
    ref = lm.adapter.unembedding().detach().double() @ v
    promoted, suppressed = vocab_projection(lm, 1, 70, 4)
    assert [p[1] for p in promoted] == pytest.approx(torch.topk(ref, 4).values.tolist(),
                                                     rel=1e-4)
    assert suppressed[0][1] == pytest.approx(float(ref.min()), rel=1e-4)


def test_neuron_pass_expert_keys_cover_the_whole_expert(lm):
    from skilllens.core.collect import collect
    from skilllens.core.neuron_view import neuron_pass

    skill = from_texts(TEXTS, "toy")
    top, stats, _ = neuron_pass(lm, skill, [("key", 1, e) for e in range(4)], k=2, batch_size=3)
    counts = torch.cat([stats[("key", 1, e)].count for e in range(4)])
    # the same per-expert routed-token counts as collect's expert statistics (flat j)
    ref = collect(lm, skill, sites=["key"], layers=[1], progress=False)[("key", 1)].count
    assert torch.equal(counts.double(), ref.double())
    with pytest.raises(SiteError, match=r"pass \('key', 1, expert\) keys"):
        neuron_pass(lm, skill, [("key", 1)])


def test_bad_expert_neuron_index_or_site_raises_site_error(lm):
    with pytest.raises(SiteError, match=r"has 128 neurons \(0\.\.127\).*offsets"):
        skilllens.show_neuron(lm, "key", 1, 128, skills=["a"])
    with pytest.raises(SiteError, match="out of range"):
        skilllens.show_neuron(lm, "key", 0, -1, skills=["a"])
    with pytest.raises(SiteError, match="not 'router'"):
        skilllens.show_neuron(lm, "router", 1, 0, skills=["a"])
    from skilllens.core.neuron_view import vocab_projection
    with pytest.raises(SiteError, match="out of range"):
        vocab_projection(lm, 1, 500)


def test_shared_expert_neuron_sees_every_token():
    from moe_families import tiny_moe

    lm = tiny_moe("qwen2_moe")
    info = lm.adapter.moe_layer(1)
    assert info.n_shared == 1
    j = info.offsets[info.n_experts] + 3  # neuron 3 of the shared expert
    skill = from_texts(TEXTS[:4], "toy")
    enc = encode_items(skill.items, lm.tokenizer, 64)
    acts = []
    mod = info.shared[0].down_proj
    for e in enc:  # the shared expert's key: the input of its down projection
        seen = {}
        h = mod.register_forward_pre_hook(lambda m, a: seen.update(a=a[0].detach()))
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([e.ids]))
        finally:
            h.remove()
        acts.append(seen["a"].reshape(-1, seen["a"].shape[-1])[:, 3].double())
    view = skilllens.show_neuron(lm, "key", 1, j, skills=skill, k=3, batch_size=2)
    allv = torch.cat(acts)
    assert view.expert == info.n_experts and "every token" in view.note
    e = view.skills[0]
    assert e["count"] == allv.numel()
    assert e["mean"] == pytest.approx(float(allv.mean()), abs=1e-5 * float(allv.abs().max()))
    assert e["contexts"][0]["value"] == pytest.approx(float(allv.max()), rel=1e-4)


def test_audit_neuron_views_show_expert_neurons(lm):
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.neuron_report import audit_neuron_views, pick_neurons

    forget = from_texts(TEXTS[:4], "forget")
    retain = from_texts(TEXTS[4:], "retain")
    na = NeuronAdjuster(percent=5).fit(lm, forget, retain, progress=False)
    picks = pick_neurons({"na": na}, {}, 2, lm.adapter.n_layers)
    assert picks and all(lm.adapter.moe_layer(l) is not None for _, _, l, _, _ in picks)
    views = audit_neuron_views(lm, {"na": na}, {}, {"forget": forget, "retain": retain},
                               per_method=2, k=3, max_items=4)
    assert [(v["layer"], v["neuron"]) for v in views] == [(l, j) for _, _, l, j, _ in picks]
    for v in views:
        assert v["method"] == "na" and v["expert"] == v["neuron"] // 32
        assert v["expert_neuron"] == v["neuron"] % 32 and "routed tokens only" in v["note"]
        assert [s["skill"] for s in v["skills"]] == ["forget", "retain"]
        assert len(v["promoted"]) == 10


def test_expert_without_routed_tokens_has_an_empty_view(lm):
    from skilllens.core.neuron_view import neuron_views

    views = neuron_views(lm, [("key", 0, e * 32) for e in range(4)], ["a"], k=2)
    counts = [v.skills[0]["count"] for v in views]
    n_tokens = len(encode_items(from_texts(["a"]).items, lm.tokenizer, 64)[0].ids)
    assert sum(counts) == 2 * n_tokens and 0 in counts  # top-2 of 4 experts
    empty = views[counts.index(0)]
    assert empty.skills[0]["hist"] is None and empty.skills[0]["contexts"] == []
    assert f"none was routed to expert {empty.expert}" in empty._repr_html_()


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_expert_keys_agree_with_collect_on_other_expert_layouts(family):
    """gpt-oss (transposed, interleaved gate/up, biases) and Llama-4 (dense-bmm experts, a
    shared expert): per-expert counts and means of neuron_pass equal collect's statistics."""
    from moe_families import tiny_moe

    from skilllens.core.collect import collect
    from skilllens.core.neuron_view import neuron_pass

    lm = tiny_moe(family)
    info = lm.adapter.moe_layer(1)
    skill = from_texts(TEXTS[:4], "toy")
    keys = [("key", 1, e) for e in range(len(info.widths))]
    _, stats, _ = neuron_pass(lm, skill, keys, k=2, batch_size=2)
    ref = collect(lm, skill, sites=["key"], layers=[1], progress=False, batch_size=3)[("key", 1)]
    assert torch.equal(torch.cat([stats[k].count for k in keys]).double(), ref.count.double())
    torch.testing.assert_close(torch.cat([stats[k].mean for k in keys]).double(),
                               ref.mean.double(), rtol=1e-4, atol=1e-6)
