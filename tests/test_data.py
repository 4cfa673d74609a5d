"""Skill data loaders: formats, stable ids, disjoint probe/eval parts, clear errors."""
import csv
import functools
import gzip
import json
import sys
import types

import pytest
import torch

from skilllens.data import (BUILTIN_SKILLS, XQUAD_LANGS, Item, Skill, as_skill, load_skill,
                            sample_skill, split_skill)
from skilllens.errors import DataError

_cached = functools.lru_cache(maxsize=None)(load_skill)  # shared data sets are read once


def _disjoint(probe, evals):
    assert probe.items and evals.items
    assert not {it.id for it in probe} & {it.id for it in evals}
    assert not {it.prompt for it in probe} & {it.prompt for it in evals}
    assert not {it.text for it in probe} & {it.text for it in evals}


@pytest.mark.parametrize("name", BUILTIN_SKILLS)
def test_builtin_probe_and_eval_never_overlap(data_dir, name):
    probe, evals = _cached(name, data_dir, "probe"), _cached(name, data_dir, "eval")
    _disjoint(probe, evals)
    full = _cached(name, data_dir, "all")
    assert len(probe) + len(evals) <= len(full)
    ids = [it.id for it in full]
    assert len(ids) == len(set(ids)), "ids must be unique"
    assert all(it.answer for it in full)


def test_gsm8k_uses_upstream_train_for_probe_and_test_for_eval(data_dir):
    probe, evals = _cached("gsm8k", data_dir, "probe"), _cached("gsm8k", data_dir, "eval")
    assert (len(probe), len(evals)) == (7473, 1319)
    assert all(it.id.startswith("gsm8k/train/") for it in probe)
    assert all(it.id.startswith("gsm8k/test/") for it in evals)
    assert evals.items[0].meta["final"] == "18"


def test_xquad_split_is_aligned_across_languages(data_dir):
    """The reference probed MLQA on its own test file; here no question (in any language) that
    is probed can be evaluated, also cross-lingually."""
    qid = lambda it: it.id.split("/")[-1]  # noqa: E731
    probe_q, eval_q = set(), set()
    for lang in XQUAD_LANGS:
        probe_q |= {qid(it) for it in _cached(f"xquad-{lang}", data_dir, "probe")}
        eval_q |= {qid(it) for it in _cached(f"xquad-{lang}", data_dir, "eval")}
    assert probe_q and eval_q and not probe_q & eval_q
    contexts = lambda s: {it.prompt.split("\n\nQuestion:")[0] for it in s}  # noqa: E731
    assert not contexts(_cached("xquad-en", data_dir, "probe")) & \
        contexts(_cached("xquad-en", data_dir, "eval"))


def test_split_drops_eval_items_that_repeat_a_probe_prompt():
    items = [Item(f"a/{i}", f"prompt {i % 30}", "x") for i in range(60)]
    probe, evals = split_skill(Skill("dup", items))
    _disjoint(probe, evals)
    assert len(probe) + len(evals) < 60  # some repeated prompts were dropped from eval


def test_pinned_parts_are_kept_and_deterministic():
    items = [Item(f"s/{i}", f"p{i}", "a", {"part": "probe" if i < 5 else "eval"})
             for i in range(9)]
    probe, evals = split_skill(Skill("s", items))
    assert [it.id for it in probe] == [f"s/{i}" for i in range(5)]
    assert split_skill(Skill("s", items))[1].items == evals.items


def test_name_equals_path(data_dir, data_file):
    sk = load_skill(f"xquad-xx={data_file('xquad/xquad.de.json')}", part="eval")
    ref = _cached("xquad-de", data_dir, "eval")
    assert sk.name == "xquad-xx" and sk.family == "xquad"
    assert [it.id.split("/")[-1] for it in sk] == [it.id.split("/")[-1] for it in ref]
    assert sk.items[0].prompt == ref.items[0].prompt
    assert sk.items[0].meta["lang"] == "xx"


def test_humaneval_fields(data_dir):
    sk = _cached("humaneval", data_dir, "all")
    it = next(i for i in sk if i.id == "HumanEval/0")
    assert it.meta["entry_point"] == "has_close_elements" and "def check" in it.meta["test"]
    assert it.prompt.lstrip().startswith("from typing import List")


