"""The audit pipeline on a tiny random model: results.json fields, figures, report, bad input."""
import json

import pytest

from skilllens.unlearning.audit import AuditConfig, run_audit, skill_parts, with_abstention
from skilllens.cli import main
from skilllens.errors import SkillLensError
from skilllens.eval import SkillScore


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("audit")
    cfg = AuditConfig(model="tiny-llama", forget="xquad-de", retain=["xquad-en", "xquad-es"],
                      probe_items=3, eval_items=3, out=str(out), data_dir=str(data_dir),
                      max_length=64, na_percent=[1.5, 3], alpha=1.5, progress=False)
    return out, run_audit(cfg)


def test_results_json_has_the_documented_fields(audit_dir):
    out, res = audit_dir
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"model", "forget", "retain", "metric", "baseline", "methods",
                          "detector", "manifest", "language_matrix"}
    assert saved["forget"] == "xquad-de" and saved["retain"] == ["xquad-en", "xquad-es"]
    assert set(saved["methods"]) == {"ksd", "na-1.5%", "na-3%", "sp"}
    for m in saved["methods"].values():
        assert set(m) >= {"params", "scores", "relative"}
        assert set(m["scores"]) == {"xquad-de", "xquad-en", "xquad-es"}
        for s, r in m["relative"].items():
            b = saved["baseline"][s]["score"]
            assert r == pytest.approx(m["scores"][s]["score"] / b if b else float("nan"),
                                      nan_ok=True)
    assert saved["methods"]["na-3%"]["params"]["percent"] == 3.0
    assert saved["neurons"]["na-3%"]["n_selected"] == round(0.03 * 2 * 64)
    sweep = {round(r["alpha"], 6): r for r in saved["methods"]["ksd"]["alpha_sweep"]}
    params = saved["methods"]["ksd"]["params"]
    cal = params["calibration"]  # searched over (0, cap], not narrowed from --alpha 1.5
    assert cal["alpha_cap"] == 100.0 and params["alpha"] == cal["alpha"]
    assert 0 < params["alpha"] <= cal["alpha_feasible_max"] <= 100.0
    assert cal["retain_probe_fpr"] <= 0.05  # default max FPR on the probes
    assert cal["n_forget_probe"] == 3 and cal["n_retain_probe"] == 6
    assert any(c["alpha"] == cal["alpha"] for c in cal["curve"])
    for s in ("xquad-de", "xquad-en", "xquad-es"):  # which part, how many of how many
        d = saved["data"][s]
        assert d["probe"].startswith("probe part: 3 sampled of its ") and d["n_eval"] == 3
        assert d["eval"].startswith("eval part: 3 sampled of its ")
    assert sweep[round(params["alpha"], 6)]["relative"] == saved["methods"]["ksd"]["relative"]
    rates = [r["abstention_rate"]["xquad-de"] for r in saved["methods"]["ksd"]["alpha_sweep"]]
    assert rates == sorted(rates)  # a wider cube never abstains on fewer queries
    det = saved["detector"]
    assert 0 <= det["auc"] <= 1 and len(det["retain_rejecting_dims"]) == 6
    man = saved["manifest"]
    assert man["model_fingerprint"]["id"] and man["versions"]["torch"]
    assert set(man["data"]) == {"xquad-de", "xquad-en", "xquad-es"}
    assert man["data"]["xquad-de"]["probe_hash"] != man["data"]["xquad-de"]["eval_hash"]
    assert saved["language_matrix"]["tested"] == ["xquad-de", "xquad-en", "xquad-es"]


