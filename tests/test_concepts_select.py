"""Honest split, batched generation, teacher-forced scoring, attribution and set selection for
concept vectors, on tiny random models."""
import json
import warnings

import pytest
import torch

from skilllens import load_model
from skilllens.concepts import (BehaviourSuite, Concept, ConceptAblation, SetSelector,
                                TeacherForced, ablated, answer_logprob, greedy_generate,
                                random_control, split_indices)
from skilllens.concepts.generation import generate, generate_answers, qa_prompts
from skilllens.concepts.select import Screened
from skilllens.errors import DataError


@pytest.fixture()
def lm():
    return load_model("tiny-llama")


def concept(nq=6, nu=8):
    return Concept("Zed", "zzz qqq zq " * 40, [f"What is zq number {i}?" for i in range(nq)],
                   [f"Unrelated question {i}?" for i in range(nu)])


# ---------------------------------------------------------------- split
def test_split_is_seeded_disjoint_and_complete():
    a, b = split_indices(10, 0.5, 0, "Poland:concept_qa"), split_indices(10, 0.5, 0, "Poland:concept_qa")
    assert a == b and len(a.held_out) == 5
    assert sorted(a.selection + a.held_out) == list(range(10)) and not set(a.selection) & set(a.held_out)
    assert split_indices(10, 0.5, 1, "Poland:concept_qa") != a  # the seed matters
    assert len(split_indices(3, 0.9, 0, "x").selection) == 1  # never an empty side
    with pytest.raises(DataError, match="at least 2"):
        split_indices(1, 0.5, 0, "x")
    with pytest.raises(DataError, match="held_out must be in"):
        split_indices(10, 1.0, 0, "x")


def test_suite_holds_out_questions_and_records_split(lm):
    c = concept()
    suite = BehaviourSuite(c, max_new_tokens=2, held_out=0.5, probes=("role_play",))
    sp = suite.split_["concept_qa"]
    assert suite.prompts["concept_qa"] == [f"Question: {c.questions[i]}\n Answer:" for i in sp.held_out]
    assert suite.prompts["concept_qa@sel"] == [f"Question: {c.questions[i]}\n Answer:" for i in sp.selection]
    assert not set(suite.prompts["unrelated_qa"]) & set(suite.prompts["unrelated_qa@sel"])
    assert len(suite.prompts["role_play"]) == len(sp.held_out)  # probes: held-out questions only
    assert suite.held_out_sets == ["concept_qa", "unrelated_qa", "role_play"]
    rec = json.loads(json.dumps(suite.split_record(0, 0.5)))
    assert rec["concept_qa"]["held_out"] == sp.held_out and rec["seed"] == 0


# ---------------------------------------------------------------- generation
def test_greedy_generate_matches_hf_and_single(lm):
    prompts = ["Question: a?\n Answer:", "Question: a much longer question here?\n Answer:", "Hi"]
    ours = greedy_generate(lm.model, lm.tokenizer, prompts, 6, batch_size=3)
    single = [greedy_generate(lm.model, lm.tokenizer, [p], 6)[0] for p in prompts]
    tok = lm.tokenizer
    ref = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        g = lm.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        ref.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert ours == single == ref
    assert tok.padding_side == "right"  # restored


def test_greedy_generate_stops_at_stop_string(lm):
    prompts = ["Question: a?\n Answer:", "Question: b b b?\n Answer:"]
    full = greedy_generate(lm.model, lm.tokenizer, prompts, 12)
    stop = full[0].strip()[2:4]  # a string the first answer contains after its start
    cut = greedy_generate(lm.model, lm.tokenizer, prompts, 12, stop=(stop,))
    assert cut[0] == full[0][: full[0].find(stop, 1)].strip() and len(cut[0]) < len(full[0])
    for f, c in zip(full, cut):
        assert f.startswith(c)
    with pytest.raises(DataError, match="max_new_tokens"):
        greedy_generate(lm.model, lm.tokenizer, prompts, 0)


# ---------------------------------------------------------------- teacher forcing and attribution
def test_teacher_forced_matches_answer_logprob_and_shortcut_is_exact(lm):
    P = ["Question: a?\n Answer:", "Question: a much longer question here?\n Answer:", "Hi"]
    A = ["yes it is", "no", ""]
    tf = TeacherForced(lm, P, A, batch_size=2).fit()
    assert tf.shortcut_
    torch.testing.assert_close(tf.base_, answer_logprob(lm, P, A), equal_nan=True, atol=1e-5, rtol=0)
    with ConceptAblation(1, 3, "noise", sigma=3.0).fit(lm).applied(lm):
        short, full = tf.logprob(min_layer=1), tf.logprob(min_layer=0)
        assert torch.allclose(short.nan_to_num(), full.nan_to_num(), atol=1e-5)
        assert tf.drop(1) != 0
    assert tf.drop(0) == pytest.approx(0.0, abs=1e-6)  # restored model: no drop


