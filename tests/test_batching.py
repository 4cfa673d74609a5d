"""Tokenisation, truncation and length-sorted batching (skilllens.core.batching)."""
import random

import pytest
import torch

from skilllens.core.batching import (encode_items, encode_prompts, iter_batches, left_padded,
                                     padding_stats, plan_batches)
from skilllens.data import Item, load_skill
from skilllens.errors import DataError
from skilllens.core.tokenizers import byte_tokenizer


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


def _check_joint(items, tok, specials):
    enc = encode_items(items, tok, max_length=10 ** 6)
    n_straddle = 0
    for it, e in zip(items, enc):
        joint = list(tok(it.prompt + it.answer)["input_ids"])
        while joint and joint[-1] in specials and it.answer:
            joint.pop()
        assert e.ids == joint, it.id
        assert not e.truncated and e.index == items.index(it)
        answer = tok.decode(e.ids[e.prompt_len:])
        prompt = tok.decode(e.ids[:e.prompt_len], skip_special_tokens=True)
        # the answer span reproduces the answer, plus at most the prompt's tail that one
        # boundary-straddling token carries; prompt + answer span is the whole text
        assert answer.endswith(it.answer), (it.id, answer[:40], it.answer[:40])
        assert prompt + answer == it.prompt + it.answer
        if answer != it.answer:  # only the first answer token may carry prompt characters
            n_straddle += 1
            extra = answer[: len(answer) - len(it.answer)]
            assert it.prompt.endswith(extra)
            assert tok.decode(e.ids[e.prompt_len:e.prompt_len + 1]).startswith(extra)
            assert len(tok.decode(e.ids[e.prompt_len + 1:])) < len(it.answer)
    return n_straddle


@pytest.mark.parametrize("spec", ["humaneval", "gsm8k", "xquad-en"])
def test_answer_tokens_equal_the_joint_tokenisation(smol_tok, data_dir, spec):
    """Defect 4: prompt and answer were tokenised separately, so every HumanEval target was a
    token split ('\\n', '   ') the tokenizer never produces for the real text."""
    items = load_skill(spec, data_dir, part="eval").items
    items = random.Random(0).sample(items, min(120, len(items)))
    n_straddle = _check_joint(items, smol_tok, set(smol_tok.all_special_ids))
    if spec == "humaneval":  # prompt ends "\n", solution starts "    ": one token "\n   "
        assert n_straddle == len(items)


def test_straddling_token_belongs_to_the_answer(smol_tok):
    it = Item("f", "def f():\n", "    return 1\n")
    e = encode_items([it], smol_tok)[0]
    first = smol_tok.decode(e.ids[e.prompt_len:e.prompt_len + 1])
    assert first.startswith("\n") and first.strip() == ""  # '\n' + indentation: one token
    assert smol_tok.decode(e.ids[:e.prompt_len]) == "def f():"


class _SlowWrapper:
    """A tokenizer without offsets (like a slow/Python tokenizer)."""

    is_fast = False

    def __init__(self, tok):
        self.tok, self.all_special_ids = tok, tok.all_special_ids

    def __call__(self, texts, add_special_tokens=True, **kw):
        assert not kw.get("return_offsets_mapping")
        return self.tok(texts, add_special_tokens=add_special_tokens)


def test_slow_tokenizer_fallback_gives_joint_ids(smol_tok, data_dir):
    items = load_skill("humaneval", data_dir, part="eval").items[:20]
    slow = encode_items(items, _SlowWrapper(smol_tok), 10 ** 6)
    fast = encode_items(items, smol_tok, 10 ** 6)
    for it, s, f in zip(items, slow, fast):
        assert s.ids == f.ids
        assert s.prompt_len <= f.prompt_len  # conservative: never counts answer text as prompt
        assert smol_tok.decode(s.ids[s.prompt_len:]).endswith(it.answer)


def test_a_prompt_that_fits_is_never_cut(btok):
    """Defect 3: with a 12-token prompt, a 20-token answer and max_length 16 the old code kept
    8 answer tokens and cut the prompt's first 4 tokens."""
    it = Item("a", "P" * 12, "A" * 20)
    e = encode_items([it], btok, max_length=16)[0]
    assert e.truncated and len(e.ids) == 16
    assert e.prompt_len == 12 and btok.decode(e.ids[:12]) == "P" * 12
    assert btok.decode(e.ids[12:]) == "A" * 4
    short = encode_items([Item("b", "xyz", "A" * 20)], btok, max_length=16)[0]
    assert short.prompt_len == 3 and len(short.ids) == 16  # the answer fills the rest
    fits = encode_items([Item("c", "xyz", "abc")], btok, max_length=16)[0]
    assert not fits.truncated and len(fits.ids) == 6


