"""Evaluation harness: teacher-forced numerics vs float64 references, abstention, generation."""
import math
import random

import pytest
import torch

import skilllens
import skilllens.eval.evaluation as ev
import skilllens.eval.generation as gen
from skilllens.data import Item, Skill, load_skill, sample_skill
from skilllens.errors import DataError, SkillLensError
from skilllens.eval import (SkillScore, evaluate, fewshot_prefix, generate_texts, relative,
                            teacher_forced)
from skilllens.core.hooks import Hook, hooks_applied


@pytest.fixture(scope="module")
def lm64():
    lm = skilllens.load_model("tiny-llama")
    lm.model.double()
    return lm


def _items(n=7, seed=0):
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefgh xyz") for _ in range(k))  # noqa: E731
    return [Item(f"r/{i}", word(rng.randint(3, 30)), word(rng.randint(1, 12))) for i in range(n)]


def _reference(lm, item):
    """Unbatched float64 reference: per-item token accuracy and mean NLL of the answer."""
    tok = lm.tokenizer
    p = tok(item.prompt)["input_ids"]
    a = tok(item.answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    accs, nlls = [], []
    for j in range(len(a)):
        pos = len(p) - 1 + j
        accs.append(float(logits[pos].argmax() == a[j]))
        nlls.append(-float(logp[pos, a[j]]))
    return sum(accs) / len(accs), sum(nlls) / len(nlls), len(a)


def test_teacher_forced_matches_float64_reference_batched(lm64):
    items = _items()
    for bs in (1, 3, 8):
        res = evaluate(lm64, Skill("r", items), batch_size=bs, progress=False)
        for it, row in zip(items, res.per_item):
            acc, nll, n = _reference(lm64, it)
            assert row["id"] == it.id and row["n_tokens"] == n
            assert row["accuracy"] == pytest.approx(acc, abs=1e-12)
            assert row["nll"] == pytest.approx(nll, rel=1e-9)
    # averaged per item, then over items (not pooled over tokens)
    assert res.score == pytest.approx(sum(r["accuracy"] for r in res.per_item) / len(items))
    assert res.nll == pytest.approx(sum(r["nll"] for r in res.per_item) / len(items))
    pooled = sum(r["nll"] * r["n_tokens"] for r in res.per_item) / \
        sum(r["n_tokens"] for r in res.per_item)
    assert abs(pooled - res.nll) > 1e-6
    assert res.metric == "token_accuracy" and res.n_items == 7 and res.n_abstained == 0


def test_float32_agrees_with_float64(tiny_llama, lm64):
    items = _items(5, seed=1)
    r32 = evaluate(tiny_llama, items, "nll", batch_size=2, progress=False)
    r64 = evaluate(lm64, items, "nll", batch_size=5, progress=False)
    assert r32.score == pytest.approx(r64.score, rel=1e-5) and r32.score == r32.nll
    assert r32.nll > 0.5  # a random model is far from perfect: the check is not vacuous


def test_logits_subset_path_equals_full_logits(lm64, monkeypatch):
    items = _items(6, seed=2)
    assert ev._accepts_logits_to_keep(lm64.model)
    fast = teacher_forced(lm64, items, batch_size=3, progress=False)
    monkeypatch.setattr(ev, "_accepts_logits_to_keep", lambda model: False)
    slow = teacher_forced(lm64, items, batch_size=3, progress=False)
    for a, b in zip(fast, slow):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-10) and a["accuracy"] == b["accuracy"]


def test_items_without_answer_are_scored_on_their_text(lm64):
    res = evaluate(lm64, ["hello world", "abc"], progress=False)
    assert [r["n_tokens"] for r in res.per_item] == [10, 2]
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        evaluate(lm64, ["a"], progress=False)


class _Abstainer:
    def __init__(self, ids):
        self.ids, self.calls = set(ids), 0

    def abstains(self, lm, items):
        self.calls += 1
        return torch.tensor([it.id in self.ids for it in items])


