"""The audit's three columns: forget / other skills / MMLU-Redux (lm-eval acc, chance flagged)."""
import json

import pytest

from skilllens.cli import main
from skilllens.core.models import load_model
from skilllens.eval.multiple_choice import evaluate_multiple_choice
from skilllens.unlearning.audit import DEFAULT_RETAIN, AuditConfig, run_audit, skill_parts
from skilllens.unlearning.columns import format_columns, three_columns
from skilllens.unlearning.key_space import KeySpaceDetector
from skilllens.unlearning.selective_pruning import SelectivePruner


def test_default_retain_set_has_general_knowledge():
    assert "mmlu-redux" in DEFAULT_RETAIN and AuditConfig().retain[-1] == "mmlu-redux"


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_mc")
    cfg = AuditConfig(model="tiny-llama", forget="gsm8k", retain=["xquad-en", "mmlu-redux"],
                      methods=["ksd", "sp"], probe_items=4, eval_items=5, out=str(out),
                      max_length=256, alpha=1.5, progress=False)
    return out, cfg, run_audit(cfg)


def test_multiple_choice_scores_equal_a_fresh_evaluation(audit):
    out, cfg, res = audit
    mc = json.loads((out / "results.json").read_text())["multiple_choice"]
    assert mc["chance"] == 0.25 and set(mc["baseline"]) == {"mmlu-redux"}
    lm = load_model("tiny-llama")
    evals = skill_parts("mmlu-redux", cfg.probe_items, cfg.eval_items, cfg.seed)[1]
    base = evaluate_multiple_choice(lm, evals, max_length=cfg.max_length, progress=False)
    assert mc["baseline"]["mmlu-redux"]["acc"] == pytest.approx(base.acc)
    assert mc["baseline"]["mmlu-redux"]["near_chance"] == base.near_chance
    sp = SelectivePruner.load(out / "sp.safetensors", lm)
    with sp.applied(lm):
        after = evaluate_multiple_choice(lm, evals, max_length=cfg.max_length, progress=False)
    assert mc["methods"]["sp"]["mmlu-redux"]["acc"] == pytest.approx(after.acc)
    ksd = KeySpaceDetector.load(out / "ksd.safetensors", lm)
    ab = evaluate_multiple_choice(lm, evals, abstainer=ksd, max_length=cfg.max_length,
                                  progress=False)
    got = mc["methods"]["ksd"]["mmlu-redux"]
    assert (got["acc"], got["n_abstained"]) == (pytest.approx(ab.acc), ab.n_abstained)
    assert got["relative"] == pytest.approx(ab.acc / base.acc if base.acc else float("nan"),
                                            nan_ok=True)


def test_three_columns_in_results_report_and_console(audit, capsys):
    out, cfg, res = audit
    rows = {r["state"]: r for r in three_columns(res)}
    assert set(rows) == {"baseline", "ksd", "sp"}
    assert rows["sp"]["forget"] == pytest.approx(res["methods"]["sp"]["relative"]["gsm8k"],
                                                 nan_ok=True)
    assert rows["sp"]["other"] == pytest.approx(res["methods"]["sp"]["relative"]["xquad-en"],
                                                nan_ok=True)   # mmlu-redux is its own column
    assert "Forget / other skills / mmlu-redux" in (out / "report.md").read_text()
    lines = format_columns(res)
    assert "mmlu-redux acc" in lines[0] and len(lines) == 2 + 3
    code = main(["audit", "--model", "tiny-llama", "--probe-items", "3", "--eval-items", "3",
                 "--methods", "sp", "--max-length", "128", "--out", str(out / "cli"),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "mmlu-redux acc (relative)" in printed and "other" in printed
