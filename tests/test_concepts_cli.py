"""``skilllens concepts`` end to end on a tiny model, bad input, and one SmolLM2 check."""
import json
import warnings

import pytest
import torch

from skilllens.cli import main


def test_cli_tiny_end_to_end(tmp_path, data_dir):
    out = tmp_path / "cv"
    rc = main(["concepts", "--model", "tiny-llama", "--data-dir", str(data_dir), "--max-concepts", "2",
               "--max-new-tokens", "3", "--unrelated", "4", "--questions", "4", "--candidates", "2",
               "--attr-candidates", "2", "--max-vectors", "2", "--compare", "needle,npo", "--steps", "1", "--completions", "1",
               "--min-gain", "-1", "--min-unrelated-agreement", "0", "--min-unrelated-bleu", "0",
               "--probes", "role_play", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["concept"] for r in res["concepts"]] == ["Poland", "Italy"]
    r = res["concepts"][0]
    for key in ("concept", "layer", "index", "top_tokens", "concept_qa", "unrelated_qa", "intrinsic"):
        assert key in r
    assert set(r["concept_qa"]) >= {"bleu", "rougeL"} and r["unrelated_qa"]["n"] == 2  # held out
    assert r["concept_qa"]["n"] == 2 and r["selection"]["concept_qa"]["n"] == 2
    assert r["intrinsic"]["cosine"] == 0.0  # zeroed vectors (the default method)
    assert 1 <= len(r["vectors"]) <= 2 and len(r["control"]["vectors"]) == len(r["vectors"])
    assert sorted(r["split"]["concept_qa"]["selection"] + r["split"]["concept_qa"]["held_out"]) == [0, 1, 2, 3]
    assert res["settings"]["held_out"] == 0.5 and res["settings"]["method"] == "zero"
    assert set(r["comparison"]) == {"needle", "npo"} and "role_play" in r
    for name in ("top_tokens", "layers", "before_after", "comparison"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").exists()
    report = (out / "report.md").read_text()
    assert "| Poland |" in report and "held-out concept BLEU" in report and "Selection" in report


def test_cli_bad_input(tmp_path, capsys):
    assert main(["concepts", "--model", "tiny-llama", "--sigma", "0", "--out", str(tmp_path)]) == 2
    assert "sigma must be > 0" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"name": "X", "questions": ["q?"]}))
    assert main(["concepts", "--model", "tiny-llama", "--concepts", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "unrelated_questions" in err and "missing field" in err
    assert main(["concepts", "--model", "tiny-llama", "--method", "ga", "--compare", "dance",
                 "--out", str(tmp_path)]) == 2
    assert "unknown method 'dance'" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_medical_vector_is_causal(smollm2, data_dir):
    """On SmolLM2 the search finds a 'medical' vector for the NHS concept in the last layer,
    and zeroing it hurts the NHS answers more than unrelated ones; weights restored exactly."""
    from skilllens.concepts import BehaviourSuite, ConceptAblation, ConceptSearch, load_concepts

    cs = load_concepts(None, data_dir)
    nhs = next(c for c in cs if c.name == "National Health Service")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ConceptSearch(k=50, n_candidates=3, layers=[29]).fit(smollm2, cs, progress=False)
    best = s.best(nhs.name)
    assert {" medical", " patients", " patient", " doctor"} & set(best.top_tokens)
    suite = BehaviourSuite(nhs, max_new_tokens=8, n_unrelated=6, n_questions=6).fit(smollm2)
    key = "model.layers.29.mlp.down_proj.weight"
    before = smollm2.model.state_dict()[key].clone()
    with ConceptAblation(best.layer, best.index, "zero").fit(smollm2).applied(smollm2):
        drop = suite.logprob_drop(smollm2)
    assert torch.equal(smollm2.model.state_dict()[key], before)
    assert drop["concept_qa"] > drop["unrelated_qa"]


def test_deprecated_flags_still_parse(tmp_path, capsys):
    """Old scripts pass --validate/--multi: accepted with a note; a bad --multi is a clear error."""
    from skilllens.cli import main
    assert main(["concepts", "--model", "tiny-llama", "--multi", "0", "--out", str(tmp_path)]) == 2
    assert "--max-vectors" in capsys.readouterr().err
