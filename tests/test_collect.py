"""Streaming collection: padding never counted, token selection, artifacts, bad input, resume."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import skilllens
from skilllens.core.collect import StatsCollection, load_vectors
from skilllens.data import Item, Skill
from skilllens.errors import ArtifactError, DataError, FingerprintMismatchError, SiteError
from skilllens.core.hooks import Hook, run_with_hooks

TEXTS = ["the cat sat on the mat", "skills live in neurons", "ab", "3 times 4 is 12, says the model",
         "hello world", "padding must never be counted in any statistic"]


def _reference(lm, items, site, layer, tokens):
    """float64 reference from one unpadded forward per item."""
    rows = []
    for it in items:
        p = lm.tokenizer(it.prompt)["input_ids"]
        a = lm.tokenizer(it.answer, add_special_tokens=False)["input_ids"] if it.answer else []
        ids = torch.tensor([p + a])
        seen = {}
        with torch.no_grad():
            run_with_hooks(lm, {"input_ids": ids}, [Hook(site, layer, lambda x: seen.setdefault("a", x))])
        act = seen["a"][0].double()
        rows.append({"all": act, "last": act[len(p) - 1: len(p)], "answer": act[len(p):]}[tokens])
    return torch.cat(rows)


@pytest.mark.parametrize("tokens", ["all", "last", "answer"])
def test_collect_matches_unpadded_float64_reference(tiny_llama, tokens):
    items = [Item(f"i{k}", t[: len(t) // 2], t[len(t) // 2:]) for k, t in enumerate(TEXTS)]
    res = skilllens.collect(tiny_llama, Skill("s", items), sites=["gate", "key"], tokens=tokens,
                            batch_size=4, progress=False, store=True)
    for site in ("gate", "key"):
        ref = _reference(tiny_llama, items, site, 1, tokens)
        st = res[site, 1]
        assert int(st.count[0]) == ref.shape[0]
        torch.testing.assert_close(st.mean, ref.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.std, ref.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.max, ref.amax(0), rtol=1e-5, atol=1e-6)
    assert res.vectors[("key", 1)].shape[0] == ref.shape[0]
    if tokens == "last":  # one row per item, in item order
        assert res.vector_items.tolist() == list(range(len(items)))
        torch.testing.assert_close(res.vectors[("key", 1)].double(), ref, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_results(tiny_llama):
    a = skilllens.collect(tiny_llama, TEXTS, sites="gate", batch_size=1, progress=False)
    b = skilllens.collect(tiny_llama, TEXTS, sites="gate", batch_size=5, progress=False)
    for l in (0, 1):
        assert torch.equal(a["gate", l].count, b["gate", l].count)
        torch.testing.assert_close(a["gate", l].var, b["gate", l].var, rtol=1e-5, atol=1e-7)


def test_backends_give_same_statistics(tiny_llama):
    base = skilllens.collect(tiny_llama, TEXTS, sites=["gate", "key"], progress=False)
    for backend in ("lens", "nnsight"):
        other = skilllens.collect(tiny_llama, TEXTS, sites=["gate", "key"], backend=backend, progress=False)
        for k in base.keys():
            torch.testing.assert_close(other[k].mean, base[k].mean, rtol=1e-5, atol=1e-6)


def test_save_load_and_fingerprint_check(tiny_llama, tmp_path):
    res = skilllens.collect(tiny_llama, TEXTS, sites="key", layers=[-1], progress=False,
                            store=True, store_dir=tmp_path / "vec")
    path = res.save(tmp_path / "s.safetensors")
    back = StatsCollection.load(path, model=tiny_llama)
    assert torch.equal(back["key", 1].m2 if hasattr(back["key", 1], "m2") else back["key", 1].moments.m2,
                       res["key", 1].moments.m2)
    assert back.meta["fingerprint"]["id"] == tiny_llama.fingerprint["id"]
    with pytest.raises(FingerprintMismatchError, match="another model"):
        StatsCollection.load(path, model=skilllens.load_model("tiny-mistral"))
    vecs, items = load_vectors(tmp_path / "vec")
    assert torch.equal(vecs[("key", 1)], res.vectors[("key", 1)])


def test_bad_input_errors(tiny_llama, tmp_path):
    with pytest.raises(DataError, match="empty"):
        skilllens.collect(tiny_llama, [], progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="expected fields"):
        skilllens.collect(tiny_llama, str(bad), progress=False)
    with pytest.raises(SiteError, match="out of range"):
        skilllens.collect(tiny_llama, TEXTS, layers=[5], progress=False)
    with pytest.raises(SiteError, match="unknown site"):
        skilllens.collect(tiny_llama, TEXTS, sites="neuron", progress=False)
    with pytest.raises(SiteError, match="unknown backend"):
        skilllens.collect(tiny_llama, TEXTS, backend="jax", progress=False)
    with pytest.raises(DataError, match="answers"):
        skilllens.collect(tiny_llama, TEXTS, tokens="answer", progress=False)
    res = skilllens.collect(tiny_llama, TEXTS[:2], sites="gate", layers=[0], progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot create folder"):
        res.save(blocker / "x.safetensors")
    with pytest.raises(ArtifactError, match="must end in .safetensors"):
        res.save(tmp_path / "x.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anywhere; others get the clear error
        with pytest.raises(ArtifactError, match="not writable"):
            res.save(ro / "x.safetensors")
    assert list(ro.iterdir()) == []


def test_unwritable_output_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    res = skilllens.collect(tiny_llama, TEXTS[:2], sites="gate", layers=[0], progress=False)
    import safetensors.torch as st

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        res.save(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_nan_activations_counted_not_averaged(tmp_path):
    lm = skilllens.load_model("tiny-llama")
    mod, _ = lm.adapter.site_module("gate", 0)
    with torch.no_grad():
        mod.weight[5] = float("nan")
    with pytest.warns(UserWarning, match="NaN/inf"):
        res = skilllens.collect(lm, TEXTS, sites="gate", layers=[0], progress=False)
    st = res["gate", 0]
    assert st.n_nonfinite[5] == st.n_nonfinite.sum() > 0 and st.count[5] == 0
    assert torch.isfinite(st.mean[torch.arange(64) != 5]).all()
    assert res.meta["nonfinite"] == {"gate.0": int(st.n_nonfinite.sum())}


def test_real_data_sets_with_answer_tokens(tiny_llama, data_dir):
    res = skilllens.collect(tiny_llama, "xquad-de", sites="gate", tokens="answer", max_items=6,
                            progress=False, data_dir=data_dir, max_length=256)
    assert res.meta["n_items"] == 6 and res["gate", 0].count[0] > 0


RESUME_SCRIPT = r"""
import sys, time, skilllens
from skilllens import hooks
orig = hooks.run_with_hooks
def slow(*a, **k):
    time.sleep(float(sys.argv[2]))
    return orig(*a, **k)
