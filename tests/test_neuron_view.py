"""The neuron view: the streaming bounded top-k equals a brute-force ranking of every token's
activation (on random data and on a tiny model), histograms are the counted values, the
vocabulary projection is W_U v, and the HTML shows contexts with the token marked."""
from __future__ import annotations

import random

import pytest
import torch

import skilllens
from skilllens.core.batching import encode_items
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.data import from_texts
from skilllens.stats.topk import TopK

TEXTS = ["2+2=4 and 3*3=9", "the cat sat on the mat", "def f(x): return x + 1",
         "Paris is the capital of France", "a", "7 - 1 = 6, 6 * 2 = 12, 12 / 3 = 4",
         "hello hello hello world"]


def _brute(x: torch.Tensor, k: int):
    """[(value, item, position)] per neuron by sorting every value (float64, ties by item,
    then position)."""
    B, T, d = x.shape
    out = []
    for j in range(d):
        rows = sorted(((-float(x[b, t, j]), b, t) for b in range(B) for t in range(T)))
        out.append([(-v, b, t) for v, b, t in rows[:k]])
    return out


def test_topk_streaming_and_merging_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=g)
    x[2, 3, 1] = x[4, 0, 1]  # a tie: the lower item wins in every order of updates
    full = _brute(x, 4)
    a, b = TopK(7, 4), TopK(7, 4)
    a.update(x[:2], items=torch.tensor([0, 1]))
    b.update(x[4:], items=torch.tensor([4, 5]))
    b.update(x[2:4], items=torch.tensor([2, 3]))
    for t in (a.merge(b), TopK(7, 4).update(x)):
        got = [t.neuron(j) for j in range(7)]
        assert [[(i, p) for _, i, p in n] for n in got] == [[(i, p) for _, i, p in n]
                                                            for n in full]
        assert torch.allclose(t.values, torch.tensor([[v for v, _, _ in n] for n in full]).T)


def test_topk_mask_fewer_than_k_and_smallest():
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    t = TopK(1, 4).update(x, mask=torch.tensor([[True, False, True]]))
    assert t.neuron(0) == [(3.0, 0, 2), (1.0, 0, 0)]
    s = TopK(1, 1, largest=False).update(x)
    assert s.neuron(0) == [(1.0, 0, 0)]
    with pytest.raises(skilllens.SkillLensError):
        t.merge(TopK(1, 3))


@pytest.fixture(scope="module")
def lm():
    return skilllens.load_model("tiny-llama")


@pytest.mark.parametrize("site,layer", [("key", 1), ("gate", 0)])
def test_view_contexts_equal_brute_force_on_a_tiny_model(lm, site, layer):
    k = 5
    skill = from_texts(TEXTS, "toy")
    enc = encode_items(skill.items, lm.tokenizer, 64)
    acts = []  # each item alone, unpadded: every token's activation
    for e in enc:
        seen = {}
        with hooks_applied(lm, [Hook(site, layer, lambda a: seen.setdefault("a", a.detach()))]):
            lm.model(input_ids=torch.tensor([e.ids]))
        acts.append(seen["a"][0].double())
    for j in random.Random(0).sample(range(lm.adapter.d_ff), 4):
        rows = sorted(((-float(a[t, j]), i, t) for i, a in enumerate(acts)
                       for t in range(a.shape[0])))[:k]
        view = skilllens.show_neuron(lm, site, layer, j, skills=skill, k=k, batch_size=3,
                                     max_length=64)
        ctx = view.skills[0]["contexts"]
        assert [(c["item"], c["position"]) for c in ctx] == [(i, t) for _, i, t in rows]
        assert [c["value"] for c in ctx] == pytest.approx([-v for v, _, _ in rows], abs=1e-5)
        first = ctx[0]
        assert first["token"] == lm.tokenizer.decode([enc[first["item"]].ids[first["position"]]])
        # the histogram counts every token once; mean/std are those of all activations
        allv = torch.cat([a[:, j] for a in acts])
        e = view.skills[0]
        assert sum(e["hist"]["counts"]) == e["count"] == allv.numel()
        assert e["mean"] == pytest.approx(float(allv.mean()), abs=1e-6)
        assert e["std"] == pytest.approx(float(allv.std(correction=0)), rel=1e-4, abs=1e-7)


def test_vocab_projection_is_the_unembedding_of_the_value_vector(lm):
    from skilllens.core.neuron_view import vocab_projection

    W, v = lm.adapter.unembedding().detach().double(), lm.adapter.value_vectors(1)[9].detach().double()
    ref = W @ v
    top = torch.topk(ref, 4)
    promoted, suppressed = vocab_projection(lm, 1, 9, 4)
    assert [p[1] for p in promoted] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert suppressed[0][1] == pytest.approx(float(ref.min()), rel=1e-4)


def test_view_html_marks_tokens_and_round_trips(lm, tmp_path):
    from skilllens.core.neuron_view import NeuronView

    view = skilllens.show_neuron(lm, "key", 1, 3, skills=["<b>x</b> 1+1=2", "y z"], k=2)
    h = view._repr_html_()
    c = view.skills[0]["contexts"][0]
    assert f"{c['value']:.4g}" in h and "<mark>" in h and "<b>x</b>" not in h
    assert "data:image/png;base64," in h and "W_U v" in h
    assert view.promoted[0][0] in repr(view) or repr(view.promoted[0][0]) in repr(view)
    again = NeuronView.from_dict(view.to_dict())
    assert again == view
    page = view.save(tmp_path / "n.html").read_text()
    assert "<mark>" in page and page.startswith("<!doctype html>")
    with pytest.raises(skilllens.SkillLensError, match="out of range"):
        skilllens.show_neuron(lm, "key", 1, 10_000, skills=["a"])