def test_abstained_items_score_zero_and_are_not_run(lm64):
    items = _items(6, seed=3)
    seen_rows = []
    hook = Hook("gate", 0, lambda a: seen_rows.append(a.shape[0]))
    with hooks_applied(lm64, [hook]):
        res = evaluate(lm64, items, abstainer=_Abstainer({"r/1", "r/4"}), batch_size=8,
                       progress=False)
    assert sum(seen_rows) == 4  # only the 4 answered items went through the model
    full = evaluate(lm64, items, progress=False)
    assert res.n_abstained == 2
    penalty = math.log(lm64.model.get_output_embeddings().weight.shape[0])  # uniform: log V
    assert res.abstain_nll == pytest.approx(penalty) and penalty == pytest.approx(math.log(259))
    for r, f in zip(res.per_item, full.per_item):
        if r["id"] in ("r/1", "r/4"):
            assert r["abstained"] and r["score"] == 0.0 and r["nll"] == pytest.approx(penalty)
        else:
            assert not r["abstained"] and r["accuracy"] == pytest.approx(f["accuracy"])
    assert res.accuracy == pytest.approx(sum(r["accuracy"] for r in res.per_item) / 6)
    answered = [f["nll"] for f in full.per_item if f["id"] not in ("r/1", "r/4")]
    # defect 11: abstained items count in the NLL mean (they used to vanish from it)
    assert res.nll == pytest.approx((sum(answered) + 2 * penalty) / 6)
    assert res.nll_answered == pytest.approx(sum(answered) / 4)
    nll_res = evaluate(lm64, items, "nll", abstainer=_Abstainer({"r/1", "r/4"}), progress=False)
    assert nll_res.score == pytest.approx(res.nll) and not nll_res.higher_is_better
    assert "per_item" not in res.to_dict(per_item=False)
    everyone = evaluate(lm64, items, abstainer=_Abstainer({i.id for i in items}), progress=False)
    assert everyone.score == 0.0 and everyone.nll == pytest.approx(penalty)
    assert math.isnan(everyone.nll_answered)


def test_bad_abstainer_output_is_an_error(lm64):
    class Bad:
        def abstains(self, lm, items):
            return torch.zeros(len(items) + 1, dtype=torch.bool)
    with pytest.raises(SkillLensError, match="BoolTensor"):
        evaluate(lm64, _items(3), abstainer=Bad(), progress=False)


def test_interventions_are_active_inside_applied_blocks(lm64):
    items = _items(4, seed=4)
    before = evaluate(lm64, items, "nll", progress=False).score
    with hooks_applied(lm64, [Hook("key", 1, lambda a: a * 0 + 3.0)]):
        edited = evaluate(lm64, items, "nll", progress=False).score
    assert abs(edited - before) > 1e-3
    assert evaluate(lm64, items, "nll", progress=False).score == pytest.approx(before, rel=1e-12)


def test_left_padded_batch_generation_equals_one_by_one(tiny_llama):
    prompts = ["a", "hello there, general", "xyz xyz", "the quick brown fox jumps"]
    batched = generate_texts(tiny_llama, prompts, max_new_tokens=6, batch_size=4, progress=False)
    single = [generate_texts(tiny_llama, [p], max_new_tokens=6, progress=False)[0]
              for p in prompts]
    assert batched == single and all(batched)
    assert tiny_llama.tokenizer.padding_side == "right"  # the tokenizer is left unchanged


def test_stop_strings_cut_and_stop_generation(tiny_llama):
    free = generate_texts(tiny_llama, ["abc"], max_new_tokens=12, progress=False)[0]
    stop = free[3:5]
    cut = generate_texts(tiny_llama, ["abc"], max_new_tokens=12, stops=[stop], progress=False)[0]
    assert free.startswith(cut) and stop not in cut and len(cut) <= free.find(stop)
    assert gen.cut_at_stops("ab\ndef c", ev.CODE_STOPS) == "ab"
    assert gen.cut_at_stops("\n\n Denver\nQuestion", ev.QA_STOPS) == "\n\n Denver"
    assert gen.cut_at_stops("    return 1\n\ndef g", ev.CODE_STOPS) == "    return 1\n"


def _patch_generation(monkeypatch, fn):
    seen = []

    def fake(model, tokenizer, prompts, **kw):
        seen.append((list(prompts), kw))
        return gen.Generation([fn(p) for p in prompts], [[] for _ in prompts],
                              [False] * len(prompts), 1)
    monkeypatch.setattr(ev, "generate_batched", fake)
    return seen