@pytest.mark.parametrize("call", [
    lambda lm: qa_prompts("What is zq?"),
    lambda lm: generate_answers(lm, "What is zq?", max_new_tokens=2),
    lambda lm: generate(lm, "Question: a?\n Answer:", max_new_tokens=2),
    lambda lm: answer_logprob(lm, "ab", "cd"),                   # was: two one-letter pairs
    lambda lm: answer_logprob(lm, ["Question: a?\n Answer:"], "y"),
    lambda lm: TeacherForced(lm, "ab", "cd"),
    lambda lm: TeacherForced(lm, ["Question: a?\n Answer:"], "y"),
    lambda lm: TeacherForced(lm, "ab", None, answer_ids=[[5], [6]], max_new_tokens=4),
], ids=["qa_prompts", "generate_answers", "generate", "answer_logprob", "answer_logprob-answers",
        "TeacherForced", "TeacherForced-answers", "TeacherForced-answer_ids"])
def test_one_string_is_not_a_list_of_prompts(call, lm):
    """A bare string given for a list of prompts/questions/answers raises the library's one
    error; it used to be read as one prompt per character."""
    with pytest.raises(DataError, match="must be a list, got one string .*wrap it as \\[text\\]"):
        call(lm)


def test_attribution_predicts_zero_ablation_drop(lm):
    tf = TeacherForced(lm, ["Question: what is zq?\n Answer:", "Q: b?"], ["zq is q", "b b"]).fit()
    attr = tf.attribution()
    assert attr.shape == (2, 64)
    actual = []
    for i in range(64):
        with ConceptAblation(1, i, "zero").fit(lm).applied(lm):
            actual.append(tf.drop(1))
    actual = torch.tensor(actual, dtype=torch.float64)
    assert torch.corrcoef(torch.stack([attr[1], actual]))[0, 1] > 0.95
    assert int(attr[1].argmax()) == int(actual.argmax())


# ---------------------------------------------------------------- selection
def test_greedy_set_rule(monkeypatch, lm):
    """Additive fake effects: the greedy set takes vectors in screened order while the gain
    rises by >= min_gain and unrelated agreement stays >= the floor, at most max_vectors,
    stopping after `patience` misses."""
    # vector -> (concept agreement loss, unrelated agreement loss)
    effect = {(1, 0): (0.30, 0.00), (1, 1): (0.20, 0.01), (1, 2): (0.001, 0.0),
              (1, 3): (0.25, 0.20), (0, 4): (0.10, 0.0), (0, 5): (0.06, 0.0)}

    def fake(self, lm_, vectors, tf_c, tf_u):
        lc = sum(effect[tuple(v)][0] for v in vectors)
        lu = sum(effect[tuple(v)][1] for v in vectors)
        return {"concept_drop": 0.0, "unrelated_drop": 0.0, "concept_agreement": 1 - lc,
                "unrelated_agreement": 1 - lu, "gain": lc - lu}

    monkeypatch.setattr(SetSelector, "_change", fake)
    monkeypatch.setattr(TeacherForced, "fit", lambda self: self)
    monkeypatch.setattr(TeacherForced, "attribution",
                        lambda self: torch.zeros(2, 64, dtype=torch.float64))

    class C:
        def __init__(self, layer, index):
            self.layer, self.index = layer, index

    cands = [C(*k) for k in effect]
    qa = (["q?"], ["a"])
    sel = SetSelector(n_attr=0, max_vectors=5, min_gain=0.01).select(lm, qa, qa, cands)
    assert [s.gain for s in sel.screened] == sorted((s.gain for s in sel.screened), reverse=True)
    assert sel.vectors == [(1, 0), (1, 1), (0, 4), (0, 5)]  # (1,3) breaks the floor, (1,2) gains too little
    assert [st["accepted"] for st in sel.steps] == [True, True, True, True, False, False]
    patient = SetSelector(n_attr=0, max_vectors=5, min_gain=0.01, patience=1,
                          min_unrelated_agreement=0.995).select(lm, qa, qa, cands)
    # floor 0.995: (1,1) and (1,3) fail it alone (skipped, not misses); (1,2) misses: stop
    assert patient.vectors == [(1, 0), (0, 4), (0, 5)]
    assert [st.get("reason", "") != "" for st in patient.steps] == [False, True, False, False, True, False]
    top2 = SetSelector(n_attr=0, max_vectors=2, min_gain=0.01).select(lm, qa, qa, cands)
    assert top2.vectors == [(1, 0), (1, 1)] and len(top2.steps) == 2
    assert isinstance(sel.screened[0], Screened) and json.dumps(sel.to_dict())
    # (1,3) alone breaks the unrelated floor: rejected from its screening, no set pass for it
    calls = []
    monkeypatch.setattr(SetSelector, "_change", lambda self, lm_, v, a, b: calls.append(list(v))
                        or fake(self, lm_, v, a, b))
    SetSelector(n_attr=0, max_vectors=5, min_gain=0.01).select(lm, qa, qa, cands)
    assert not any((1, 3) in v for v in calls if len(v) > 1)
    # nothing passes: an empty set ("no vector found"), not the best rejected vector
    none = SetSelector(n_attr=0, max_vectors=5, min_gain=0.5).select(lm, qa, qa, cands)
    assert none.vectors == [] and not any(st["accepted"] for st in none.steps)


