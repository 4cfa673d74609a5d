"""Which items each entry point uses (issue 21, items 2 and 10): statistics use every item of
what the user gave unless a part is asked for; evaluation uses the eval part; a bare string is
never read character by character; outputs say which part and how many items of how many."""
import json

import pytest
import torch
from safetensors import safe_open

from skilllens.cli import main
from skilllens.core.hooks import Hook, run_with_hooks
from skilllens.data import Item, Skill, from_texts, load_skill, resolve_skills, split_skill
from skilllens.errors import DataError

LINES = [f"question {i}: what is {i} times {i + 3}, and why does it matter?" for i in range(12)]


def _float64_key_means(lm, texts, n_layers):
    """Per-layer mean of the ``key`` site over every token of each text (one unpadded float64
    forward pass per text)."""
    lm64 = type(lm)(**{**lm.__dict__})  # same adapter/tokenizer, model cast below
    rows = {l: [] for l in range(n_layers)}
    model = lm.model
    model.double()
    try:
        for t in texts:
            ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
            seen = {}
            hooks = [Hook("key", l, lambda x, l=l: seen.setdefault(l, x)) for l in range(n_layers)]
            with torch.no_grad():
                run_with_hooks(lm64, {"input_ids": ids}, hooks)
            for l in range(n_layers):
                rows[l].append(seen[l][0].double())
    finally:
        model.float()
    return {l: torch.cat(r).mean(0) for l, r in rows.items()}


