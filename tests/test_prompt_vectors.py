"""collect(tokens="all", store_tokens="last"): statistics over whole items and, from the same
pass, each item's last-prompt-token vector exactly as a prompt-only pass gives it."""
import pytest
import torch

import skilllens
from skilllens.core.batching import encode_items
from skilllens.core.hooks import Hook, run_with_hooks
from skilllens.core.prompt_vectors import mismatched_prompts, prompt_items
from skilllens.data import Item, Skill
from skilllens.errors import DataError

TEXTS = ["the cat sat on the mat", "skills live in neurons", "3 times 4 is 12, says the model",
         "hello world, and a longer answer follows here", "padding must never be counted"]


def _items():
    items = [Item(f"i{k}", t[: len(t) // 2], t[len(t) // 2:]) for k, t in enumerate(TEXTS)]
    items.append(Item("merged", "Ans", "wer"))            # one token straddles the join
    items.append(Item("split-word", "neur", "ons fire"))   # the prompt's end re-tokenised
    items.append(Item("long", " ".join(["word"] * 40), " and the answer"))  # prompt is cut
    items.append(Item("text", "no answer at all"))        # plain text: the whole item
    return items


def _prompt_only_float64(lm, items, site, layer, max_length):
    """float64 reference: one unpadded prompt-only forward per item, last position."""
    rows = []
    for e in encode_items(prompt_items(items), lm.tokenizer, max_length):
        seen = {}
        with torch.no_grad():
            run_with_hooks(lm, {"input_ids": torch.tensor([e.ids])},
                           [Hook(site, layer, lambda x: seen.setdefault("a", x))])
        rows.append(seen["a"][0, -1].double())
    return torch.stack(rows)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-smol"])
def test_store_last_equals_prompt_only_pass(model, request):
    lm = request.getfixturevalue("tiny_llama") if model == "tiny-llama" else \
        request.getfixturevalue("tiny_smol")
    items, L, n = _items(), 1, 24
    res = skilllens.collect(lm, Skill("s", items), sites=["gate", "key"], layers=[0, L],
                            tokens="all", batch_size=3, max_length=n, progress=False,
                            store=[("key", L), ("gate", 0)], store_tokens="last")
    alone = skilllens.collect(lm, prompt_items(items), sites=["key", "gate"],
                              layers=[0, L], tokens="last", batch_size=3, max_length=n,
                              progress=False, store=[("key", L), ("gate", 0)])
    plain = skilllens.collect(lm, Skill("s", items), sites=["gate", "key"],
                              layers=[0, L], tokens="all", batch_size=3, max_length=n,
                              progress=False)
    assert res.vector_items.tolist() == list(range(len(items)))
    for k in [("key", L), ("gate", 0)]:
        assert res.vectors[k].shape == (len(items), lm.adapter.d_ff)
        torch.testing.assert_close(res.vectors[k], alone.vectors[k], rtol=1e-5, atol=1e-6)
    ref = _prompt_only_float64(lm, items, "key", L, n)
    torch.testing.assert_close(res.vectors[("key", L)].double(), ref, rtol=1e-4, atol=1e-5)
    # the statistics are those of the plain tokens="all" pass
    for k in plain.keys():
        torch.testing.assert_close(res[k].mean, plain[k].mean)
        assert int(res[k].count.sum()) == int(plain[k].count.sum())
    # the exceptions were found and took a prompt-only pass; the others came from this pass
    bad = mismatched_prompts(encode_items(items, lm.tokenizer, n, split=False), items,
                             lm.tokenizer, n)
    ids = [items[i].id for i in bad]
    assert "long" in ids and "text" not in ids and "i0" not in ids
    if model == "tiny-smol":  # "Answer" is one SmolLM2 token: the joint ids never hold "Ans"
        assert "merged" in ids
    assert res.meta["n_store_prompt_passes"] == len(bad) < len(items)


def test_store_tokens_checked(tiny_llama):
    with pytest.raises(DataError, match="store_tokens"):
        skilllens.collect(tiny_llama, ["a b c"], sites=["key"], tokens="last", store=True,
                          store_tokens="all", progress=False)
    with pytest.raises(DataError, match="unknown store_tokens"):
        skilllens.collect(tiny_llama, ["a b c"], sites=["key"], store=True,
                          store_tokens="first", progress=False)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-smol"])
def test_recorder_during_evaluation_equals_ksd_queries(model, request):
    """PromptVectorRecorder reads KSD's queries inside a teacher-forced evaluation: the vectors
    equal KeySpaceDetector.query_vectors and the scores are the evaluation's without it."""
    from skilllens.core.prompt_recorder import PromptVectorRecorder
    from skilllens.eval import evaluate
    from skilllens.unlearning.key_space import KeySpaceDetector

    lm = request.getfixturevalue("tiny_llama") if model == "tiny-llama" else \
        request.getfixturevalue("tiny_smol")
    items = [it for it in _items() if it.answer]
    n = 24
    ksd = KeySpaceDetector(layer=-1, batch_size=3, max_length=n)
    want = ksd.query_vectors(lm, items)
    plain = evaluate(lm, items, batch_size=3, max_length=n, progress=False)
    for active in (True, False):
        rec = PromptVectorRecorder(lm, ("key", -1), items, max_length=n, batch_size=3,
                                   active=active)
        with rec:
            got = evaluate(lm, items, batch_size=3, max_length=n, progress=False,
                           on_batch=rec.on_batch)
        assert [r["score"] for r in got.per_item] == [r["score"] for r in plain.per_item]
        assert len(rec._rows) == (len(items) if active else 0)
        torch.testing.assert_close(rec.vectors(), want, rtol=1e-5, atol=1e-6)
    assert not lm.model._forward_hooks and not any(  # the hook is gone after the block
        m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