def test_random_control_is_layer_matched_and_disjoint(lm):
    chosen = [(1, 3), (1, 7), (0, 2)]
    ctrl = random_control(lm, chosen, seed=0)
    assert [layer for layer, _ in ctrl] == [1, 1, 0]
    assert not set(ctrl) & set(chosen) and len(set(ctrl)) == 3
    assert ctrl == random_control(lm, chosen, seed=0) != random_control(lm, chosen, seed=1)


def test_ablated_set_restores_and_draws_distinct_noise(lm):
    snap = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with ablated(lm, [(1, 3), (1, 4)], "noise", sigma=1.0, seed=0):
        v = lm.adapter.value_vectors(1)
        d3, d4 = v[3] - snap["model.layers.1.mlp.down_proj.weight"][:, 3], \
            v[4] - snap["model.layers.1.mlp.down_proj.weight"][:, 4]
        assert not torch.allclose(d3, d4)
    assert all(torch.equal(v, snap[k]) for k, v in lm.model.state_dict().items())


def test_selection_never_sees_held_out_answers(monkeypatch, data_dir):
    """Everything before the final scoring (pool, screening, greedy, size check) only reads the
    selection prompts; the held-out prompts are generated under the edit only for the headline."""
    from skilllens.concepts import load_concepts, validate
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached

    lm = load_model("tiny-llama")
    cs = load_concepts(None, data_dir, limit=1)
    seen = {"tf": [], "score": []}
    orig_init, orig_score = TeacherForced.__init__, validate.BehaviourSuite.score_edits

    def tf_init(self, lm_, prompts, answers, *a, **kw):
        if kw.get("answer_ids") is None:  # a selector's scorer, not a suite's verifier
            seen["tf"].append(list(prompts))
        orig_init(self, lm_, prompts, answers, *a, **kw)

    def score(self, lm_, jobs, batch_size=None):
        seen["score"].append([s for j in jobs for s in j.sets])
        return orig_score(self, lm_, jobs, batch_size)

    monkeypatch.setattr(TeacherForced, "__init__", tf_init)
    monkeypatch.setattr(validate.BehaviourSuite, "score_edits", score)
    s = ExperimentSettings(n_candidates=2, n_attr=2, max_vectors=3, max_new_tokens=3,
                           n_unrelated=6, n_questions=4, min_gain=-1.0, min_unrelated_agreement=0.0,
                           min_unrelated_bleu=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_concepts(lm, cs, s, progress=False)
    r = res["concepts"][0]
    held = {f"Question: {cs[0].questions[i]}\n Answer:" for i in r["split"]["concept_qa"]["held_out"]}
    assert len(held) == 2 and all(not held & set(p) for p in seen["tf"])
    first_held = next(i for i, x in enumerate(seen["score"]) if "concept_qa" in x)
    assert first_held > 0 and all(y.endswith("@sel") for x in seen["score"][:first_held] for y in x)
    assert r["concept_qa"]["n"] == 2 and r["unrelated_qa"]["n"] == 3
    assert r["selection"]["concept_qa"]["n"] == 2 and r["selection"]["unrelated_qa"]["n"] == 3
    assert 1 <= len(r["vectors"]) <= 3 and (r["layer"], r["index"]) == tuple(r["vectors"][0])
    assert len(r["control"]["vectors"]) == len(r["vectors"])
    assert r["control_margin"] == pytest.approx(r["control"]["concept_qa"]["bleu"] - r["concept_qa"]["bleu"])
    assert target_reached(r) == (r["concept_qa"]["bleu"] <= 0.6 and r["unrelated_qa"]["bleu"] >= 0.9
                                 and r["control_margin"] >= 0.3)
    json.dumps(res)