def test_cli_collect_on_a_users_file_uses_every_line(tiny_llama, tmp_path, capsys):
    """Old code: 'questions.txt' was cut to its probe part (9 of 12 lines here) without a word;
    the means differed from a float64 computation over the 12 lines."""
    f = tmp_path / "questions.txt"
    f.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "k.safetensors"
    assert main(["collect", "--model", "tiny-llama", "--data", str(f), "--site", "key",
                 "--tokens", "all", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 items (all 12 items)" in printed, printed
    n_layers = tiny_llama.adapter.n_layers
    ref = _float64_key_means(tiny_llama, LINES, n_layers)
    with safe_open(str(out), "pt") as fh:
        meta = json.loads(fh.metadata()["skilllens"])
        for l in range(n_layers):
            mean = fh.get_tensor(f"key.{l}.mean").double()
            rel = float((mean - ref[l]).norm() / ref[l].norm())
            assert rel < 1e-5, (l, rel)
    assert meta["n_items"] == 12 and meta["data_part"] == "all 12 items"


def test_collect_part_is_explicit_and_reported(tiny_llama, tmp_path):
    import skilllens
    f = tmp_path / "questions.txt"
    f.write_text("\n".join(LINES) + "\n")
    probe, evals = split_skill(load_skill(str(f), part="all"))
    res = skilllens.collect(tiny_llama, str(f), sites="key", layers=[0], part="probe",
                            progress=False)
    assert res.meta["n_items"] == len(probe) < 12
    assert res.meta["data_part"] == (f"probe part: {len(probe)} of 12 items; "
                                     f"eval: {len(evals)}")
    assert skilllens.collect(tiny_llama, str(f), sites="key", layers=[0],
                             progress=False).meta["n_items"] == 12


def test_every_skill_like_argument_has_an_explicit_part(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("\n".join(LINES) + "\n")
    for spec in (str(f), f"txt={f}", [str(f)]):
        sizes = {p: len(resolve_skills(spec, part=p)) for p in ("all", "probe", "eval")}
        assert sizes["all"] == 12 and sizes["probe"] + sizes["eval"] == 12, (spec, sizes)
        assert resolve_skills(spec, part="eval").part == "eval"
    with pytest.raises(DataError, match="unknown part"):
        resolve_skills(str(f), part="train")
    # a bare string is one spec or one text, never its characters
    with pytest.raises(DataError, match="unknown skill"):
        resolve_skills("g")
    assert [it.prompt for it in from_texts("hello world")] == ["hello world"]
    one = Item("x", "2+2=", "4")
    assert resolve_skills(one, part="eval").items == [one]
    sk = Skill("mine", [one, Item("y", "3+3=", "6")])
    assert resolve_skills(sk, part="eval") is sk  # a Skill is used as given


def test_pooled_and_sampled_parts_describe_themselves():
    probe = resolve_skills(["humaneval", "xquad-en"], part="probe")
    he, xq = (load_skill(s, part="probe") for s in ("humaneval", "xquad-en"))
    assert probe.part == "probe" and probe.counts["probe"] == len(he) + len(xq)
    assert probe.describe().startswith(f"probe part: {len(probe)} of "
                                       f"{he.counts['all'] + xq.counts['all']} items; eval: ")
    from skilllens.data import sample_skill
    s = sample_skill(he, 5)
    assert s.describe() == (f"probe part: 5 sampled of its {len(he)} (of {he.counts['all']} "
                            f"items); eval: {he.counts['eval']}")


def test_evaluate_detection_scores_held_out_items_of_a_spec(tiny_llama, monkeypatch):
    """Issue 21 item 2: ``evaluate_detection(lm, "gsm8k", "humaneval")`` scored the five
    one-character queries g, s, m, 8, k; ``["gsm8k"]`` scored the probe part the cube was
    fitted on. Specs now give their eval part; ``max_items`` caps each side."""
    from skilllens.unlearning.key_space import KeySpaceDetector

    gsm_eval, he_eval = load_skill("gsm8k", part="eval"), load_skill("humaneval", part="eval")
    gsm_probe = load_skill("gsm8k", part="probe")
    ksd = KeySpaceDetector(alpha=2.0).fit(tiny_llama, gsm_probe.head(8), progress=False)
    rep = ksd.evaluate_detection(tiny_llama, "gsm8k", "humaneval", max_items=6)
    assert (rep.n_forget, rep.n_retain) == (6, 6)
    assert 0.0 <= rep.auc <= 1.0 and len(rep.forget_scores) == 6

    seen = []
    real = KeySpaceDetector.query_vectors

    def spy(self, lm, items, progress=False, **kw):
        sk = resolve_skills(items, part=kw.get("part", "probe"))
        seen.append({it.id for it in sk})
        return torch.randn(len(sk), ksd.m_.shape[0], dtype=torch.float64)
    monkeypatch.setattr(KeySpaceDetector, "query_vectors", spy)
    for forget in ("gsm8k", ["gsm8k"]):
        seen.clear()
        rep = ksd.evaluate_detection(tiny_llama, forget, "humaneval")
        assert (rep.n_forget, rep.n_retain) == (len(gsm_eval), len(he_eval)), forget
        assert seen[0] == {it.id for it in gsm_eval}, forget
        assert not seen[0] & {it.id for it in gsm_probe}
        assert seen[1] == {it.id for it in he_eval}
    monkeypatch.setattr(KeySpaceDetector, "query_vectors", real)
    with pytest.raises(DataError):
        ksd.generate(tiny_llama, "What is 2+2?")  # one string is not a list of prompts


def test_ksd_load_keeps_forget_source_and_heldout_scores(tiny_llama, tmp_path):
    from skilllens.unlearning.key_space import KeySpaceDetector

    f = tmp_path / "q.txt"
    f.write_text("\n".join(LINES) + "\n")
    ksd = KeySpaceDetector(alpha=1.5).fit(tiny_llama, str(f), progress=False)
    assert ksd.meta_["forget_source"] == str(f)
    back = KeySpaceDetector.load(ksd.save(tmp_path / "k.safetensors"), tiny_llama)
    assert back.meta_ == ksd.meta_
    assert torch.equal(back.probe_heldout_scores_, ksd.probe_heldout_scores_)
    retain = ksd.query_vectors(tiny_llama, ["a b c", "hello there", "x y z w"])
    assert back.calibrate_vectors(retain).alpha == ksd.calibrate_vectors(retain).alpha


def test_generation_and_scoring_never_iterate_one_string(tiny_llama):
    from skilllens.eval import generate_texts
    from skilllens.core.batching import encode_items
    with pytest.raises(DataError, match="one string"):
        generate_texts(tiny_llama, "What is 2+2?", max_new_tokens=2, progress=False)
    with pytest.raises(DataError, match="one string"):
        encode_items("2+2=", tiny_llama.tokenizer)