MBPP_ROWS = [
    {"task_id": t, "text": f"Write a function to add {t}.", "code": f"def f(x):\r\n    return x + {t}",
     "test_list": [f"assert f(1) == {1 + t}"], "test_setup_code": "", "challenge_test_list": []}
    for t in (2, 11, 12, 600, 700)
]


def test_mbpp_upstream_jsonl_and_official_split(tmp_path):
    p = tmp_path / "mbpp.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in MBPP_ROWS) + "\n")
    sk = load_skill(f"mbpp={p}", part="all")
    assert [it.id for it in sk] == ["mbpp/2", "mbpp/11", "mbpp/12", "mbpp/600", "mbpp/700"]
    it = sk.items[1]
    assert "Write a function to add 11." in it.prompt and "assert f(1) == 12" in it.prompt
    assert it.answer == "def f(x):\n    return x + 11\n"
    assert it.meta["test_list"] == ["assert f(1) == 12"]
    evals = load_skill(f"mbpp={p}", part="eval")
    assert [it.id for it in evals] == ["mbpp/11", "mbpp/12"]  # task ids 11-510 are the test set
    _disjoint(load_skill(f"mbpp={p}", part="probe"), evals)


def test_mbpp_bad_row_names_fields(tmp_path):
    p = tmp_path / "mbpp.jsonl"
    p.write_text(json.dumps({"task_id": 1, "text": "x"}) + "\n")
    with pytest.raises(DataError, match="test_list"):
        load_skill(f"mbpp={p}")


def _mmlu_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mmlu_csv_file_and_folder(tmp_path):
    rows = [["What is 2+2?", "3", "4", "5", "6", "B"], ["Capital of France?", "Paris", "Rome",
                                                        "Oslo", "Bern", "A"]]
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    _mmlu_csv(tmp_path / "dev" / "high_school_math_dev.csv", rows[:1])
    _mmlu_csv(tmp_path / "test" / "high_school_math_test.csv", rows)
    one = load_skill(f"mmlu={tmp_path / 'test' / 'high_school_math_test.csv'}", part="all")
    assert len(one) == 2 and one.items[0].answer == " B"
    assert one.items[0].prompt.startswith("The following is a multiple choice question about "
                                          "high school math.")
    assert "\nB. 4\n" in one.items[0].prompt and one.items[0].prompt.endswith("Answer:")
    probe, evals = load_skill(f"mmlu={tmp_path}", part="probe"), \
        load_skill(f"mmlu={tmp_path}", part="eval")
    assert len(probe) == 1 and len(evals) == 1  # dev -> probe; the repeated question is dropped
    _disjoint(probe, evals)


def test_mmlu_bad_csv_names_columns(tmp_path):
    p = tmp_path / "x_test.csv"
    _mmlu_csv(p, [["question", "A", "B"]])
    with pytest.raises(DataError, match="question,A,B,C,D,answer"):
        load_skill(f"mmlu={p}")


def test_mmlu_hub_layout_jsonl(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text(json.dumps({"question": "Q?", "subject": "law", "choices": ["a", "b", "c", "d"],
                             "answer": 3}) + "\n")
    sk = load_skill(f"mmlu={p}", part="all")
    assert sk.items[0].answer == " D" and sk.items[0].meta["subject"] == "law"


def test_mmlu_hub_layout_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    p = tmp_path / "test-00000-of-00001.parquet"
    pd.DataFrame({"question": ["Q1?", "Q2?"], "subject": ["law", "law"],
                  "choices": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
                  "answer": [0, 2]}).to_parquet(p)
    sk = load_skill(f"mmlu={p}", part="all")
    assert [it.answer for it in sk] == [" A", " C"] and "C. g" in sk.items[1].prompt


def test_plain_text_and_jsonl(tmp_path):
    t = tmp_path / "notes.txt"
    t.write_text("first line\n\n second line \n")
    sk = load_skill(str(t), part="all")
    assert [it.prompt for it in sk] == ["first line", "second line"]
    j = tmp_path / "qa.jsonl.gz"
    with gzip.open(j, "wt") as f:
        f.write(json.dumps({"question": "Why?", "answer": 42}) + "\n")
        f.write(json.dumps({"id": "custom", "prompt": "p", "completion": "c"}) + "\n")
    sk = load_skill(str(j), part="all")
    assert sk.items[0].text == "Question: Why?\nAnswer: 42"
    assert (sk.items[1].id, sk.items[1].answer) == ("custom", "c")


def test_empty_file_is_a_clear_error(tmp_path):
    for name in ("empty.jsonl", "empty.txt"):
        p = tmp_path / name
        p.write_text("\n")
        with pytest.raises(DataError, match="no items"):
            load_skill(str(p))
    p = tmp_path / "g.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="no items"):
        load_skill(f"gsm8k={p}")


def test_bad_formats_name_expected_fields(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(DataError, match=r"\['question', 'answer'\]"):
        load_skill(f"gsm8k={p}")
    with pytest.raises(DataError, match="'prompt'"):
        load_skill(str(p))
    with pytest.raises(DataError, match="entry_point"):
        load_skill(f"humaneval={p}")
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"version": 1}))
    with pytest.raises(DataError, match="SQuAD"):
        load_skill(f"xquad-en={s}")
    s.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_skill(f"xquad-en={s}")