def test_a_prompt_that_does_not_fit_keeps_its_end_and_the_answer_start(btok, smol_tok):
    it = Item("a", "".join(chr(97 + i % 26) for i in range(40)), "0123456789" * 3)
    e = encode_items([it], btok, max_length=16)[0]
    assert e.truncated and len(e.ids) == 16 and e.prompt_len == 8
    assert btok.decode(e.ids[:8]) == it.prompt[-8:]
    assert btok.decode(e.ids[8:]) == it.answer[:8]
    doc = encode_items([Item("d", it.prompt)], btok, max_length=10)[0]
    assert doc.truncated and btok.decode(doc.ids) == it.prompt[-10:] and doc.prompt_len == 10


def test_bos_is_kept_when_the_prompt_is_cut(btok):
    class WithBos(_SlowWrapper):
        is_fast = True

        def __call__(self, texts, add_special_tokens=True, **kw):
            enc = self.tok(texts, add_special_tokens=False, **kw)
            if add_special_tokens:
                bos = self.tok.bos_token_id
                enc["input_ids"] = [[bos] + ids for ids in enc["input_ids"]]
                if "offset_mapping" in enc:
                    enc["offset_mapping"] = [[(0, 0)] + o for o in enc["offset_mapping"]]
            return enc
    tok = WithBos(btok)
    e = encode_items([Item("a", "p" * 30, "a" * 30)], tok, max_length=12)[0]
    assert e.ids[0] == btok.bos_token_id and e.prompt_len == 6 and len(e.ids) == 12
    assert btok.decode(e.ids[1:6]) == "p" * 5 and btok.decode(e.ids[6:]) == "a" * 6
    ids, cut = encode_prompts(tok, ["x" * 30, "y"], budget=8)
    assert cut == [True, False]
    assert ids[0][0] == btok.bos_token_id and len(ids[0]) == 8
    assert btok.decode(ids[0][1:]) == "x" * 7


def test_empty_prompt_is_an_error(btok):
    with pytest.raises(DataError, match="empty prompt"):
        encode_items([Item("e", "", "abc")], btok)
    with pytest.raises(DataError, match="max_length"):
        encode_items([Item("e", "a", "b")], btok, max_length=1)


def test_plan_is_length_sorted_and_covers_every_item_once():
    g = random.Random(1)
    lengths = [g.randint(1, 300) for _ in range(101)]
    plan = plan_batches(lengths, 8)
    assert sorted(i for c in plan for i in c) == list(range(101))
    flat = [lengths[i] for c in plan for i in c]
    assert flat == sorted(flat, reverse=True)
    sorted_, naive = padding_stats(lengths, 8), padding_stats(lengths, 8, sort=False)
    assert sorted_["real"] == naive["real"] == sum(lengths)
    assert sorted_["computed"] == sum(len(c) * max(lengths[i] for i in c) for c in plan)
    assert sorted_["padded"] < naive["padded"]
    with pytest.raises(DataError, match="batch_size"):
        plan_batches(lengths, 0)


def test_batches_follow_the_plan_and_map_back(btok):
    items = [Item(str(i), "q" * (1 + (7 * i) % 13), "a" * (i % 4)) for i in range(11)]
    enc = encode_items(items, btok, 64)
    seen, computed = [], 0
    for b in iter_batches(enc, 4, 0):
        for r, idx in enumerate(b.index.tolist()):
            assert b.input_ids[r, : b.lengths[r]].tolist() == enc[idx].ids
            seen.append(idx)
        computed += b.n_computed
    assert sorted(seen) == list(range(11))
    assert computed == padding_stats([len(e.ids) for e in enc], 4)["computed"]
    ids, att = left_padded([[1, 2], [3], [4, 5, 6]], [2, 0, 1], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 1, 2], [0, 0, 3]]
    assert att.sum(1).tolist() == [3, 2, 1] and bool((ids[:, -1] != 0).all())
    assert torch.equal(att.bool(), ids != 0)


# -- one padding rule, one truncation rule, one context limit (issues 20 and 21) --