def test_pass_at_1_runs_tests_in_the_sandbox(tiny_llama, data_dir, monkeypatch):
    sk = load_skill("humaneval", data_dir, "all")
    by_prompt = {it.prompt: it for it in sk}
    items = [it for it in sk if it.id in ("HumanEval/0", "HumanEval/2", "HumanEval/4",
                                          "HumanEval/7")]
    wrong = {"HumanEval/2": "    while True:\n        pass\n", "HumanEval/4": "    return 0\n"}
    _patch_generation(monkeypatch, lambda p: wrong.get(by_prompt[p].id, by_prompt[p].answer))
    res = evaluate(tiny_llama, Skill("humaneval", items, family="humaneval"), "pass@1",
                   progress=False, sandbox_timeout=3)
    got = {r["id"]: r["score"] for r in res.per_item}
    assert got == {"HumanEval/0": 1.0, "HumanEval/2": 0.0, "HumanEval/4": 0.0, "HumanEval/7": 1.0}
    assert res.score == 0.5 and math.isnan(res.nll)
    assert next(r for r in res.per_item if r["id"] == "HumanEval/2")["reason"] == "timed out"


def test_gsm8k_exact_match_is_k_shot_from_the_probe_part(tiny_llama, data_dir, monkeypatch):
    evals = sample_skill(load_skill("gsm8k", data_dir, "eval"), 4, seed=1)
    good = {evals.items[0].prompt, evals.items[3].prompt}

    def answer(p):
        it = next(it for it in evals if p.endswith(it.prompt))
        if it.prompt in good:
            return f" 2 + 2 = 4 apples. The answer is {it.meta['final']}."
        return f" {it.meta['final']} apples, then 7 #### 7{it.meta['final']}"
    seen = _patch_generation(monkeypatch, answer)
    res = evaluate(tiny_llama, evals, "exact_match", n_shots=3, progress=False)
    assert [r["score"] for r in res.per_item] == [1.0, 0.0, 0.0, 1.0] and res.score == 0.5
    train = {it.prompt for it in load_skill("gsm8k", data_dir, "probe")}
    for p, it in zip(seen[0][0], evals):
        shots = p[: -len(it.prompt)].split("\n\n")[:-1]
        assert len(shots) == 3 and all("<<" not in s and "####" in s for s in shots)
        assert all(s.split("\nAnswer:")[0] + "\nAnswer:" in train for s in shots)
    assert seen[0][1]["stops"] == ev.GSM8K_STOPS and seen[0][1]["max_new_tokens"] == 256
    with pytest.raises(DataError, match="overlap"):
        evaluate(tiny_llama, evals, "exact_match", shots=evals, progress=False)


def test_qa_substring_and_f1(tiny_llama, data_dir, monkeypatch):
    evals = sample_skill(load_skill("xquad-en", data_dir, "eval"), 4, seed=2)
    gold = {it.prompt: it.meta["answers"][0] for it in evals}
    seen = _patch_generation(monkeypatch, lambda p: f" It was {gold[p]}, surely" if
                             len(gold[p]) % 2 else " nothing")
    sub = evaluate(tiny_llama, evals, "substring", progress=False)
    f1 = evaluate(tiny_llama, evals, "f1", progress=False)
    hits = [float(len(gold[it.prompt]) % 2 == 1) for it in evals]
    assert [r["score"] for r in sub.per_item] == hits
    for r, h in zip(f1.per_item, hits):
        assert (0 < r["score"] < 1) if h else r["score"] == 0.0, r
    assert seen[0][1]["max_new_tokens"] == 24 and seen[0][1]["stops"] == ("\n",)


def test_metric_errors(tiny_llama, data_dir):
    with pytest.raises(SkillLensError, match="unknown metric"):
        evaluate(tiny_llama, _items(2), "bleu")
    with pytest.raises(DataError, match="pass@1 needs code"):
        evaluate(tiny_llama, load_skill("xquad-en", data_dir, "eval").head(2), "pass@1")
    with pytest.raises(DataError, match="question answering"):
        evaluate(tiny_llama, _items(2), "f1")
    with pytest.raises(SkillLensError, match="causal"):
        evaluate(skilllens.load_model("tiny-bert"), _items(2))


