"""Per-layer FFN widths (``adapter.d_ff_at(layer)``): neuron selection counts each layer's own
neurons, vocabulary projection, concept search, teacher-forced attribution, row masks and
random controls are sized per layer. On the tiny Gemma-4 with a double-wide last MLP
(``d_ff`` 64, 64, 128; :func:`skilllens.core.tiny_configs.tiny_per_layer_d_ff_model`), with
float64 references."""
import copy
import types
import warnings

import pytest
import torch

import skilllens
from skilllens.errors import SiteError, SkillLensError
from skilllens.unlearning.selection import top_percent

FORGET = ["12+7=19", "3*4=12", "100-1=99", "8/2=4", "7*7=49"]
RETAIN = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn",
          "rain fell on the roof"]


@pytest.fixture(scope="module")
def lm():
    from skilllens.core.tiny_configs import tiny_per_layer_d_ff_model
    from skilllens.core.tokenizers import byte_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_per_layer_d_ff_model()
    lm = skilllens.load_model((model, byte_tokenizer()), device="cpu")
    assert lm.adapter.d_ffs == [64, 64, 128] and lm.adapter.d_ff == 64
    return lm


@pytest.fixture(scope="module")
def stats(lm):
    from skilllens.core.collect import collect

    kw = dict(sites=["gate", "key"], stats=("moments", "abs"), progress=False)
    return collect(lm, FORGET, **kw), collect(lm, RETAIN, **kw)


# ---------------------------------------------------------------- top_percent
def test_top_percent_counts_each_rows_own_width():
    nan = float("nan")
    s = torch.tensor([[9.0, 1, nan, nan], [8.0, 7, 6, 5]])  # row 0: 2 real neurons (padded)
    per = top_percent(s, 50, "per_layer", widths=[2, 4])
    assert {r: v.tolist() for r, v in per.items()} == {0: [0], 1: [0, 1]}
    per = top_percent(s, 100, "per_layer", widths=[2, 4])  # padding is never selected
    assert {r: v.tolist() for r, v in per.items()} == {0: [0, 1], 1: [0, 1, 2, 3]}
    glob = top_percent(s, 50, "global", widths=[2, 4])  # round(0.5 * 6) = 3 of 6 real
    assert {r: v.tolist() for r, v in glob.items()} == {0: [0], 1: [0, 1]}
    # a NaN score inside a row's width counts as a neuron but is never picked
    s2 = torch.tensor([[3.0, nan, 1, 2]])
    assert top_percent(s2, 100, "per_layer")[0].tolist() == [0, 2, 3]
    assert top_percent(s2, 50, "global")[0].tolist() == [0, 3]
    # ties break by index
    ties = top_percent(torch.ones(2, 3), 50, "global")
    assert {r: v.tolist() for r, v in ties.items()} == {0: [0, 1, 2]}
    with pytest.raises(SkillLensError, match="widths"):
        top_percent(s, 10, widths=[2, 5])
    with pytest.raises(SkillLensError, match="widths"):
        top_percent(s, 10, widths=[2])


def _expected(scores: torch.Tensor, widths, percent, scope):
    """float64 reference selection: {row: sorted indices} over each row's real neurons."""
    if scope == "per_layer":
        out = {}
        for r, w in enumerate(widths):
            k = max(1, round(percent / 100 * w))
            out[r] = sorted(torch.argsort(scores[r, :w].double(), descending=True,
                                          stable=True)[:k].tolist())
        return out
    flat = [(float(scores[r, j]), r, j) for r, w in enumerate(widths) for j in range(w)]
    k = max(1, round(percent / 100 * sum(widths)))
    top = sorted(flat, key=lambda t: (-t[0], t[1], t[2]))[:k]
    return {r: sorted(j for _, rr, j in top if rr == r) for r in range(len(widths))
            if any(rr == r for _, rr, _ in top)}


@pytest.mark.parametrize("scope,percent", [("per_layer", 60), ("per_layer", 25),
                                           ("global", 30)])