def _plain_lm(name="tiny-llama", tok=None):
    """A LoadedModel built without load_model (so nothing sets the tokenizer up for us)."""
    from skilllens.core.architectures import ModelAdapter
    from skilllens.core.loaded_model import LoadedModel
    from skilllens.core.models import _tiny
    model = _tiny(name).eval()
    return LoadedModel(model, tok if tok is not None else byte_tokenizer(), ModelAdapter(model),
                       name)


def _tok_state(tok):
    return {k: getattr(tok, k) for k in ("pad_token", "eos_token", "bos_token", "padding_side",
                                         "truncation_side", "model_max_length")}


def test_pad_id_rule_and_context_limit():
    from transformers import GPT2Config, LlamaConfig
    from skilllens.core.batching import clamp_length, context_limit, pad_id

    class Tok:
        pad_token_id, eos_token_id, model_max_length = None, None, 1000000000000000019884624838656
    t = Tok()
    assert pad_id(t) == 0
    t.eos_token_id = 7
    assert pad_id(t) == 7
    t.pad_token_id = 3
    assert pad_id(t) == 3

    class M:
        config = GPT2Config(n_positions=256)
    assert context_limit(M()) == 256 and clamp_length(512, M()) == 256
    M.config = LlamaConfig(max_position_embeddings=300)
    assert context_limit(M()) == 300 and clamp_length(100, M()) == 100

    class NoCtx:
        config = object()
    assert context_limit(NoCtx(), Tok()) is None  # the "no limit" placeholder is ignored
    Tok.model_max_length = 128
    assert context_limit(NoCtx(), Tok()) == 128 and clamp_length(512, NoCtx(), Tok()) == 128


def test_no_pad_and_no_eos_token_everywhere(btok):
    """Issue 20.3: with pad_token and eos_token None, collect and KeySpaceDetector.fit raised
    TypeError in iter_batches (torch.full with None). One rule: pad, else eos, else 0; results
    equal those with the tokenizer's own pad id; the caller's tokenizer is never changed."""
    from skilllens import collect, evaluate
    from skilllens.eval.generation import greedy_generate
    from skilllens.unlearning.key_space import KeySpaceDetector

    bare = byte_tokenizer()
    bare.pad_token, bare.eos_token, bare.padding_side = None, None, "left"
    before = _tok_state(bare)
    ref, lm = _plain_lm(), _plain_lm(tok=bare)
    texts = ["hello world", "skills live in neurons", "a", "1+1=2 and 2+2=4"]
    got = collect(lm, texts, sites=["gate"], layers=[0, 1], batch_size=2, progress=False)
    want = collect(ref, texts, sites=["gate"], layers=[0, 1], batch_size=2, progress=False)
    for k in want.keys():
        assert torch.allclose(got[k].mean, want[k].mean, atol=1e-10)
    ksd = KeySpaceDetector(layer=1, batch_size=3).fit(lm, texts, progress=False)
    assert torch.allclose(ksd.m_, KeySpaceDetector(layer=1, batch_size=3).fit(
        ref, texts, progress=False).m_, atol=1e-10)
    items = [Item(str(i), t[:3], t[3:] or "x") for i, t in enumerate(texts)]
    a = evaluate(lm, items, batch_size=2, progress=False)
    b = evaluate(ref, items, batch_size=2, progress=False)
    assert a.per_item == b.per_item
    g = greedy_generate(lm.model, bare, texts, 5, batch_size=3)
    assert g == greedy_generate(ref.model, ref.tokenizer, texts, 5, batch_size=3)
    assert _tok_state(bare) == before


def test_context_is_clamped_for_learned_and_rotary_positions(btok):
    """Issue 21.9: max_length 512 was not clamped to the model's context: a GPT-2 model with
    n_positions=256 and a 350-token item raised IndexError; a rotary model extrapolated."""
    from skilllens import collect, evaluate
    item = Item("long", "x" * 300, "y" * 50)
    for name in ("tiny-gpt2", "tiny-llama"):
        lm = _plain_lm(name)
        res = evaluate(lm, [item, Item("short", "ab", "c")], progress=False)
        assert res.n_truncated == 1 and [r["truncated"] for r in res.per_item] == [True, False]
        cut = evaluate(lm, [item, Item("short", "ab", "c")], max_length=256, progress=False)
        assert res.per_item == cut.per_item  # exactly what an explicit max_length=256 gives
        st = collect(lm, [item.prompt + item.answer, "abc"], sites=["key"], layers=[0],
                     progress=False)
        assert st.meta["max_length"] == 256 and st.meta["n_truncated"] == 1
        assert st.meta["n_tokens"] == 256 + 3
        from skilllens.grafting.tasks import encode_task_items
        data = encode_task_items([item], lm.tokenizer, "generation", max_length=512,
                                 model=lm.model)
        assert data.input_ids.shape == (1, 256)


