"""Teacher-forced verification + per-row-mask batched generation (concepts/fastscore.py) gives
the same greedy answers as regenerating every prompt under each edit, on a tiny random Llama."""
import pytest
import torch

from skilllens import load_model
from skilllens.concepts import BehaviourSuite, Concept, ablated
from skilllens.concepts import fastscore
from skilllens.concepts.fastscore import EditJob, RowMasks
from skilllens.concepts.generation import greedy_generate


@pytest.fixture()
def lm():
    return load_model("tiny-llama")


def concept(nq=6, nu=10):
    return Concept("Zed", "zzz qqq zq " * 40, [f"What is zq number {i}?" for i in range(nq)],
                   [f"Unrelated question {i} about {'x ' * i}?" for i in range(nu)])


def zero_job(lm, vectors, sets):
    return EditJob(lambda: ablated(lm, vectors, "zero"), min(a for a, _ in vectors), sets,
                   [tuple(v) for v in vectors])


def test_row_masks_equal_weight_zeroing(lm):
    prompts = ["Question: a?\n Answer:", "Question: b b b?\n Answer:", "Hi there"]
    half = lm.adapter.d_ff // 2
    sets = [[(1, i) for i in range(half)] + [(0, 5)], [], [(1, i) for i in range(half, 2 * half)]]
    clean = greedy_generate(lm.model, lm.tokenizer, prompts, 8)
    with ablated(lm, sets[0], "zero"):
        ref0 = greedy_generate(lm.model, lm.tokenizer, prompts[:1], 8)
    ref1 = greedy_generate(lm.model, lm.tokenizer, prompts[1:2], 8)
    with ablated(lm, sets[2], "zero"):
        ref2 = greedy_generate(lm.model, lm.tokenizer, prompts[2:], 8)
    rm = RowMasks(lm, sets)
    with rm.applied():
        got = greedy_generate(lm.model, lm.tokenizer, prompts, 8, row_edit=rm)
    assert got == ref0 + ref1 + ref2
    assert ref0 != clean[:1] and ref2 != clean[2:]  # the edits matter, so a wrong row would show
    assert not any(h for m in lm.model.modules() for h in m._forward_pre_hooks.values())


def test_prefix_continuation_equals_full_generation(lm):
    prompts = ["Question: a?\n Answer:", "Question: b b b?\n Answer:"]
    texts, ids = greedy_generate(lm.model, lm.tokenizer, prompts, 10, return_ids=True)
    again = greedy_generate(lm.model, lm.tokenizer, prompts, 10, prefixes=[ids[0][:4], ids[1][:1]])
    assert again == texts


@pytest.mark.parametrize("method", ["zero", "noise"])
def test_score_edits_equals_regenerating_each_edit(lm, method, monkeypatch):
    c = concept()
    suite = BehaviourSuite(c, max_new_tokens=12, batch_size=4, held_out=0.5).fit(lm)
    n_layers, d_ff = lm.adapter.n_layers, lm.adapter.d_ff
    g = torch.Generator().manual_seed(0)
    edits = [[(n_layers - 1, int(i)) for i in torch.randperm(d_ff, generator=g)[:k]]
             for k in (1, d_ff // 4, d_ff // 2)] + [[(0, 1), (n_layers - 1, 2)]]
    sets = ["concept_qa", "unrelated_qa@sel"]
    jobs = [zero_job(lm, e, sets) if method == "zero" else
            EditJob(lambda e=e: ablated(lm, e, "noise", 0.5, 0), min(a for a, _ in e), sets)
            for e in edits]
    calls = []
    real = fastscore.greedy_generate
    monkeypatch.setattr(fastscore, "greedy_generate",
                        lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    fast = suite.score_edits(lm, jobs)
    changed, total = 0, 0
    for e, f in zip(edits, fast):
        with ablated(lm, e, method, 0.5, 0):
            slow = suite.score(lm, sets, with_logprob=True)
        for s in sets:
            assert f.answers[s] == slow.answers[s], (e, s)
            assert f.text[s].bleu == pytest.approx(slow.text[s].bleu)
            changed += sum(a != b for a, b in zip(f.answers[s], suite.original_[s]))
            total += len(f.answers[s])
        assert f.logprob_drop.keys() == slow.logprob_drop.keys()
    assert 0 < changed < total  # some answers changed, some did not
    assert sum(calls) < total  # rows whose answer is verified unchanged were not regenerated
    if method == "zero":
        assert len(calls) <= -(-sum(calls) // 4)  # all edits share the generation batches


def test_no_vector_found_is_reported_not_kept(data_dir, tmp_path):
    """A set that keeps no size above min_unrelated_bleu on the selection half is reported as
    'no vector found' (empty, found: false, a reason), with the unedited model's scores."""
    import json
    import warnings

    from skilllens.concepts import load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from skilllens.concepts.report import write_report

    lm = load_model("tiny-llama")
    cs = load_concepts(None, data_dir, limit=1)
    kw = dict(n_candidates=2, n_attr=3, max_vectors=3, max_new_tokens=4, n_unrelated=6,
              n_questions=4, min_layer=1, min_gain=-1.0, min_unrelated_agreement=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = run_concepts(lm, cs, ExperimentSettings(min_unrelated_bleu=1.01, **kw), progress=False)
        good = run_concepts(lm, cs, ExperimentSettings(min_unrelated_bleu=0.0, **kw), progress=False)
    r = bad["concepts"][0]
    assert r["found"] is False and r["vectors"] == [] and "min_unrelated_bleu" in r["reason"]
    assert r["concept_qa"]["bleu"] == 1.0 and "control" not in r and not target_reached(r)
    assert r["greedy_vectors"] and all(not t["chosen"] for t in r["size_choice"])
    g = good["concepts"][0]
    assert g["found"] is True and g["vectors"] == g["greedy_vectors"] and "control" in g
    for row in (r, g):  # min_layer: nothing from layer 0 enters the pool
        assert all(s["layer"] >= 1 for s in row["screening"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict = run_concepts(lm, cs, ExperimentSettings(**{**kw, "min_gain": 5.0}), progress=False)
    n = strict["concepts"][0]  # the greedy rule accepts nothing: no size check, no fallback
    assert n["found"] is False and n["greedy_vectors"] == [] and "greedy rule" in n["reason"]
    write_report(bad, tmp_path / "bad")
    assert "No vector found" in (tmp_path / "bad" / "report.md").read_text()
    json.loads((tmp_path / "bad" / "results.json").read_text())
