"""Rich displays: every object a notebook user holds renders as HTML whose CONTENT is checked
(names, counts, hashes, AUC), embeds its images inline, and has a readable text repr."""
from __future__ import annotations

import re

import pytest
import torch

import skilllens
from skilllens.display import Display, esc, table, text_table

FORGET = ["2+2=4", "3*3=9", "5-1=4", "7+1=8"]
RETAIN = ["the cat sat", "a dog ran", "hello there", "birds can fly"]


@pytest.fixture(scope="module")
def lm():
    return skilllens.load_model("tiny-llama")


def _images_inline(h: str) -> list[str]:
    srcs = re.findall(r"<img src='([^']*)'", h)
    assert all(s.startswith("data:image/") for s in srcs), srcs  # nothing external
    return srcs


def test_html_helpers_escape_and_save(tmp_path):
    h = table(["a<b"], [["<script>x</script>"]])
    assert "<script>" not in h and esc("<script>x</script>") in h
    assert text_table(["n", "v"], [[1, 22]]).splitlines() == ["n  v", "1  22"]
    d = Display("<p>hi</p>", "hi", title="t")
    page = d.save(tmp_path / "d.html").read_text()
    assert page.startswith("<!doctype html>") and "<p>hi</p>" in page and "viewport" in page


def test_loaded_model_display(lm):
    h, r = lm._repr_html_(), repr(lm)
    fp = lm.fingerprint["id"]
    for needle in ("llama", ">2<", ">32<", ">64<", "gate, up, key, value", "float32", "cpu", fp):
        assert needle in h, needle
    assert r.startswith("LoadedModel('tiny-llama': llama, 2 layers, d_model 32, d_ff 64")
    assert fp in r and "Linear" not in r  # not the dataclass dump of the whole module


def test_stats_collection_and_neuron_stats_display(lm):
    sc = skilllens.collect(lm, RETAIN, sites=["gate", "key"], progress=False)
    h = sc._repr_html_()
    assert "<td>gate</td>" in h and "<td>key</td>" in h and "2 (0..1)" in h
    assert sc.meta["data_hash"][:12] in h and f"{sc.meta['n_tokens']}" in h
    assert len(_images_inline(h)) == 1 and "one panel per layer" in h
    h_abs = sc.display(stat="mean_abs", site="key")._repr_html_()
    assert "mean_abs per neuron, site key" in h_abs
    assert repr(sc).splitlines()[0].startswith("StatsCollection('texts', 4 site/layer")
    st = sc["gate", 1]
    hs = st._repr_html_()
    assert "64 neurons" in hs and f"{float(st.mean.max()):.4g}" in hs and _images_inline(hs)
    assert repr(st).startswith("NeuronStats(d=64")


def test_fitted_neuron_adjuster_and_pruner_name_their_selection(lm):
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.selective_pruning import SelectivePruner

    assert "not fitted" in NeuronAdjuster()._repr_html_()
    for m in (NeuronAdjuster(percent=5), SelectivePruner(percent=5)):
        m.fit(lm, FORGET, RETAIN, progress=False)
        h = m._repr_html_()
        per_layer = m.selected_per_layer()
        assert f"{m.n_selected} {m.site} neurons selected" in h
        for l, n in per_layer.items():  # the per-layer table: one row per layer with its count
            assert f"<tr><td>{l}</td><td>{n}</td></tr>" in h
        assert m.meta_["forget_hash"][:16] in h and m.meta_["retain_hash"][:16] in h
        assert lm.fingerprint["id"] in h and len(_images_inline(h)) == 1
        assert f"<td>percent</td><td>{m.percent}</td>" in h


def test_na_display_lists_top_neurons_with_gaussians(lm):
    from skilllens.unlearning.display import estimator_display
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    na = NeuronAdjuster(percent=5).fit(lm, FORGET, RETAIN, progress=False)
    best = na.top_neurons(1)[0]
    d = estimator_display(na)
    assert f"<td>{best['layer']}</td><td>{best['neuron']}</td><td>{best['score']:.4g}</td>" in d.html
    assert "selected per layer: " + ", ".join(f"L{l}:{n}" for l, n in
                                             na.selected_per_layer().items()) in d.text