def test_merged_boundary_token_is_scored_and_counted(smol_tok):
    """Issue 20.6: SmolLM2 (no BOS) tokenises Item("a", "Ans", "wer") as one token "Answer";
    the whole collect(tokens="all") and evaluate aborted with "empty prompt". Now: plain text
    for tokens="all"; teacher forcing tokenises the two sides apart for that item only, counts
    it (n_merged_boundary) and scores it like a float64 reference of that split."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from skilllens import collect, evaluate
    from skilllens.core.architectures import ModelAdapter
    from skilllens.core.loaded_model import LoadedModel

    merged, plain = Item("a", "Ans", "wer"), Item("b", "Question: 2+2=", " 4")
    assert len(smol_tok("Answer")["input_ids"]) == 1
    e = encode_items([merged, plain], smol_tok)
    assert e[0].merged and not e[1].merged
    assert smol_tok.decode(e[0].ids[:e[0].prompt_len]) == "Ans"
    assert smol_tok.decode(e[0].ids[e[0].prompt_len:]) == "wer"
    whole = encode_items([merged], smol_tok, split=False)[0]  # plain text: the joint tokens
    assert whole.ids == smol_tok("Answer")["input_ids"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    lm = LoadedModel(model, smol_tok, ModelAdapter(model), "tiny-smol")
    res = evaluate(lm, [merged, plain], progress=False)
    assert res.n_merged_boundary == 1 and res.per_item[0]["merged_boundary"]
    ids = torch.tensor([e[0].ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(input_ids=ids).logits[0], -1)
    model.float()
    p = e[0].prompt_len
    ref = -sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1])) / (ids.shape[1] - p)
    assert res.per_item[0]["nll"] == pytest.approx(float(ref), rel=1e-5)
    st = collect(lm, [merged, plain], sites=["key"], layers=[0], progress=False)
    text = collect(lm, ["Answer", "Question: 2+2= 4"], sites=["key"], layers=[0], progress=False)
    assert torch.allclose(st["key", 0].mean, text["key", 0].mean, atol=1e-10)
    with pytest.raises(DataError, match="empty prompt"):
        encode_items([Item("e", "", "abc")], smol_tok)


def test_one_truncation_rule_for_generation_and_verification():
    """Issue 21.6: the concept verifier kept the last 1,024 tokens (dropping BOS) while
    generation cut prompts to ctx - max_new_tokens keeping BOS; 700-token prompts on a ctx-256
    model then gave answers that differ between score_edits and regeneration."""
    from skilllens.concepts import BehaviourSuite, Concept, ablated
    from skilllens.concepts.fastscore import EditJob
    from skilllens.core.batching import generation_prompts

    lm = _plain_lm()
    c = Concept("Zed", "zzz qqq zq " * 62, [f"What is zq number {i}?" for i in range(6)],
                [f"Unrelated question {i}?" for i in range(4)])
    suite = BehaviourSuite(c, max_new_tokens=12, batch_size=4, held_out=None,
                           probes=("in_context",)).fit(lm)
    prompts = suite.prompts["in_context"]
    assert min(len(lm.tokenizer(p)["input_ids"]) for p in prompts) > 700
    tf = suite.verifiers_["in_context"]
    ids, cut, budget = generation_prompts(lm.model, lm.tokenizer, prompts, 12)
    assert all(cut) and budget == 256 - 12
    for s, p, a in zip(tf.seqs, ids, suite.original_ids_["in_context"]):
        assert s == p + a  # the verifier scores exactly what generation saw
    d_ff, g = lm.adapter.d_ff, torch.Generator().manual_seed(0)
    edits = [[(1, int(i)) for i in torch.randperm(d_ff, generator=g)[:k]]
             for k in (1, d_ff // 4, d_ff // 2)] + [[(0, 1), (1, 2)]]
    jobs = [EditJob(lambda e=e: ablated(lm, e, "zero"), min(a for a, _ in e), ["in_context"],
                    [tuple(v) for v in e]) for e in edits]
    for e, f in zip(edits, suite.score_edits(lm, jobs)):
        with ablated(lm, e, "zero"):
            slow = suite.score(lm, ["in_context"], with_logprob=False)
        assert f.answers["in_context"] == slow.answers["in_context"], e
