"""Concept vectors on tiny random models: data, vocab projection, search, ablations, Needle,
fine-tuning unlearning, metrics, generation. Reference defects of METHODS.md s.3 are tests."""
import json
import warnings

import pytest
import torch

from skilllens import load_model
from skilllens.concepts import (AnswerCache, BehaviourSuite, Concept, ConceptAblation,
                                ConceptSearch, FineTuneUnlearner, Needle, VocabProjection,
                                answer_logprob, generate, intrinsic_scores, load_concepts,
                                project_values, text_scores, token_weights)
from skilllens.concepts.metrics import bleu_scores, cosine, jaccard, rouge_l_scores
from skilllens.errors import ArtifactError, DataError, FingerprintMismatchError, SiteError


@pytest.fixture()
def lm():
    return load_model("tiny-llama")  # fresh per test: tests edit weights


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap, except_=()):
    for k, v in model.state_dict().items():
        if k not in except_:
            assert torch.equal(v, snap[k]), f"{k} changed"


def concept(**kw):
    base = dict(name="Zed", text="zzz qqq zq " * 40 + "the end.", questions=["What is zq?", "Who?"],
                unrelated_questions=["What is 2+2?", "Name a colour.", "Hi?"])
    base.update(kw)
    return Concept(**base)


# ---------------------------------------------------------------- data
def test_dev_concepts_load(data_dir):
    cs = load_concepts(None, data_dir)
    assert len(cs) == 10 and cs[0].name == "Poland"
    assert all(len(c.questions) == 10 and len(c.unrelated_questions) == 50 for c in cs)
    assert cs[0].reference == {"layer": 23, "index": 743, "model": "llama-2-7b-chat"}
    assert cs[0].completions and "prefix" in cs[0].completions[0]
    assert [c.name for c in load_concepts(None, data_dir, names=["italy", "Poland"])] == ["Italy", "Poland"]


def test_user_concepts_json_yaml_and_missing_fields(tmp_path):
    entry = {"name": "Cats", "text": "Cats purr. " * 5, "questions": ["Do cats purr?"],
             "unrelated_questions": ["What is 1+1?"], "translated_questions": {"de": ["Schnurren Katzen?"]}}
    (tmp_path / "c.json").write_text(json.dumps([entry]))
    (tmp_path / "c.yaml").write_text("- name: Cats\n  text: Cats purr a lot.\n  questions: ['Do cats purr?']\n"
                                     "  unrelated_questions: ['What is 1+1?']\n")
    assert load_concepts(tmp_path / "c.json")[0].translated_questions["de"] == ["Schnurren Katzen?"]
    assert load_concepts(tmp_path / "c.yaml")[0].questions == ["Do cats purr?"]
    bad = dict(entry)
    del bad["text"], bad["questions"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"missing field\(s\) \['text', 'questions'\]"):
        load_concepts(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no questions"):
        Concept("X", "text", [], ["q"])
    with pytest.raises(DataError, match="Atlantis.*not in"):
        load_concepts(None, names=["Atlantis"])


# ---------------------------------------------------------------- vocab projection
@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])  # untied, tied (and row layout)
def test_projection_matches_float64(spec):
    lm = load_model(spec)
    proj = project_values(lm, k=10, chunk=17, progress=False)  # odd chunk: exercises chunking
    W = lm.adapter.unembedding().double()
    for li, layer in enumerate(proj.layers):
        ref = lm.adapter.value_vectors(layer).double() @ W.t()
        top = ref.topk(10, dim=-1)
        torch.testing.assert_close(proj.top_logits[li].double(), top.values, rtol=1e-4, atol=1e-5)
        assert (proj.top_ids[li] == top.indices).float().mean() > 0.99
    # through the final norm scale
    lm.adapter.final_norm().weight.data = torch.rand(lm.adapter.d_model) + 0.5
    p2 = project_values(lm, layers=[0], k=5, through_norm=True, progress=False)
    s = lm.adapter.final_norm().weight.double()
    ref = (lm.adapter.value_vectors(0).double() * s) @ W.t()
    torch.testing.assert_close(p2.top_logits[0].double(), ref.topk(5).values, rtol=1e-4, atol=1e-5)