def test_relative():
    assert relative(0.3, 0.6) == pytest.approx(0.5)
    assert math.isnan(relative(0.3, 0.0)) and math.isnan(relative(0.0, 0.0))  # issue 21 item 5
    assert math.isnan(relative(float("nan"), 0.5)) and math.isnan(relative(0.5, None))
    # defect 11: for lower-is-better NLL, forgetting (NLL 1 -> 2) must read as < 1 (worse)
    assert relative(2.0, 1.0, "nll") == pytest.approx(0.5)
    assert relative(1.0, 2.0, "nll") == pytest.approx(2.0)
    assert math.isnan(relative(0.0, 0.0, "nll")) and relative(0.0, 1.0, "nll") == float("inf")
    assert relative(0.2, 0.4, "exact_match") == pytest.approx(0.5)
    with pytest.raises(SkillLensError, match="unknown metric"):
        relative(1.0, 1.0, "bleu")


def test_truncated_items_are_counted_and_fitting_prompts_kept(lm64):
    """Defect 3: items longer than max_length are counted; a prompt that fits is not cut."""
    items = [Item("long", "p" * 20, "a" * 30), Item("fit", "q" * 5, "b" * 5),
             Item("doc", "z" * 40)]
    res = evaluate(lm64, items, max_length=24, progress=False)
    assert res.n_truncated == 2
    assert [r["truncated"] for r in res.per_item] == [True, False, True]
    assert res.per_item[0]["n_tokens"] == 4  # the 20-token prompt is kept whole, 4 answer tokens
    assert res.to_dict(per_item=False)["n_truncated"] == 2
    gen = evaluate(lm64, [Item("g", "w" * 50, "x", meta={"answers": ["x"]})], "substring",
                   max_length=20, max_new_tokens=4, progress=False)
    assert gen.n_truncated == 1 and gen.per_item[0]["truncated"]


def test_generation_batches_are_length_sorted_and_returned_in_order(tiny_llama, monkeypatch):
    prompts = ["a", "the quick brown fox jumps", "xyz", "hello there, general", "ab"]
    widths = []
    orig = gen._greedy_batch

    def spy(model, tok, seqs, *a):
        T = max(len(s) for s in seqs)
        widths.append(((len(seqs), T), sum(T - len(s) for s in seqs)))
        return orig(model, tok, seqs, *a)
    monkeypatch.setattr(gen, "_greedy_batch", spy)
    batched = generate_texts(tiny_llama, prompts, max_new_tokens=4, batch_size=2, progress=False)
    monkeypatch.undo()
    single = [generate_texts(tiny_llama, [p], max_new_tokens=4, progress=False)[0]
              for p in prompts]
    assert batched == single
    lens = sorted((len(p) for p in prompts), reverse=True)  # byte tokenizer: 1 token per char
    assert [w[0][1] for w in widths] == [lens[0], lens[2], lens[4]]
    assert sum(w[1] for w in widths) == (lens[0] - lens[1]) + (lens[2] - lens[3])


def test_fewshot_prefix_strips_calculator_annotations():
    shot = Item("s", "Question: q\nAnswer:", " 2*3=<<2*3=6>>6\n#### 6")
    assert fewshot_prefix([shot]) == "Question: q\nAnswer: 2*3=6\n#### 6\n\n"


def test_skill_score_is_plain_json(tmp_path):
    from skilllens.io import write_json
    s = SkillScore("x", "token_accuracy", 0.5, 0.5, float("nan"), 2, 0, [{"id": "a"}])
    write_json(tmp_path / "s.json", s.to_dict())
    assert '"nll": null' in (tmp_path / "s.json").read_text()


@pytest.mark.slow
def test_smollm2_token_accuracy_in_reported_range(smollm2, data_dir):
    for name in ("humaneval", "xquad-en"):
        # 40 items measure 0.50 (xquad-en) and 0.69 (humaneval); 12 items vary by ~0.1
        sk = sample_skill(load_skill(name, data_dir, "eval"), 12, seed=0)
        res = evaluate(smollm2, sk, batch_size=6, progress=False)
        assert 0.3 <= res.score <= 0.95, (name, res.score)
        assert 0.05 < res.nll < 5