@pytest.mark.parametrize("method", ["neuron_adjust", "selective_pruning"])
def test_percent_is_counted_against_each_layers_width(lm, stats, method, scope, percent):
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.selective_pruning import SelectivePruner

    fs, rs = stats
    cls = NeuronAdjuster if method == "neuron_adjust" else SelectivePruner
    m = cls(percent=percent, scope=scope).fit_stats(fs, rs, lm)
    widths = lm.adapter.d_ffs
    picked = m.params_ if method == "neuron_adjust" else m.selected_
    got = {l: (p.index if method == "neuron_adjust" else p).tolist() for l, p in picked.items()}
    assert got == _expected(m.scores_, widths, percent, scope)
    for l, idx in got.items():
        assert max(idx) < lm.adapter.d_ff_at(l), f"layer {l}: padding selected"
    if scope == "per_layer":
        assert m.selected_per_layer() == {l: round(percent / 100 * w) for l, w in enumerate(widths)}
    else:
        assert m.n_selected == round(percent / 100 * sum(widths))  # 256 real neurons, not 3 x 128
    # the scores are float64 functions of the collected statistics (reference recomputed)
    mf, mr = fs.stacked(m.site, "mean"), rs.stacked(m.site, "mean")
    if method == "neuron_adjust":
        ref = mf - mr  # rule "signed"
    else:
        ref = fs.stacked(m.site, "mean_abs") / (rs.stacked(m.site, "mean_abs") + m.eps)
    torch.testing.assert_close(m.scores_, ref.double(), equal_nan=True)
    assert torch.isnan(m.scores_[0, 64:]).all() and not torch.isnan(m.scores_[2]).any()
    ids = lm.tokenizer(["2+2="], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        with m.applied(lm):
            lm.model(input_ids=ids)  # the selected indices fit every layer's activation
        assert torch.equal(lm.model(input_ids=ids).logits, before)


# ---------------------------------------------------------------- vocab projection and search
def test_project_values_projects_each_layers_own_value_vectors(lm, tmp_path):
    from skilllens.concepts.vocab import VocabProjection, project_values, value_logits

    ad = lm.adapter
    proj = project_values(lm, k=6, chunk=50, progress=False)
    assert proj.top_ids.shape == (3, 128, 6) and proj.d_ffs == [64, 64, 128]
    W = ad.unembedding().double()
    for li, layer in enumerate(proj.layers):
        w = ad.d_ff_at(layer)
        ref = (ad.value_vectors(layer).double() @ W.t()).topk(6, dim=-1)
        assert ref.values.shape[0] == w
        torch.testing.assert_close(proj.top_logits[li, :w].double(), ref.values,
                                   rtol=1e-4, atol=1e-5)
        assert (proj.top_ids[li, :w] == ref.indices).float().mean() > 0.99
        assert (proj.top_ids[li, w:] == -1).all() and torch.isnan(proj.top_logits[li, w:]).all()
    assert len(proj.tokens(lm.tokenizer, 2, 127)) == 6
    with pytest.raises(SiteError, match=r"layer 0 has 64 value vectors"):
        proj.tokens(lm.tokenizer, 0, 100)
    with pytest.raises(SiteError, match=r"layer 1 has 64 value vectors"):
        value_logits(lm, 1, [3, 100])
    proj.save(tmp_path / "p.safetensors")
    back = VocabProjection.load(tmp_path / "p.safetensors", lm.model)
    assert back.d_ffs == [64, 64, 128] and torch.equal(back.top_ids, proj.top_ids)
    # an artifact without d_ffs: the widths are read from the padding
    assert VocabProjection(proj.top_ids, proj.top_logits, proj.layers, 6).d_ffs == [64, 64, 128]


def test_concept_search_ranks_vectors_of_the_wide_layer_and_never_padding(lm):
    from skilllens.concepts import Concept, ConceptSearch

    m = copy.deepcopy(lm.model)  # plant a vector without touching the shared model
    lm2 = skilllens.load_model((m, lm.tokenizer), device="cpu")
    ad = lm2.adapter
    ids = lm2.tokenizer("qz", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ad.value_vectors(2)[100] = 3 * ad.unembedding().detach()[ids].sum(0)
    zed = Concept("Zed", "zzz qqq zq " * 40, ["What is zq?"], ["Unrelated?"])
    other = Concept("Other", "aaa eee ae " * 40, ["What is ae?"], ["Unrelated?"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ConceptSearch(k=2, n_candidates=1000, through_norm=False).fit(
            lm2, [zed, other], progress=False)
    assert (s.best("Zed").layer, s.best("Zed").index) == (2, 100)
    for cands in s.candidates_.values():
        assert len(cands) == 256  # every real value vector, no padded row
        assert all(c.index < ad.d_ff_at(c.layer) for c in cands)


# ---------------------------------------------------------------- teacher forcing
def _key_modules(lm, model):
    names = {id(mod): n for n, mod in lm.model.named_modules()}
    return [model.get_submodule(names[id(lm.adapter.site_module("key", l)[0])])
            for l in range(lm.adapter.n_layers)]


def test_attribution_is_sized_per_layer_and_matches_float64(lm):
    from skilllens.concepts import TeacherForced

    prompts = ["Question: what is zq?\n Answer:", "Q: b?", "Tell me"]
    tf = TeacherForced(lm, prompts, ["zq is q", "b b", "no"], batch_size=2).fit()
    attr = tf.attribution()
    assert attr.shape == (3, 128) and attr.dtype == torch.float64
    assert torch.isnan(attr[:2, 64:]).all() and torch.isfinite(attr[:2, :64]).all()
    assert torch.isfinite(attr[2]).all()
    # float64 reference: gradient x activation at each down projection's input, one
    # unpadded sequence at a time, on a float64 copy
    m = copy.deepcopy(lm.model).double()
    for p in m.parameters():
        p.requires_grad_(True)
    downs = _key_modules(lm, m)
    ref = [torch.zeros(lm.adapter.d_ff_at(l), dtype=torch.float64) for l in range(3)]
    live = [(s, n) for s, n in zip(tf.seqs, tf.n_answer) if n > 0]
    for seq, n in live:
        acts = []
        hooks = [d.register_forward_pre_hook(lambda _m, a: acts.append(a[0])) for d in downs]
        try:
            logits = m(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        finally:
            for h in hooks:
                h.remove()
        lp = torch.log_softmax(logits[len(seq) - n - 1:len(seq) - 1], -1)
        obj = lp.gather(-1, torch.tensor(seq[len(seq) - n:])[:, None]).mean() / len(live)
        for l, (a, g) in enumerate(zip(acts, torch.autograd.grad(obj, acts))):
            ref[l] += (a * g).sum((0, 1)).detach()
    for l in range(3):
        w = lm.adapter.d_ff_at(l)
        scale = float(ref[l].abs().max())
        assert scale > 0
        torch.testing.assert_close(attr[l, :w], ref[l], rtol=1e-3, atol=1e-4 * scale)


def test_row_masks_are_sized_per_layer(lm):
    from skilllens.concepts.fastscore import RowMasks
    from skilllens.core.architectures import ModelAdapter

    rows = [[(2, 100)], [(0, 10), (2, 5)]]
    rm = RowMasks(lm, rows)
    assert rm.masks[2].shape == (2, 128) and rm.masks[0].shape == (2, 64)
    ids = lm.tokenizer(["one two three", "four five six"], return_tensors="pt")["input_ids"]
    rm.set_rows([0, 1])
    with torch.no_grad(), rm.applied():
        got = lm.model(input_ids=ids).logits
    for r, vs in enumerate(rows):  # float64 reference: the weight columns zeroed on a copy
        m = copy.deepcopy(lm.model).double()
        ad = ModelAdapter(m, lm.adapter.arch)
        with torch.no_grad():
            for layer, index in vs:
                ad.value_vectors(layer)[index] = 0
            ref = m(input_ids=ids[r:r + 1]).logits[0]
        torch.testing.assert_close(got[r].double(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(SiteError, match=r"layer 0 has 64 value vectors"):
        RowMasks(lm, [[(0, 100)]])


def test_selector_pool_and_random_control_use_each_layers_width(lm):
    from skilllens.concepts import SetSelector, random_control

    qa = (["Question: what is zq?\n Answer:", "Q: b?"], ["zq is q", "b b"])
    ua = (["Tell me", "Say it"], ["no", "yes"])
    sel = SetSelector(n_attr=6, max_vectors=1, n_unrelated_tf=2).select(lm, qa, ua)
    assert sel.screened and all(s.index < lm.adapter.d_ff_at(s.layer) for s in sel.screened)
    assert all(torch.isfinite(torch.tensor(s.attribution)) for s in sel.screened)
    bad = types.SimpleNamespace(layer=1, index=100)
    with pytest.raises(SiteError, match=r"layer 1 has 64 value vectors"):
        SetSelector(n_attr=0).select(lm, qa, ua, [bad])
    vectors = [(2, i) for i in range(30)] + [(0, i) for i in range(30)]
    ctrl = random_control(lm, vectors, seed=0)
    wide = [j for l, j in ctrl if l == 2]
    assert all(j < 128 for j in wide) and any(j >= 64 for j in wide)
    assert all(j < 64 for l, j in ctrl if l == 0)