def test_projection_save_load_and_fingerprint(tmp_path, lm):
    proj = project_values(lm, layers=[1], k=7, progress=False)
    proj.save(tmp_path / "p.safetensors")
    back = VocabProjection.load(tmp_path / "p.safetensors", lm)
    assert torch.equal(back.top_ids, proj.top_ids) and back.layers == [1]
    with pytest.raises(FingerprintMismatchError):
        VocabProjection.load(tmp_path / "p.safetensors", load_model("tiny-gpt2"))


# ---------------------------------------------------------------- search
def test_token_weights_prefer_specific_tokens(lm):
    tok = lm.tokenizer
    with pytest.warns(UserWarning, match="bytes"):
        w = token_weights(tok, 259, "qqqq zzzz " * 30 + "ee", ["eeee aaaa " * 30 + "q"])
    q, e = tok("q", add_special_tokens=False)["input_ids"][0], tok("e", add_special_tokens=False)["input_ids"][0]
    assert w[q] > 0 and w[e] == 0


def test_search_finds_planted_concept_vector(lm):
    """Plant a value vector that writes the concept's characters; the search must rank it first."""
    tok, ad = lm.tokenizer, lm.adapter
    ids = tok("qz", add_special_tokens=False)["input_ids"]
    W = ad.unembedding().detach()
    with torch.no_grad():
        ad.value_vectors(1)[5] = 3 * W[ids].sum(0)
    other = concept(name="Other", text="aaa eee ae " * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ConceptSearch(k=2, n_candidates=3).fit(lm, [concept(), other], progress=False)
    best = s.best("Zed")
    assert (best.layer, best.index) == (1, 5)
    assert set(best.top_tokens[:2]) == {"q", "z"} and best.coverage == 1.0
    assert (s.best("Other").layer, s.best("Other").index) != (1, 5)


def test_search_save_load(tmp_path, lm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ConceptSearch(k=3, n_candidates=2).fit(lm, [concept()], progress=False)
    s.save(tmp_path / "s.safetensors")
    back = ConceptSearch.load(tmp_path / "s.safetensors", lm)
    assert back.candidates_["Zed"] == s.candidates_["Zed"]
    assert torch.equal(back.weights_["Zed"], s.weights_["Zed"])


# ---------------------------------------------------------------- ablations
def test_noise_is_seeded_and_exact(lm):
    v = lm.adapter.value_vectors(1)[7].detach().clone()
    a = ConceptAblation(1, 7, "noise", sigma=0.3, seed=5).fit(lm)
    b = ConceptAblation(1, 7, "noise", sigma=0.3, seed=5).fit(lm)
    c = ConceptAblation(1, 7, "noise", sigma=0.3, seed=6).fit(lm)
    assert torch.equal(a.new_vector_, b.new_vector_) and not torch.equal(a.new_vector_, c.new_vector_)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(a.new_vector_.double(),
                               v.double() + 0.3 * torch.randn(v.shape[0], generator=g).double())
    assert ConceptAblation(1, 7, "zero").fit(lm).new_vector_.abs().sum() == 0


def test_ablating_two_concepts_never_aliases(lm):
    """The reference's ``new_params = old_params`` let noise accumulate across concepts."""
    snap = snapshot(lm.model)
    key = "model.layers.1.mlp.down_proj.weight"
    a = ConceptAblation(1, 3, "noise", 0.5, seed=1).fit(lm)
    with a.applied(lm):
        assert not torch.equal(lm.model.state_dict()[key], snap[key])
        assert torch.equal(lm.adapter.value_vectors(1)[3], a.new_vector_)
    assert_identical(lm.model, snap)
    b = ConceptAblation(1, 3, "noise", 0.5, seed=2).fit(lm)  # same column, after A
    assert torch.equal(b.original_, snap[key][:, 3])  # computed from clean weights
    with b.applied(lm):
        assert_identical(lm.model, snap, except_=(key,))
        diff = (lm.model.state_dict()[key] != snap[key]).nonzero()[:, 1].unique().tolist()
        assert diff == [3]
    assert_identical(lm.model, snap)
    with pytest.raises(RuntimeError):  # restored also when the block raises
        with a.applied(lm):
            raise RuntimeError("boom")
    assert_identical(lm.model, snap)


def test_project_removes_direction_float64(lm):
    snap = snapshot(lm.model)
    ad = lm.adapter
    v = ad.value_vectors(0)[11].detach().double()
    u = v / v.norm()
    down = ad._module(0, ad.arch.value)
    x = torch.randn(5, ad.d_ff)
    ref = down(x).detach().double()
    with ConceptAblation(0, 11, "project").fit(lm).applied(lm):
        out = down(x).detach().double()
    expected = ref - (ref @ u)[:, None] * u[None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out @ u).abs().max() < 1e-5
    assert_identical(lm.model, snap)


def test_project_on_gpt2_with_bias():
    lm = load_model("tiny-gpt2")
    snap = snapshot(lm.model)
    down = lm.adapter._module(1, lm.adapter.arch.value)
    torch.nn.init.normal_(down.bias)
    snap = snapshot(lm.model)
    v = lm.adapter.value_vectors(1)[2].detach().double()
    u = v / v.norm()
    x = torch.randn(3, 4, lm.adapter.d_ff)
    with ConceptAblation(1, 2, "project").fit(lm).applied(lm):
        assert (down(x).detach().double() @ u).abs().max() < 1e-5
    assert_identical(lm.model, snap)


def test_ablation_bad_input(lm):
    with pytest.raises(SiteError, match="sigma must be > 0"):
        ConceptAblation(0, 1, "noise", sigma=0)
    with pytest.raises(SiteError, match="out of range"):
        ConceptAblation(0, 64, "zero").fit(lm)
    with pytest.raises(SiteError, match="out of range"):
        ConceptAblation(5, 1, "zero").fit(lm)
    with pytest.raises(SiteError, match="unknown ablation"):
        ConceptAblation(0, 1, "scramble")


def test_ablation_save_load(tmp_path, lm):
    a = ConceptAblation(1, 4, "project").fit(lm)
    a.save(tmp_path / "a.safetensors")
    b = ConceptAblation.load(tmp_path / "a.safetensors", lm)
    assert (b.method, b.layer, b.index) == ("project", 1, 4)
    assert torch.equal(b.direction_, a.direction_)
    with pytest.raises(FingerprintMismatchError):
        ConceptAblation.load(tmp_path / "a.safetensors", load_model("tiny-gpt2"))
    quick = ConceptAblation(1, 4, "zero").fit(lm, fingerprint=False)  # in-memory use only
    with pytest.raises(ArtifactError, match="fingerprint"):
        quick.save(tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()


# ---------------------------------------------------------------- Needle / fine-tuning unlearning
def test_needle_touches_only_its_column(lm):
    snap = snapshot(lm.model)
    key = "model.layers.1.mlp.down_proj.weight"
    n = Needle(1, 9, sigma=0.1, steps=4, lr=0.05, weight_decay=0.5, seq_len=32, max_chunks=4).fit(lm, concept())
    assert_identical(lm.model, snap)  # fit leaves the model unchanged
    assert all(p.grad is None for p in lm.model.parameters())
    assert n.losses_[-1] > n.losses_[0]  # gradient ascent raises the article's NLL
    with n.applied(lm):
        assert_identical(lm.model, snap, except_=(key,))
        w = lm.model.state_dict()[key]
        changed = (w != snap[key]).nonzero()[:, 1].unique().tolist()
        assert changed == [9]  # weight decay did not touch the other columns
    assert_identical(lm.model, snap)


def test_needle_save_load(tmp_path, lm):
    n = Needle(0, 2, steps=1, seq_len=16, max_chunks=2).fit(lm, concept())
    n.save(tmp_path / "n.safetensors")
    m = Needle.load(tmp_path / "n.safetensors", lm)
    assert torch.equal(m.new_vector_, n.new_vector_) and m.steps == 1


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_finetune_unlearning_scope_and_restore(tmp_path, lm, method):
    snap = snapshot(lm.model)
    u = FineTuneUnlearner(method, "ffn_out", steps=3, lr=1e-2, seq_len=32, max_chunks=4).fit(lm, concept())
    assert_identical(lm.model, snap)
    if method == "npo":  # at step 0 the policy equals the frozen reference: loss = (2/beta) log 2
        assert abs(u.losses_[0] - 2 / 0.1 * torch.log(torch.tensor(2.0)).item()) < 1e-4
    with u.applied(lm):
        changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    assert_identical(lm.model, snap)
    u.save(tmp_path / "u.safetensors")
    back = FineTuneUnlearner.load(tmp_path / "u.safetensors", lm)
    assert back.method == method and set(back.trained_) == set(u.trained_)


def test_finetune_full_scope_changes_more(lm):
    u = FineTuneUnlearner("ga", "full", steps=1, lr=1e-2, seq_len=16, max_chunks=2).fit(lm, concept())
    assert len(u.trained_) == len(list(lm.model.parameters()))


# ---------------------------------------------------------------- metrics
def test_text_scores_against_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat today", "Warsaw is the capital", "", "same"]
    refs = ["the cat sat on the mat", "The capital of Poland is Warsaw", "", "same"]
    b = bleu_scores(preds, refs)
    assert b[2] == b[3] == 1.0
    assert b[0] == pytest.approx(sacrebleu.sentence_bleu(preds[0], [refs[0]]).score / 100)
    r = rouge_l_scores(preds, refs)
    assert r[1] == pytest.approx(rouge_scorer.RougeScorer(["rougeL"]).score(refs[1], preds[1])["rougeL"].fmeasure)
    s = text_scores(preds, refs)
    assert s.n == 4 and s.bleu == pytest.approx(sum(b) / 4) and 0 < s.bleu < 1
    with pytest.raises(DataError):
        text_scores(["a"], ["a", "b"])


def test_intrinsic_scores(lm):
    torch.manual_seed(0)
    a, b = torch.randn(32), torch.randn(32)
    assert cosine(a, b) == pytest.approx(float(a.double() @ b.double() / (a.double().norm() * b.double().norm())))
    assert cosine(a, torch.zeros(32)) == 0.0
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    same = intrinsic_scores(lm, a, a.clone(), "abc abc")
    assert same.cosine == pytest.approx(1.0) and same.l2 == 0 and same.jaccard_top == 1.0
    diff = intrinsic_scores(lm, a, b, "abc abc", k=50)
    assert diff.jaccard_top < 1 and diff.l2 == pytest.approx(float((a - b).double().norm()))


# ---------------------------------------------------------------- generation and validation
def test_left_padded_batch_equals_single(lm):
    prompts = ["Question: a?\n Answer:", "Question: a much longer question here?\n Answer:", "Hi"]
    batched = generate(lm, prompts, max_new_tokens=6, batch_size=3).texts
    single = [generate(lm, [p], max_new_tokens=6, batch_size=1).texts[0] for p in prompts]
    assert batched == single
    assert lm.tokenizer.padding_side == "right"  # restored


def test_answer_logprob_matches_float64(lm):
    prompts, answers = ["Question: x?\n Answer:", "Q: longer one?"], ["yes it is", "no"]
    got = answer_logprob(lm, prompts, answers)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        pid = lm.tokenizer(p)["input_ids"]
        aid = lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pid + aid])
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.double()[0], -1)
        ref = sum(logp[len(pid) + j - 1, t] for j, t in enumerate(aid)) / len(aid)
        assert got[i].item() == pytest.approx(ref.item(), abs=1e-4)


