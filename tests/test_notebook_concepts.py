"""Execute notebooks/concept_vectors.ipynb top to bottom on tiny-llama, in a temporary working
directory (the notebook's results folder lands there, never in the repository)."""
import json

from _notebooks import REPO, read_notebook


def test_concept_vectors_notebook_is_committed_without_outputs():
    nb = read_notebook("concept_vectors.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert 'MODEL = "tiny-llama"' in code[0].source


def test_concept_vectors_notebook_runs(tmp_path, run_notebook):
    stray = [REPO / "concept_vectors_run", REPO / "notebooks" / "concept_vectors_run"]
    existed = [p.exists() for p in stray]
    run = run_notebook("concept_vectors.ipynb", cwd=tmp_path, timeout=300)
    outputs = run.outputs
    assert not run.errors
    assert "restored exactly: True" in run.text
    assert "model unchanged after fitting and applying: True" in run.text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("ConceptSearch:" in h and "<h4>Poland</h4>" in h and "top tokens" in h
               for h in run.html)

    out = tmp_path / "concept_vectors_run"
    assert (out / "concept_vectors.png").stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "tiny-llama" and res["reversible"] is True
    assert [r["concept"] for r in res["concepts"]] == ["Poland", "Italy"]  # dev split order
    st = res["settings"]
    for r in res["concepts"]:
        assert 0 <= r["layer"] < 2 and 0 <= r["index"] < 64
        assert 1 <= len(r["vectors"]) <= st["max_vectors"] and [r["layer"], r["index"]] == r["vectors"][0]
        assert r["top_tokens"] and st["n_candidates"] <= len(r["screening"]) <= st["n_candidates"] + st["n_attr"]
        gains = [s["gain"] for s in r["screening"]]
        assert gains == sorted(gains, reverse=True)
        for qa in ("concept_qa", "unrelated_qa"):
            assert 0.0 <= r["ablation"][qa]["bleu"] <= 1.0 and 0.0 <= r["ablation"][qa]["rougeL"] <= 1.0
            sp = r["split"][qa]
            assert not set(sp["selection"]) & set(sp["held_out"])
            assert r["ablation"][qa]["n"] == len(sp["held_out"]) == round(st["held_out"] * 4)
        assert [v[0] for v in r["control"]["vectors"]] == [v[0] for v in r["vectors"]]
    unl = res["unlearning"]
    assert (unl["layer"], unl["index"]) == (res["concepts"][0]["layer"], res["concepts"][0]["index"])
    assert set(unl["methods"]) == {"needle", "ga"}
    for m in unl["methods"].values():
        assert {"cosine", "l2", "jaccard_top", "article_share_after"} <= set(m["intrinsic"])
        assert {"concept_qa", "unrelated_qa", "logprob_drop"} <= set(m)
        assert len(m["losses"]) >= res["settings"]["unlearn_steps"]
    # Needle replaces the vector by noise + ascent: it moves much further than GA's small step
    assert unl["methods"]["needle"]["intrinsic"]["l2"] > unl["methods"]["ga"]["intrinsic"]["l2"]
    assert [p.exists() for p in stray] == existed  # nothing written into the repository