def test_ksd_generate_is_batched_and_keeps_prompt_order(tiny_llama, monkeypatch):
    """KSD's generation goes through the same length-sorted batches (one generate call for
    up to 8 kept prompts, not one per prompt); refusals and answers stay in prompt order."""
    from skilllens.unlearning.key_space import KeySpaceDetector
    prompts = ["a", "the quick brown fox", "xyz", "hello there, general", "ab"]
    ksd = KeySpaceDetector()
    monkeypatch.setattr(ksd, "abstains", lambda lm, items: torch.tensor(
        [it.prompt == "xyz" for it in items]))
    calls = []
    orig = gen._greedy_batch
    monkeypatch.setattr(gen, "_greedy_batch", lambda *a: calls.append(1) or orig(*a))
    out = ksd.generate(tiny_llama, prompts, max_new_tokens=4, refusal="NO")
    monkeypatch.undo()
    single = [generate_texts(tiny_llama, [p], max_new_tokens=4, progress=False)[0]
              for p in prompts]
    assert len(calls) == 1
    assert out == [s if p != "xyz" else "NO" for p, s in zip(prompts, single)]


def test_greedy_generate_equals_transformers_generate(tiny_llama):
    """The one generation loop (KV cache, left padding, rows leaving the batch) decodes exactly
    what ``model.generate(do_sample=False)`` decodes, one prompt at a time; it passes the cache
    under the name the installed transformers takes (no deprecated ``past_key_values``)."""
    import warnings

    from transformers import GenerationConfig
    prompts = ["a", "the quick brown fox jumps", "xyz", "hello there, general", "ab"]
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    eos = sorted(gen.eos_ids(model, tok))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = gen.greedy_generate(model, tok, prompts, max_new_tokens=9, batch_size=3)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    for p, got in zip(prompts, ours):
        ids = torch.tensor([tok(p)["input_ids"]])
        cfg = GenerationConfig(max_new_tokens=9, do_sample=False, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=cfg)[0, ids.shape[1]:]
        assert got == tok.decode(ref, skip_special_tokens=True)


def test_greedy_generate_continues_prefixes_and_tells_row_edits_the_live_rows(tiny_llama):
    """Continuing after the first k generated ids gives the same ids as generating from
    scratch; ``row_edit.set_rows`` always receives the prompt indices of the live rows."""
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    prompts = ["a", "the quick brown fox jumps", "xyz", "hello there, general"]
    texts, ids = gen.greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=4,
                                     return_ids=True)

    class Rows:
        seen: list = []

        def set_rows(self, idx):
            self.seen.append(list(idx))
    rows = Rows()
    again, ids2 = gen.greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=4,
                                      prefixes=[i[:3] for i in ids], row_edit=rows,
                                      return_ids=True)
    assert (again, ids2) == (texts, ids)
    assert sorted(rows.seen[0]) == [0, 1, 2, 3] and all(set(s) <= set(rows.seen[0])
                                                        for s in rows.seen)
    with pytest.raises(Exception, match="prefix"):
        gen.greedy_generate(model, tok, prompts, max_new_tokens=3, prefixes=[[1, 2, 3]] * 4)


def test_generation_truncation_count_comes_from_the_cut(tiny_llama, monkeypatch):
    """Issue 21.7: 435-token prompts on a ctx-256 model reported 0 truncated (a budget of
    max_length 512 - new tokens) although generation cut every prompt to 256 - 24 = 232."""
    items = [Item(f"g{i}", "w" * 435 + str(i), "x", meta={"answers": ["x"]}) for i in range(3)]
    items.append(Item("s", "short", "x", meta={"answers": ["x"]}))
    fed = []
    real = gen._greedy_batch
    monkeypatch.setattr(gen, "_greedy_batch",
                        lambda m, t, seqs, *a: fed.extend(map(len, seqs)) or real(m, t, seqs, *a))
    res = evaluate(tiny_llama, items, "substring", max_new_tokens=24, progress=False)
    assert sorted(fed) == [5, 232, 232, 232]
    assert res.n_truncated == 3 and [r["truncated"] for r in res.per_item] == [True] * 3 + [False]
    g = gen.generate_batched(tiny_llama.model, tiny_llama.tokenizer, [it.prompt for it in items],
                             max_new_tokens=24, max_length=512)
    assert g.truncated == [True] * 3 + [False] and g.budget == 232 and g.n_truncated == 3
