"""A baseline of 0 makes ``relative`` undefined (issue 21 item 5): NaN in results, "undefined:
baseline 0" in reports, and the audit warns about baselines at/near 0 or at chance."""
import json
import math

import pytest

from skilllens.data import Item
from skilllens.eval import SkillScore, relative
from skilllens.eval.scores import baseline_warnings, chance_level, format_relative
from skilllens.unlearning.report import render_markdown


@pytest.mark.parametrize("metric", ["token_accuracy", "exact_match", "pass@1", "f1", "nll"])
def test_zero_baseline_is_nan_not_forgotten(metric):
    # a method that changed nothing (0 -> 0) must not read as "fully forgotten" (<= 0.2)
    r = relative(0.0, 0.0, metric)
    assert math.isnan(r) and not r <= 0.2
    assert math.isnan(relative(0.4, 0.0, metric))
    assert relative(0.2, 0.4, metric) == pytest.approx(0.5 if metric != "nll" else 2.0)


def _score(name, score, metric="exact_match", n=4):
    return SkillScore(name, metric, score, score, float("nan"), n, 0,
                      higher_is_better=metric != "nll", abstain_nll=9.0)


def test_baseline_warnings_near_zero_and_chance():
    mc = [Item(f"m{i}", "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:", " B", {"answer": "B"})
          for i in range(4)]
    free = [Item(f"f{i}", "Q?", " 42", {}) for i in range(4)]
    assert chance_level(mc, "exact_match") == 0.25 and chance_level(free, "exact_match") == 0
    base = {"gsm8k": _score("gsm8k", 0.0), "near": _score("near", 0.03),
            "mmlu": _score("mmlu", 0.27), "good": _score("good", 0.6),
            "mmlu-good": _score("mmlu-good", 0.7)}
    w = baseline_warnings(base, {"gsm8k": free, "near": free, "mmlu": mc, "good": free,
                                 "mmlu-good": mc})
    assert len(w) == 3
    assert "'gsm8k'" in w[0] and "undefined: baseline 0" in w[0]
    assert "'near'" in w[1] and "near 0" in w[1]
    assert "'mmlu'" in w[2] and "at chance (0.25)" in w[2]
    nll = {"flat": _score("flat", 8.9, "nll"), "ok": _score("ok", 2.0, "nll")}
    w = baseline_warnings(nll, {})
    assert len(w) == 1 and "'flat'" in w[0] and "at chance" in w[0]


def test_report_says_undefined_baseline_0():
    assert format_relative(float("nan"), 0.0) == "undefined: baseline 0"
    assert format_relative(None, 0.5) == "n/a" and format_relative(0.25, 0.5) == "0.250"
    res = {"model": "m", "forget": "gsm8k", "retain": ["x"], "metric": "exact_match",
           "baseline": {"gsm8k": {"score": 0.0, "n_truncated": 0},
                        "x": {"score": 0.5, "n_truncated": 0}},
           "methods": {"na": {"scores": {"gsm8k": {"score": 0.0}, "x": {"score": 0.5}},
                              "relative": {"gsm8k": relative(0.0, 0.0, "exact_match"),
                                           "x": relative(0.5, 0.5, "exact_match")}}},
           "warnings": ["baseline exact_match of 'gsm8k' is 0.000"]}
    md = render_markdown(json.loads(json.dumps(res)), [])  # NaN survives the JSON round trip
    row = [ln for ln in md.splitlines() if ln.startswith("| na |")][-1]
    assert "undefined: baseline 0" in row and "1.000" in row
    assert "**Warning:** baseline exact_match of 'gsm8k'" in md


def test_audit_warns_and_records_nan(tmp_path, data_dir, recwarn):
    from skilllens.unlearning.audit import AuditConfig, run_audit

    cfg = AuditConfig(model="tiny-llama", forget="xquad-de", retain=["xquad-en"],
                      methods=["ksd"], probe_items=2, eval_items=1, out=str(tmp_path),
                      data_dir=str(data_dir), max_length=48, metric="exact_match",
                      progress=False)
    res = run_audit(cfg)  # a random tiny model answers nothing right: every baseline is 0
    assert all(b["score"] == 0 for b in res["baseline"].values())
    assert all(math.isnan(r) for r in res["methods"]["ksd"]["relative"].values())
    assert len(res["warnings"]) == 2
    assert any("undefined: baseline 0" in str(w.message) for w in recwarn.list)
    md = (tmp_path / "report.md").read_text()
    assert md.count("undefined: baseline 0") >= 2
