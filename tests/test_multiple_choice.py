"""Multiple-choice scoring (lm-eval's loglikelihood, acc, acc_norm), abstention, chance flag."""
from __future__ import annotations

import math

import pytest
import torch

import skilllens
from skilllens.data import Item, Skill
from skilllens.eval.multiple_choice import (CHANCE, continuation_loglikelihoods,
                                            evaluate_multiple_choice, near_chance,
                                            with_abstention)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return skilllens.load_model("tiny-llama")


def _items(n=6):
    return [Item(f"q/{i}", f"The following are multiple choice questions.\n\nQ{i} is?\nA. a{i}"
                 f"\nB. b\nC. c\nD. d\nAnswer:", f" {'ABCD'[i % 4]}. x",
                 {"choices": [f"a{i}", "b", "c", "d"], "gold": i % 4, "subject": "t"})
            for i in range(n)]


def test_loglikelihood_matches_a_float64_reference(lm):
    pairs = [("The cat sat on the", " mat"), ("Q?\nAnswer:", " B"), ("Hi", " there you are"),
             ("The cat sat on the", "."), ("The cat sat on the", "a")]   # shared context
    got = continuation_loglikelihoods(lm, pairs, batch_size=2)
    m = lm.model.double()
    try:
        for (c, x), (ll, greedy, n) in zip(pairs, got):
            ids = lm.tokenizer(c + x, return_tensors="pt")["input_ids"]
            nc = len(lm.tokenizer(c)["input_ids"])
            with torch.no_grad():
                lp = torch.log_softmax(m(ids).logits[0, :-1], -1)
            t = torch.arange(nc - 1, ids.shape[1] - 1)
            ref = lp[t, ids[0, 1:][nc - 1:]]
            assert n == ids.shape[1] - nc and ll == pytest.approx(float(ref.sum()), abs=1e-4)
            assert greedy == bool((lp[t].argmax(-1) == ids[0, 1:][nc - 1:]).all())
    finally:
        lm.model.float()
    assert sum(n == 1 for _, _, n in got) >= 2   # the one-forward path for one-token choices ran


def test_acc_is_argmax_of_choice_loglikelihoods_and_counts_abstention(lm):
    sk = Skill("mc", _items())
    full = evaluate_multiple_choice(lm, sk, progress=False)
    pairs = [(it.prompt, f" {L}") for it in sk for L in "ABCD"]
    lls = [r[0] for r in continuation_loglikelihoods(lm, pairs)]
    for k, row in enumerate(full.per_item):
        ll = lls[4 * k:4 * k + 4]
        assert row["lls"] == pytest.approx(ll, abs=1e-5)
        assert row["acc"] == float(max(range(4), key=lambda j: ll[j]) == row["gold"])
    assert full.acc == pytest.approx(sum(r["acc"] for r in full.per_item) / len(sk))

    class Every2nd:
        def abstains(self, lm, items):
            return torch.tensor([i % 2 == 0 for i in range(len(items))])

    ab = evaluate_multiple_choice(lm, sk, abstainer=Every2nd(), progress=False)
    assert ab.n_abstained == 3 and ab.n_items == 6
    assert all(r["acc"] == r["acc_norm"] == r["token_accuracy"] == 0.0
               for r in ab.per_item[::2])
    kept = [r for r in full.per_item[1::2]]
    assert ab.acc == pytest.approx(sum(r["acc"] for r in kept) / 6)          # over all items
    assert ab.token_accuracy == pytest.approx(sum(r["token_accuracy"] for r in kept) / 6)
    same = with_abstention(full, [i % 2 == 0 for i in range(6)])
    assert (same.acc, same.acc_norm, same.token_accuracy) == pytest.approx(
        (ab.acc, ab.acc_norm, ab.token_accuracy))


def test_near_chance_flag():
    assert CHANCE == 0.25
    assert near_chance(0.3, 24) and not near_chance(0.6, 24)
    assert near_chance(0.26, 10_000) is False          # 2 SE at n=10k is 0.0087
    assert near_chance(0.25 + 2 * math.sqrt(0.1875 / 100) - 1e-9, 100)
    assert near_chance(float("nan"), 10) and near_chance(0.9, 0)


def test_items_without_choices_are_refused(lm):
    with pytest.raises(skilllens.errors.DataError, match="multiple-choice"):
        evaluate_multiple_choice(lm, Skill("x", [Item("a", "Q:", " yes")]), progress=False)


def test_choices_read_from_the_teacher_forced_pass_equal_their_own_passes(tiny_smol):
    """ChoiceRecorder (one pass for acc and token accuracy; the audit's MMLU column) gives the
    log-likelihoods of continuation_loglikelihoods for every item, read or not."""
    from skilllens.eval import evaluate
    from skilllens.eval.multiple_choice import ChoiceRecorder

    items = _items(7)
    items.append(Item("long", "word " * 60 + "\nAnswer:", " C. x",   # prompt cut: own passes
                      {"choices": list("abcd"), "gold": 2}))
    pairs = [(it.prompt, f" {L}") for it in items for L in "ABCD"]
    want = [r[0] for r in continuation_loglikelihoods(tiny_smol, pairs, max_length=48)]
    rec = ChoiceRecorder(tiny_smol, items, max_length=48, batch_size=3)
    plain = evaluate(tiny_smol, items, batch_size=3, max_length=48, progress=False)
    got = evaluate(tiny_smol, items, batch_size=3, max_length=48, progress=False,
                   on_logits=rec.on_logits)
    assert [r["score"] for r in got.per_item] == [r["score"] for r in plain.per_item]
    assert rec.n_read == 7                      # " A".." D" are one SmolLM2 token each
    sc = rec.score("mc")
    for k, row in enumerate(sc.per_item):
        assert row["lls"] == pytest.approx(want[4 * k:4 * k + 4], abs=1e-5)
    one = evaluate_multiple_choice(tiny_smol, Skill("mc", items), max_length=48, batch_size=3,
                                   progress=False)
    assert (one.acc, one.acc_norm) == pytest.approx((sc.acc, sc.acc_norm))
    assert one.token_accuracy == pytest.approx(plain.score)