def test_figures_and_reports_are_written(audit_dir):
    out, _ = audit_dir
    for name in ("relative_performance", "neurons_per_layer", "top_neuron_distributions",
                 "detector_roc", "language_matrix"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Reproducibility manifest" in md and "model_fingerprint" in md
    assert "figures/relative_performance.png" in md
    assert "KSD calibration curve" in md and "(chosen)" in md and "probe part: 3 sampled" in md
    assert "<table>" in (out / "report.html").read_text()


def test_probe_and_eval_items_never_overlap(data_dir):
    for spec in ("gsm8k", "humaneval", "xquad-en"):
        probe, evals = skill_parts(spec, 30, 30, 0, data_dir)
        assert not {i.id for i in probe} & {i.id for i in evals}
        assert not {i.prompt for i in probe} & {i.prompt for i in evals}


def test_with_abstention_zeroes_abstained_items():
    rows = [{"id": str(i), "abstained": False, "score": s, "accuracy": s, "nll": 1.0 + i}
            for i, s in enumerate([0.5, 0.7, 0.9])]
    base = SkillScore("x", "token_accuracy", 0.7, 0.7, 2.0, 3, 0, rows, abstain_nll=5.0)
    got = with_abstention(base, [True, False, False])
    assert got.score == pytest.approx((0.7 + 0.9) / 3)
    # defect 11: the abstained item costs abstain_nll; it used to vanish from the NLL mean (2.5)
    assert got.nll == pytest.approx((5.0 + 2.0 + 3.0) / 3) and got.n_abstained == 1
    assert got.nll_answered == pytest.approx(2.5)
    nll_base = SkillScore("x", "nll", 2.0, 0.7, 2.0, 3, 0, rows, higher_is_better=False,
                          abstain_nll=5.0)
    nll = with_abstention(nll_base, [True, False, False])
    assert nll.score == pytest.approx(10.0 / 3) and not nll.higher_is_better


def test_nll_audit_relative_is_below_one_when_worse(data_dir, tmp_path):
    """An NLL audit: relative is before/after, so a higher (worse) NLL reads < 1 (it was
    after/before, > 1, i.e. "better"); abstained items cost log(V); truncation is counted."""
    cfg = AuditConfig(model="tiny-llama", forget="xquad-de", retain=["xquad-en"],
                      methods=["ksd"], probe_items=4, eval_items=4, out=str(tmp_path),
                      data_dir=str(data_dir), max_length=48, metric="nll", alpha=5.0,
                      ksd_calibrate=False, progress=False)
    res = run_audit(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "before / score after" in saved["relative_definition"]
    assert "log(V)" in saved["abstention"]
    ksd = saved["methods"]["ksd"]
    for s in ("xquad-de", "xquad-en"):
        b, a = saved["baseline"][s], ksd["scores"][s]
        assert b["n_truncated"] == 4 and b["higher_is_better"] is False  # 48 tokens < XQuAD
        assert ksd["relative"][s] == pytest.approx(b["score"] / a["score"])
        assert (ksd["relative"][s] < 1) == (a["score"] > b["score"])
        assert a["n_abstained"] == 0 or a["score"] != b["score"]
    assert any(ksd["scores"][s]["n_abstained"] for s in ksd["scores"]), res["detector"]


@pytest.mark.parametrize("kw, match", [
    (dict(forget="gsm8k", retain=["gsm8k"]), "both the forget"),
    (dict(retain=[]), "no retain"),
    (dict(methods=["ksd", "magic"]), "unknown method"),
    (dict(alpha=0.0), "alpha"),
    (dict(na_percent=[0.0]), r"\(0, 100\]"),
    (dict(sp_percent=120), r"\(0, 100\]"),
])
def test_bad_input_is_rejected_with_a_clear_message(kw, match):
    with pytest.raises(SkillLensError, match=match):
        AuditConfig(model="tiny-llama", **kw).check()


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "examples:" in capsys.readouterr().out
    assert main(["audit", "--model", "tiny-llama", "--forget", "gsm8k", "--retain", "gsm8k"]) == 2
    assert "forget skill and a retain skill" in capsys.readouterr().err


def test_language_matrix_with_calibrated_ksd(tmp_path, data_dir):
    from skilllens.unlearning.audit import run_language_matrix
    langs = ["xquad-en", "xquad-de", "xquad-es"]
    res = run_language_matrix(langs, tmp_path, model="tiny-llama", methods=("ksd",),
                              probe_items=4, eval_items=3, alphas=(1.0,), data_dir=str(data_dir),
                              max_length=64, progress=False, calibrate_max=3.0)
    assert set(res["methods"]) == {"ksd@1", "ksd@auto"}
    for rows in res["methods"].values():
        assert len(rows) == 3 and all(len(r) == 3 for r in rows)
        # KSD only abstains; NaN: a baseline of 0 (relative undefined)
        assert all(v != v or 0.0 <= v <= 1.0 + 1e-9 for r in rows for v in r)
    chosen = res["params"]["calibrated_alpha"]
    assert set(chosen) == set(langs) and all(0 < a <= 3.0 for a in chosen.values())
    assert (tmp_path / "language_matrix.json").exists()
    assert (tmp_path / "language_matrix.png").stat().st_size > 1000


def test_audit_ksd_equals_a_ksd_fitted_on_its_own(audit_dir, data_dir):
    """The audit reads KSD's probe queries from the statistics pass (store_tokens="last");
    the detector must be the one KSD's own prompt-only query passes give."""
    import torch
    from skilllens import load_model
    from skilllens.unlearning.key_space import KeySpaceDetector

    out, res = audit_dir
    lm = load_model("tiny-llama")
    parts = {s: skill_parts(s, 3, 3, 0, str(data_dir)) for s in ("xquad-de", "xquad-en",
                                                                 "xquad-es")}
    own = KeySpaceDetector(alpha=1.5, max_length=64).fit(lm, parts["xquad-de"][0],
                                                         progress=False)
    own.calibrate_vectors(torch.cat([own.query_vectors(lm, parts[s][0])
                                     for s in ("xquad-en", "xquad-es")]))
    saved = KeySpaceDetector.load(out / "ksd.safetensors", model=lm)
    assert saved.alpha == pytest.approx(own.alpha, rel=1e-6)
    torch.testing.assert_close(saved.m_, own.m_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved.s_, own.s_, rtol=1e-5, atol=1e-6)
    assert saved.k_ == pytest.approx(own.k_, rel=1e-5)
    assert res["manifest"]["timing_s"]["probe_statistics"] > 0