def test_display_reads_renamed_fitted_attributes(lm):
    """After the trailing-underscore renaming (``selected_``, ``scores_``...) the display still
    finds the selection."""
    from skilllens.unlearning.display import _top_rows
    from skilllens.unlearning.selective_pruning import SelectivePruner

    sp = SelectivePruner(percent=5).fit(lm, FORGET, RETAIN, progress=False)

    class Renamed:
        selected_, scores_, fitted_layers_ = sp.selected_, sp.scores_, sp.fitted_layers_
    assert _top_rows(Renamed())[1] == _top_rows(sp)[1] != []


def test_key_space_detector_and_report_display(lm):
    from skilllens.unlearning.key_space import KeySpaceDetector

    ksd = KeySpaceDetector(alpha=3.0).fit(lm, FORGET, progress=False)
    ksd.calibrate(lm, RETAIN)
    h = ksd._repr_html_()
    assert f"{ksd.k_:.6g}" in h and "Detector calibration" in h
    assert f"calibrated on {len(RETAIN)} retain probe queries" in h
    assert ksd.meta_["forget_hash"][:16] in h
    rep = ksd.evaluate_detection(lm, FORGET, RETAIN)
    hr = rep._repr_html_()
    assert f"AUC {rep.auc:.4f}" in hr and f"{rep.tpr:.3f}" in hr and len(_images_inline(hr)) == 1
    for d in rep.top_deciding_dims[:12]:
        assert f"<tr><td>{d['dim']}</td><td>{d['n_rejected']}</td></tr>" in hr
    assert repr(rep).startswith(f"DetectorReport(AUC {rep.auc:.4f}") and "roc_fpr" not in repr(rep)


def test_audit_results_display_the_tables():
    from skilllens.unlearning.display import AuditResults

    res = AuditResults({
        "model": "m", "forget": "f", "retain": ["r"], "metric": "token_accuracy",
        "baseline": {"f": {"score": 0.5, "n_items": 2}, "r": {"score": 0.8, "n_items": 2}},
        "methods": {"na": {"scores": {"f": {"score": 0.1}, "r": {"score": 0.72}},
                           "relative": {"f": 0.2, "r": 0.9}}}})
    h = res._repr_html_()
    assert "<td>baseline</td><td>0.500</td><td>0.800</td>" in h
    assert "<td>na</td><td>0.200</td><td>0.900</td>" in h and "Relative performance" in h
    assert "na     0.200       0.900" in repr(res) and res["forget"] == "f"  # still the plain dict


def test_concept_search_and_ablation_display(lm):
    from skilllens.concepts.ablation import ConceptAblation
    from skilllens.concepts.search import Candidate, ConceptSearch

    s = ConceptSearch(k=5, n_candidates=2)
    s.candidates_ = {"Paris": [Candidate("Paris", 1, 7, 2.5, 0.4, ["Paris", "<France>", "Seine"]),
                               Candidate("Paris", 0, 3, 1.0, 0.2, ["Eiffel"])]}
    h = s._repr_html_()
    assert "<h4>Paris</h4>" in h and "Paris | &lt;France&gt; | Seine" in h
    assert "<td>1</td><td>1</td><td>7</td><td>2.5</td>" in h
    assert "Paris" in repr(s) and "Eiffel" in repr(s)
    abl = ConceptAblation(1, 5, method="zero").fit(lm)
    ha = abl._repr_html_()
    assert "<td>layer</td><td>1</td>" in ha and "|v| after</td><td>0</td>" in ha
    assert lm.fingerprint["id"] in ha and "fitted" in repr(abl)


def test_graft_localizer_display():
    from skilllens.grafting.localizer import GraftFitResult, GraftLocalizer

    loc = GraftLocalizer(sparsity=0.01, steps=0)
    assert "not fitted" in loc._repr_html_() and "not fitted" in repr(loc)
    loc.masks_ = {"layers.0.mlp.up_proj.weight": torch.tensor([[True, False], [True, True]])}
    loc.result_ = GraftFitResult(0.01, 0.3, 10, 3, 3, 0)
    loc.meta_ = {"task": {"name": "toy"}, "fingerprint": {"id": "abc"}}
    h = loc._repr_html_()
    assert "<td>layers.0.mlp.up_proj.weight</td><td>3</td><td>7.50e-01</td>" in h
    assert "3 / 10" in h and "abc" in h and "toy" in h
