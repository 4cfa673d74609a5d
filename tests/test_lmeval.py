"""The lm-eval bridge: equal to lm-eval's ``hf`` model unedited, equal to skilllens's own
evaluation with an edit, KSD abstention scored as wrong, offline tasks, the CLI wrapper."""
from __future__ import annotations

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import skilllens  # noqa: E402
from skilllens.data import load_skill, sample_skill  # noqa: E402
from skilllens.errors import FingerprintMismatchError  # noqa: E402
from skilllens.eval import evaluate  # noqa: E402
from skilllens.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from skilllens.lmeval import SkillLensLM, task_manager  # noqa: E402
from skilllens.unlearning.key_space import REFUSAL, KeySpaceDetector  # noqa: E402
from skilllens.unlearning.neuron_adjust import NeuronAdjuster  # noqa: E402
from skilllens.unlearning.selective_pruning import SelectivePruner  # noqa: E402

N = 4


@pytest.fixture(scope="module")
def lm():
    return skilllens.load_model("tiny-llama")


@pytest.fixture(scope="module")
def tm():
    return task_manager()


def _run(model, tasks, tm, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=tm, limit=N,
                                   log_samples=True, **kw)


def _samples(res, task):
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _lls(res, task):
    return [[float(r[0]) for r in s["filtered_resps"]] for s in _samples(res, task)]


def test_unedited_bridge_equals_lm_evals_hf_model(lm, tm, tmp_path):
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    args = f"pretrained={tmp_path / 'm'},max_length=1024"
    hf = _run("hf", ["skilllens_mmlu_redux", "skilllens_xquad_en"], tm,
              model_args=args + ",dtype=float32,device=cpu",
              gen_kwargs="max_gen_toks=4")
    ours = _run("skilllens", ["skilllens_mmlu_redux", "skilllens_xquad_en"], tm,
                model_args=args + ",device=cpu", gen_kwargs="max_gen_toks=4")
    a, b = _lls(hf, "skilllens_mmlu_redux"), _lls(ours, "skilllens_mmlu_redux")
    assert len(a) == N and all(len(x) == 4 for x in a)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    for m in ("acc,none", "acc_norm,none"):
        assert hf["results"]["skilllens_mmlu_redux"][m] == ours["results"]["skilllens_mmlu_redux"][m]
    assert [s["filtered_resps"] for s in _samples(hf, "skilllens_xquad_en")] == \
        [s["filtered_resps"] for s in _samples(ours, "skilllens_xquad_en")]
    assert ours["config"]["skilllens"]["abstained"]["loglikelihood"] == 0


def test_with_an_edit_the_bridge_equals_skilllens_evaluate(lm, tm, tmp_path):
    forget = [f"{i} + {i} = {2 * i}" for i in range(8)]
    retain = [f"The {w} sat on the mat." for w in ("cat", "dog", "bird", "cow")]
    sp = SelectivePruner(percent=10).fit(lm, forget, retain, progress=False)
    sp.save(tmp_path / "sp.safetensors")
    res = _run("skilllens", ["skilllens_mmlu_redux"], tm,
               model_args=f"pretrained=tiny-llama,max_length=1024,"
                          f"edits={tmp_path / 'sp.safetensors'}")
    items = load_skill("mmlu-redux", part="eval").head(N)
    with sp.applied(lm):
        ref = evaluate_multiple_choice(lm, items, progress=False, max_length=1024)
    plain = evaluate_multiple_choice(lm, items, progress=False, max_length=1024)
    got = _lls(res, "skilllens_mmlu_redux")
    assert torch.allclose(torch.tensor(got), torch.tensor([r["lls"] for r in ref.per_item]),
                          atol=1e-4, rtol=0)
    assert not torch.allclose(torch.tensor(got), torch.tensor([r["lls"] for r in plain.per_item]),
                              atol=1e-3)                      # the edit was really applied
    assert res["results"]["skilllens_mmlu_redux"]["acc,none"] == pytest.approx(ref.acc)


def _ksd_on(lm, prompts, alpha=3.0):
    from skilllens.data import Item
    return KeySpaceDetector(alpha=alpha).fit(lm, [Item(f"f{i}", p) for i, p in
                                                  enumerate(prompts)], progress=False)


def test_ksd_abstention_multiple_choice_counts_as_wrong(lm, tm):
    items = load_skill("mmlu-redux", part="eval").head(N)
    ksd = _ksd_on(lm, [it.prompt for it in items.items[:2]], alpha=1.0)
    bridge = SkillLensLM(lm=lm, methods=[ksd], max_length=1024)
    res = _run(bridge, ["skilllens_mmlu_redux"], tm)
    ref = evaluate_multiple_choice(lm, items, abstainer=ksd, progress=False, max_length=1024)
    abst = [r["abstained"] for r in ref.per_item]
    assert 1 <= sum(abst)
    samples = _samples(res, "skilllens_mmlu_redux")
    for s, a in zip(samples, abst):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert all(math.isinf(v) and v < 0 for v in lls) == a
        if a:
            assert s["acc"] == 0.0 and s["acc_norm"] == 0.0   # never the tie's first choice
    assert res["results"]["skilllens_mmlu_redux"]["acc,none"] == pytest.approx(ref.acc)
    assert res["config"]["skilllens"]["abstained"]["loglikelihood"] == 4 * sum(abst)
    # abstaining on everything can never score above zero, whatever the gold letters are
    all_in = _ksd_on(lm, [it.prompt for it in items], alpha=1e6)
    res = _run(SkillLensLM(lm=lm, methods=[all_in], max_length=1024), ["skilllens_mmlu_redux"],
               tm)
    assert res["results"]["skilllens_mmlu_redux"]["acc,none"] == 0.0


