"""The audit report as a reader sees it: neuron views of distinct top neurons per method,
paper figures with real histograms and captions, and report.html opened in headless Chromium at
a phone and a desktop viewport (screenshots kept under tests/artifacts/)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from skilllens.unlearning.audit import AuditConfig, run_audit

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def audit(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("audit_report")
    cfg = AuditConfig(model="tiny-llama", probe_items=4, eval_items=3, out=str(out),
                      data_dir=str(data_dir), max_length=64, na_percent=[1.5, 3], alpha=1.5,
                      progress=False)
    res = run_audit(cfg)
    return out, res, json.loads((out / "results.json").read_text())


def test_neuron_views_show_distinct_top_neurons_of_every_method(audit):
    _, res, saved = audit
    views = saved["neuron_views"]
    keys = [(v["layer"], v["neuron"]) for v in views]
    assert len(keys) == len(set(keys))  # no FFN neuron twice, across NA percentages and sites
    by = {}
    for v in views:
        by.setdefault(v["method"], []).append(v)
    assert set(by) >= {"na-1.5%", "na-3%", "sp"} and all(len(x) == 2 for x in by.values())
    # NA at 1.5 %: its two best neurons by the selection score; NA at 3 %: the next ones
    na_top = res["neurons"]["na-1.5%"]["top"]
    assert [(v["layer"], v["neuron"]) for v in by["na-1.5%"]] == \
        [(t["layer"], t["neuron"]) for t in na_top[:2]]
    assert {(v["layer"], v["neuron"]) for v in by["na-3%"]} == \
        {(t["layer"], t["neuron"]) for t in res["neurons"]["na-3%"]["top"][2:4]}
    names = [saved["forget"], *saved["retain"]]
    for v in views:
        assert [e["skill"] for e in v["skills"]] == names
        for e in v["skills"]:
            assert sum(e["hist"]["counts"]) == e["count"] > 0
            vals = [c["value"] for c in e["contexts"]]
            assert vals == sorted(vals, reverse=True) and len(vals) == 6
        assert len(v["promoted"]) == 10


def test_report_embeds_neuron_views_and_captions(audit):
    out, _, saved = audit
    page = (out / "report.html").read_text()
    assert page.count("<section class='neuron'>") == len(saved["neuron_views"])
    assert "<mark>" in page and "Top neurons each method selected" in page
    v = saved["neuron_views"][0]
    assert f"neuron {v['neuron']} at {v['site']}, layer {v['layer']}" in page
    assert page.count("<figcaption>") == len(list((out / "figures").glob("*.svg")))
    assert "Drawn from results.json; made by:" in page and "viewport" in page
    md = (out / "report.md").read_text()
    assert "*Activation histograms (solid" in md and "| method | site | layer | neuron |" in md


def test_distribution_figure_draws_the_saved_histograms(audit, monkeypatch):
    from skilllens.unlearning import figures

    _, _, saved = audit
    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, **kw: drawn.update(fig=fig))
    figures.top_neuron_distributions(saved, Path("unused"))
    axes = [ax for ax in drawn["fig"].axes if ax.get_title()]
    assert len(axes) == len(saved["neuron_views"])
    v, ax = saved["neuron_views"][0], axes[0]
    e = v["skills"][0]
    counts = np.asarray(e["hist"]["counts"], float)
    width = (e["hist"]["hi"] - e["hist"]["lo"]) / (len(counts) - 2)
    stairs = [p for p in ax.patches if hasattr(p, "get_data")]
    np.testing.assert_allclose(stairs[0].get_data().values, counts[1:-1] / (counts.sum() * width),
                               rtol=1e-6)
    assert ax.get_xlabel() == f"{v['site']} activation (a.u.)"
    assert ax.get_ylabel().startswith("density")
    assert drawn["fig"].get_size_inches()[0] == pytest.approx(6.75)


def test_pdf_on_request(audit, tmp_path):
    from skilllens.unlearning.report import write_report

    out, _, saved = audit
    write_report(tmp_path, saved, formats=("png", "svg", "pdf"))
    assert (tmp_path / "figures" / "detector_roc.pdf").read_bytes()[:4] == b"%PDF"


def _browser():
    from _browser import Browser, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does this)")
    b = None
    try:
        b = Browser()
        b.send("Browser.getVersion")  # it started and answers over the DevTools pipe
        return b
    except Exception as e:  # pragma: no cover - depends on the machine
        if b is not None:
            b.close()
        pytest.skip(f"Chromium could not start: {e}")


@pytest.mark.parametrize("width,height,name", [(390, 844, "phone"), (1280, 900, "desktop")])
def test_report_html_in_a_real_browser(audit, width, height, name):
    out, _, saved = audit
    with _browser() as b:
        got = b.visit(out / "report.html", width, height,
                      screenshot=ARTIFACTS / f"report-{name}.png")
    print(f"screenshot: {ARTIFACTS / f'report-{name}.png'}")
    assert got["errors"] == [] and got["broken"] == []
    n_fig = len(list((out / "figures").glob("*.svg")))
    assert got["figures"] == got["captions"] == n_fig >= 4
    assert got["images"] == n_fig + len(saved["neuron_views"])  # + one histogram per view
    assert got["tables"] >= 4 and got["marks"] > 0
    # readable: the page is laid out for this width (no sideways page scroll), text >= 12 px
    assert got["viewport"] == width and got["page_width"] <= width
    assert got["too_wide_images"] == 0 and got["font_px"] >= 12
    assert (ARTIFACTS / f"report-{name}.png").stat().st_size > 10_000


def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><img src='missing.png'><script>console.error('x')</script>"
                    "</body></html>")
    with _browser() as b:
        got = b.visit(page, 390, 844)
    assert got["broken"] == ["missing.png"] and any("console: x" in e for e in got["errors"])
    assert got["viewport"] != 390  # no viewport meta: a phone lays it out 980 px wide
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_old_results_without_histograms_still_show_distinct_neurons():
    """results.json written before the neuron views: Gaussians only, but no neuron repeated
    across methods (the old figure drew the same four neurons for every NA percentage)."""
    from skilllens.unlearning.figures import _gaussian_panels

    top = [{"layer": 1, "neuron": n, "score": 1.0 / (n + 1), "mu_f": 1.0, "sd_f": 1.0,
            "mu_r": 0.0, "sd_r": 1.0} for n in range(6)]
    res = {"neurons": {"na-1%": {"site": "gate", "top": top},
                       "na-3%": {"site": "gate", "top": top}}}
    titles = [t for t, _ in _gaussian_panels(res)]
    assert titles == ["na-1%: gate L1 n0", "na-1%: gate L1 n1", "na-3%: gate L1 n2",
                      "na-3%: gate L1 n3"]