def test_unknown_and_missing(tmp_path):
    with pytest.raises(DataError, match="unknown skill"):
        load_skill("poetry")
    with pytest.raises(DataError, match="does not exist"):
        load_skill(f"gsm8k={tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="needs .*mbpp.jsonl"):
        load_skill("mbpp", tmp_path)
    with pytest.raises(DataError, match="part"):
        load_skill("gsm8k", part="train")
    with pytest.raises(DataError, match="empty"):
        as_skill([])


def test_sample_is_seeded_and_without_replacement(data_dir):
    sk = _cached("humaneval", data_dir, "eval")
    a, b = sample_skill(sk, 10, seed=3), sample_skill(sk, 10, seed=3)
    assert [i.id for i in a] == [i.id for i in b] and len({i.id for i in a}) == 10
    assert [i.id for i in sample_skill(sk, 10, seed=4)] != [i.id for i in a]


def _fake_datasets(monkeypatch, tables, calls):
    mod = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return tables[split] if split else dict(tables)
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hub_ids_through_datasets_without_network(monkeypatch):
    rows = lambda n, off: [{"question": f"q{i}", "answer": f"work\n#### {i}"}  # noqa: E731
                           for i in range(off, off + n)]
    calls = []
    _fake_datasets(monkeypatch, {"train": rows(5, 0), "test": rows(3, 100)}, calls)
    sk = load_skill("hub:openai/gsm8k:main", part="all")
    assert calls[-1] == ("openai/gsm8k", "main", None) and sk.name == "gsm8k"
    assert sk.family == "gsm8k" and sk.source == "hub:openai/gsm8k:main"
    probe, evals = load_skill("hub:openai/gsm8k:main", part="probe"), \
        load_skill("hub:openai/gsm8k:main", part="eval")
    assert [it.meta["final"] for it in evals] == ["100", "101", "102"] and len(probe) == 5
    one = load_skill("math=hub:openai/gsm8k:main@test", part="all")
    assert calls[-1] == ("openai/gsm8k", "main", "test") and one.name == "math" and len(one) == 3
    with pytest.raises(DataError, match="cannot load hub data set"):
        load_skill("hub:missing/set")


def test_hub_squad_and_mbpp_layouts(monkeypatch):
    squad = [{"id": f"q{i}", "context": f"ctx {i // 2}", "question": f"who {i}?",
              "answers": {"text": [f"ans {i}"], "answer_start": [0]}} for i in range(8)]
    _fake_datasets(monkeypatch, {"validation": squad}, [])
    sk = load_skill("xquad-de=hub:google/xquad:xquad.de@validation", part="all")
    assert sk.family == "xquad" and sk.items[0].meta["answers"] == ["ans 0"]
    assert sk.items[0].meta["group"] == sk.items[1].meta["group"] != sk.items[2].meta["group"]
    _fake_datasets(monkeypatch, {"test": MBPP_ROWS}, [])
    sk = load_skill("hub:google-research-datasets/mbpp@test", part="all")
    assert sk.family == "mbpp" and sk.items[0].meta["test_list"] == ["assert f(1) == 3"]


# ---- issue 10, defects 1 and 2: names mean the probe part; lists of names are names ---------

def _ids(skill):
    return {it.id for it in skill}


def test_a_builtin_name_holds_no_eval_item():
    from skilllens.data import as_skill
    for name in ("gsm8k", "humaneval", "xquad-en"):
        probe, evals = _cached(name, None, "probe"), _cached(name, None, "eval")
        for sk in (as_skill(name), load_skill(name)):
            assert _ids(sk) == _ids(probe) and not _ids(sk) & _ids(evals), name
    assert len(load_skill("gsm8k", part="all")) == len(_cached("gsm8k", None, "probe")) + \
        len(_cached("gsm8k", None, "eval"))  # the eval part only when asked for


def test_fits_from_names_use_probe_parts_and_lists_of_names(tiny_llama, monkeypatch):
    """NA, SP, KSD fit/calibrate and collect given names see probe items only; a list of names
    resolves like the names (not as two one-line texts)."""
    from skilllens import collect
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.selective_pruning import SelectivePruner

    texts = ["a b c", "d e f g"]
    kw = dict(layers=None, tokens="all", progress=False, stats=("moments", "abs"))
    stats = {s: collect(tiny_llama, texts, sites=[s], **kw) for s in ("gate", "key")}
    forget, evals = _cached("gsm8k", None, "probe"), _cached("gsm8k", None, "eval")
    retain = [_cached(s, None, "probe") for s in ("humaneval", "xquad-en")]
    pooled = Skill("r", [it for r in retain for it in r.items])
    for est, site in ((NeuronAdjuster(percent=5), "gate"), (SelectivePruner(percent=5), "key")):
        est.fit(tiny_llama, "gsm8k", ["humaneval", "xquad-en"], forget_stats=stats[site],
                retain_stats=stats[site], progress=False)
        assert est.meta_["forget_hash"] == forget.digest(), type(est).__name__
        assert est.meta_["retain_hash"] == pooled.digest(), type(est).__name__

    seen = []

    def fake_vectors(self, lm, items, progress=False):
        seen.append([it.id for it in items])
        g = torch.Generator().manual_seed(len(seen))
        return torch.randn(len(seen[-1]), 8, generator=g, dtype=torch.float64)
    monkeypatch.setattr(KeySpaceDetector, "query_vectors", fake_vectors)
    ksd = KeySpaceDetector(alpha=2.0).fit(tiny_llama, "gsm8k", progress=False)
    assert set(seen[0]) == _ids(forget) and not set(seen[0]) & _ids(evals)
    ksd.calibrate(tiny_llama, ["humaneval", "xquad-en"])
    assert {i for ids in seen[1:] for i in ids} == _ids(pooled)

    res = collect(tiny_llama, "gsm8k", sites=["gate"], layers=[0], max_items=2, progress=False)
    assert res.meta["data_hash"] == forget.head(2).digest()


def test_lists_of_names_texts_and_mixtures(tmp_path):
    from skilllens.data import as_skill
    both = [_cached(s, None, "probe") for s in ("humaneval", "xquad-en")]
    for spec in (["humaneval", "xquad-en"], "humaneval,xquad-en", ("humaneval", " xquad-en")):
        sk = as_skill(spec)
        assert [it.id for it in sk] == [it.id for s in both for it in s] and \
            sk.name == "humaneval+xquad-en", spec
    t = tmp_path / "notes.txt"
    t.write_text("".join(f"note number {i}\n" for i in range(40)))
    assert len(as_skill([str(t), "humaneval"])) == len(as_skill(str(t))) + len(both[0])
    long = ["w" * 300 + " end", "a/" + "b" * 300]  # no file name can be this long
    texts = as_skill(["The cat sat.", "2+2=4", "a", *long])  # literal texts stay texts
    assert [it.text for it in texts] == ["The cat sat.", "2+2=4", "a", *long]
    from skilllens.data import from_texts
    assert [it.text for it in as_skill(from_texts(["Paris", "Rome"]))] == ["Paris", "Rome"]
    for bad in (["humaneval", "The cat sat."], ["humaneval2"], ["gsm8k", "gsm9k"],
                ["humanevl", "The cat sat."], ["gsm8"], ["mathqa=x.jsonl"]):
        with pytest.raises(DataError) as e:
            as_skill(bad)
        assert "gsm8k" in str(e.value) and "NAME=PATH" in str(e.value), bad
