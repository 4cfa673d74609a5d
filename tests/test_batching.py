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
def smol_tok():
    """The SmolLM2 tokenizer alone (a few seconds once the model cache exists)."""
    from transformers import AutoTokenizer

    from skilllens.core.models import _gguf_cached, find_smollm2_gguf
    try:
        return AutoTokenizer.from_pretrained(str(_gguf_cached(find_smollm2_gguf())))
    except Exception as e:  # the embedded model package is not installed
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


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