def test_ksd_abstention_generation_returns_the_refusal(lm, tm):
    items = load_skill("gsm8k", part="eval").head(N)
    ksd = _ksd_on(lm, [it.prompt for it in items.items[:2]], alpha=1.0)
    res = _run(SkillLensLM(lm=lm, methods=[ksd], max_length=1024), ["skilllens_gsm8k"], tm,
               gen_kwargs="max_gen_toks=8")
    ref = evaluate(lm, items, "exact_match", abstainer=ksd, n_shots=0, max_new_tokens=8,
                   max_length=1024, progress=False)
    abst = [r["abstained"] for r in ref.per_item]
    assert 1 <= sum(abst)
    samples = _samples(res, "skilllens_gsm8k")
    assert [s["filtered_resps"][0] == REFUSAL for s in samples] == abst
    assert res["results"]["skilllens_gsm8k"]["exact_match,none"] == pytest.approx(ref.score)
    assert res["config"]["skilllens"]["abstained"]["generate_until"] == sum(abst)


def test_artifacts_from_another_model_are_refused(lm, tmp_path):
    na = NeuronAdjuster(percent=5).fit(lm, ["1+1=2", "2+2=4"], ["a cat", "a dog"],
                                       progress=False)
    na.save(tmp_path / "na.safetensors")
    with pytest.raises(FingerprintMismatchError):
        SkillLensLM(pretrained="tiny-gpt2", edits=str(tmp_path / "na.safetensors"))


def test_cli_runs_offline_with_na_and_ksd(lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    na = NeuronAdjuster(percent=5).fit(lm, ["1+1=2", "2+2=4"], ["a cat", "a dog"],
                                       progress=False)
    na.save(tmp_path / "na.safetensors")
    ksd = _ksd_on(lm, [it.prompt for it in sample_skill(load_skill("gsm8k"), 4).items])
    ksd.save(tmp_path / "ksd.safetensors")
    from skilllens.cli import main as cli
    code = cli(["lm-eval", "--model", "skilllens", "--model_args",
                f"pretrained=tiny-llama,max_length=1024,edits={tmp_path / 'na.safetensors'}+"
                f"{tmp_path / 'ksd.safetensors'}", "--tasks", "skilllens_mmlu_redux",
                "--limit", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "skilllens_mmlu_redux" in out and "acc" in out


def _plain_python(code: str, **env):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_lm_evals_own_registry_and_task_manager_see_skilllens():
    """skilllens-lmeval.pth (installed with skilllens) registers the model type and the task
    folder when lm_eval is imported in a fresh interpreter; nothing of skilllens or torch is
    imported before that, and SKILLLENS_NO_LMEVAL_PLUGIN=1 switches it off."""
    code = ("import sys; from lm_eval.api.registry import get_model; "
            "from lm_eval.tasks import TaskManager; "
            "print(get_model('skilllens').__name__, get_model('hf').__name__, "
            "sorted(t for t in TaskManager().all_tasks if t.startswith('skilllens_')))")
    got = _plain_python(code)
    assert got.returncode == 0, (f"{got.stderr[-2000:]}\nlm_eval does not see skilllens: is "
                                 f"skilllens installed (pip install -e .)?")
    assert "SkillLensLM HFLM ['skilllens_gsm8k', 'skilllens_mmlu_redux', 'skilllens_xquad_de',"\
        " 'skilllens_xquad_en']" in got.stdout
    bare = _plain_python("import sys; print('torch' in sys.modules, 'skilllens' in sys.modules)")
    assert bare.stdout.split() == ["False", "False"]
    off = _plain_python(code, SKILLLENS_NO_LMEVAL_PLUGIN="1")
    assert off.returncode != 0 and "skilllens" in off.stderr


def test_lm_eval_command_line_runs_skilllens_offline_with_na_and_ksd(lm, tmp_path):
    """The issue's command, lm-eval's own console script: lm_eval --model skilllens
    --model_args pretrained=SPEC,edits=na+ksd --tasks skilllens_mmlu_redux (no network)."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("lm_eval")
    if exe is None:
        pytest.skip("lm-eval's lm_eval command is not on PATH")
    na = NeuronAdjuster(percent=5).fit(lm, ["1+1=2", "2+2=4"], ["a cat", "a dog"],
                                       progress=False)
    na.save(tmp_path / "na.safetensors")
    ksd = _ksd_on(lm, [it.prompt for it in sample_skill(load_skill("gsm8k"), 4).items])
    ksd.save(tmp_path / "ksd.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    got = subprocess.run([exe, "--model", "skilllens", "--model_args",
                          f"pretrained=tiny-llama,max_length=1024,edits="
                          f"{tmp_path / 'na.safetensors'}+{tmp_path / 'ksd.safetensors'}",
                          "--tasks", "skilllens_mmlu_redux", "--limit", "2", "--device", "cpu",
                          "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "skilllens_mmlu_redux" in got.stdout and "acc" in got.stdout
    import json
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    info = res["config"]["skilllens"]
    assert res["config"]["model"] == "skilllens" and info["model"] == "tiny-llama"
    assert [p.rsplit("/", 1)[-1] for p in info["edits"]] == ["na.safetensors", "ksd.safetensors"]
    assert len(info["methods"]) == 2 and info["requests"]["loglikelihood"] == 8