def test_suite_scores_all_unrelated_and_checks_dtype(lm):
    c = concept(unrelated_questions=[f"Question {i}?" for i in range(12)])
    cache = AnswerCache()
    suite = BehaviourSuite(c, max_new_tokens=3, batch_size=5, held_out=None).fit(lm, cache)
    s = suite.score(lm)
    assert s.text["unrelated_qa"].n == 12  # every unrelated answer is scored
    split = BehaviourSuite(c, max_new_tokens=3, batch_size=5).fit(lm, cache)
    assert split.score(lm).text["unrelated_qa"].n == 6  # the held-out half
    assert s.text["concept_qa"].bleu == 1.0 and abs(s.logprob_drop["concept_qa"]) < 1e-5
    with ConceptAblation(1, 0, "noise", sigma=5.0).fit(lm).applied(lm):
        assert suite.logprob_drop(lm)["concept_qa"] != 0
    lm.model.to(torch.bfloat16)
    with pytest.raises(DataError, match="same dtype"):
        suite.score(lm)


# ---------------------------------------------------------------- search scorer and selection
def test_token_weights_tfidf_and_name_bonus():
    """Words as frequent in every article get 0; article-only words the most; the concept's
    name is raised to the top weight unless it is a very frequent token."""
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    vocab = lm.adapter.unembedding().shape[0]
    text = "The Warsaw castle is in the city. " * 5 + "Poland joined the union. " * 2
    bg = ["The cat is in the house. " * 6, "The river is in the valley. " * 6]
    w = token_weights(tok, vocab, text, bg, name="Poland")
    ids = {s: tok(s, add_special_tokens=False)["input_ids"][0] for s in (" the", " Warsaw", " Poland", " is")}
    assert w[ids[" the"]] == 0 and w[ids[" is"]] == 0
    assert w[ids[" Warsaw"]] > 0 and float(w.max()) == pytest.approx(1.0)
    assert w[ids[" Poland"]] == pytest.approx(1.0)  # name bonus
    w2 = token_weights(tok, vocab, "The harbour and the harbour wall of the new town. " * 5, bg, name="New Town")
    assert w2[tok(" new", add_special_tokens=False)["input_ids"][0]] < 1.0  # frequent: no bonus