c = sys.modules['skilllens.core.collect']  # the package attribute is the function
c.run_with_hooks = slow
texts = [f"item {i} " + "x y z " * (i % 7) for i in range(40)]
res = skilllens.collect("tiny-llama", texts, sites=["gate", "key"], batch_size=2,
                        checkpoint=sys.argv[1], checkpoint_every=2, progress=False,
                        stats=("moments", "extrema", "histogram"))
res.save(sys.argv[1] + ".final.safetensors")
"""


def test_killed_collection_resumes_without_double_counting(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT)
    ck = tmp_path / "ck.safetensors"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(ck), "0.15"], env=env)
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert ck.exists(), "no checkpoint was written before the kill"
    done_at_kill = skilllens.core.artifacts.read_metadata(ck)["batches_done"]
    assert 0 < done_at_kill < 20
    assert not Path(str(ck) + ".final.safetensors").exists()
    subprocess.run([sys.executable, str(script), str(ck), "0"], env=env, check=True)
    resumed = StatsCollection.load(str(ck) + ".final.safetensors")
    ck2 = tmp_path / "fresh.safetensors"
    subprocess.run([sys.executable, str(script), str(ck2), "0"], env=env, check=True)
    fresh = StatsCollection.load(str(ck2) + ".final.safetensors")
    assert resumed.meta["n_tokens"] == fresh.meta["n_tokens"]
    for k in fresh.keys():
        assert torch.equal(resumed[k].count, fresh[k].count)
        torch.testing.assert_close(resumed[k].mean, fresh[k].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(resumed[k].var, fresh[k].var, rtol=1e-12, atol=1e-12)
        assert torch.equal(resumed[k].histogram.counts, fresh[k].histogram.counts)


def test_resume_with_store_keeps_the_vectors_before_the_checkpoint(tiny_llama, tmp_path,
                                                                   monkeypatch):
    # issue 10 defect 7: vectors of batches before the checkpoint were lost on resume
    texts = [f"text {i} " + "ab cd " * (i % 4) for i in range(11)]
    mod = sys.modules["skilllens.core.collect"]  # the package attribute is the function
    orig, calls = mod.run_with_hooks, {"n": 0}

    def dies_at_batch_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return orig(*a, **k)

    kw = dict(sites=["gate", "key"], layers=[0, 1], batch_size=2, progress=False, store=True,
              stats=("moments", "extrema", "histogram"))
    ck = tmp_path / "ck.safetensors"
    monkeypatch.setattr(mod, "run_with_hooks", dies_at_batch_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        skilllens.collect(tiny_llama, texts, checkpoint=ck, checkpoint_every=2, **kw)
    monkeypatch.setattr(mod, "run_with_hooks", orig)
    assert skilllens.core.artifacts.read_metadata(ck)["batches_done"] == 4
    resumed = skilllens.collect(tiny_llama, texts, checkpoint=ck, checkpoint_every=2,
                                store_dir=tmp_path / "vec", **kw)
    fresh = skilllens.collect(tiny_llama, texts, **kw)
    assert resumed.meta["n_tokens"] == fresh.meta["n_tokens"]
    assert torch.equal(resumed.vector_items, fresh.vector_items)
    for k in fresh.keys():
        assert torch.equal(resumed.vectors[k], fresh.vectors[k]), k
        assert torch.equal(resumed[k].count, fresh[k].count)
        torch.testing.assert_close(resumed[k].mean, fresh[k].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(resumed[k].var, fresh[k].var, rtol=1e-12, atol=1e-12)
        assert torch.equal(resumed[k].histogram.counts, fresh[k].histogram.counts)
    vecs, items = load_vectors(tmp_path / "vec")
    assert torch.equal(items, fresh.vector_items) and torch.equal(vecs["key", 1], fresh.vectors["key", 1])
    again = skilllens.collect(tiny_llama, texts, checkpoint=ck, checkpoint_every=2, **kw)
    assert torch.equal(again.vectors["gate", 0], fresh.vectors["gate", 0])  # finished run


def test_device_auto_everywhere(monkeypatch, capsys):
    from skilllens.cli import build_parser, main
    from skilllens.core.models import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    lm = skilllens.load_model("tiny-llama")
    assert lm.device == torch.device("cpu")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        dev = [a for a in p._actions if a.dest == "device"]
        assert all(a.default == "auto" for a in dev), name
    assert main(["info", "--model", "tiny-llama", "--json"]) == 0
    assert "device: cpu" in capsys.readouterr().err