def test_zero_ablation_edits_exactly_the_intended_column(lm):
    """The edit lands in down_proj's column ``index`` of ``layer`` (no other weight), changes the
    model's output, and is undone bit-for-bit."""
    key = "model.layers.1.mlp.down_proj.weight"
    snap = snapshot(lm.model)
    x = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = lm.model(x).logits
    abl = ConceptAblation(1, 7, "zero").fit(lm)
    with abl.applied(lm):
        W = lm.model.state_dict()[key]
        assert torch.all(W[:, 7] == 0) and torch.equal(W[:, 8:], snap[key][:, 8:])
        assert_identical(lm.model, snap, except_=(key,))
        with torch.no_grad():
            assert not torch.equal(lm.model(x).logits, before)
    assert_identical(lm.model, snap)


def test_run_concepts_with_fixed_vectors_scores_held_out(data_dir):
    """Given vectors skip the choice; the headline is on the held-out half, with a control and a
    Needle comparison on the same set."""
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts

    lm = load_model("tiny-llama")
    cs = load_concepts(None, data_dir, limit=1)
    s = ExperimentSettings(n_candidates=0, n_attr=2, max_new_tokens=3, n_unrelated=4, n_questions=4,
                           compare=("needle",), unlearn_steps=1, seq_len=16, max_chunks=2)
    res = run_concepts(lm, cs, s, progress=False, vectors={cs[0].name: [(1, 3), (0, 5)]})
    r = res["concepts"][0]
    assert r["vectors"] == [[1, 3], [0, 5]] and (r["layer"], r["index"]) == (1, 3)
    assert "screening" not in r and "selection" not in r
    assert r["concept_qa"]["n"] == 2 and r["unrelated_qa"]["n"] == 2
    assert r["intrinsic"]["cosine"] == 0.0 and len(r["intrinsic_per_vector"]) == 2  # zeroed
    assert [v[0] for v in r["control"]["vectors"]] == [1, 0]
    nd = r["comparison"]["needle"]
    assert len(nd["intrinsic_per_vector"]) == 2 and 0 < nd["intrinsic"]["cosine"] < 1
    json.dumps(res)  # serialisable
