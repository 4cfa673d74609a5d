"""Key Space Detection: the cube, k, ROC/FPR, deciding dimensions, abstention before generation."""
import numpy as np
import pytest
import torch

from skilllens import load_model
from skilllens.data import Item
from skilllens.errors import FingerprintMismatchError, SkillLensError
from skilllens.eval import evaluate
from skilllens.unlearning.key_space import KeySpaceDetector, exact_k, search_k


def _probe(seed=0, n=30, d=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (0.2 + torch.rand(d, generator=g)) + 1.5


def test_binary_search_k_agrees_with_exact_k_and_bounds_the_probes():
    v = _probe()
    ksd = KeySpaceDetector(alpha=1.0).fit_vectors(v)
    m, s = v.double().mean(0), v.double().std(0, correction=0)
    ref = float(((v.double() - m).abs() / s).max())     # float64 reference
    assert ksd.k_ == pytest.approx(ref, rel=1e-6)
    assert ksd.k_exact_ == pytest.approx(ref, rel=1e-6)
    assert search_k(v, m, s) == pytest.approx(exact_k(v, m, s), rel=1e-7)
    assert bool(ksd.inside(v).all())                     # every probe inside at alpha = 1
    assert not bool(ksd.inside(v, alpha=0.99).all())     # k is the smallest such scale


def test_zero_std_dimensions_are_guarded():
    v = _probe(d=6)
    v[:, 2] = 0.7                                        # a constant dimension: s == 0
    ksd = KeySpaceDetector(alpha=1.0).fit_vectors(v)
    assert ksd.n_degenerate_dims == 1
    assert torch.isfinite(torch.tensor(ksd.k_)) and bool(ksd.inside(v).all())
    assert torch.isfinite(ksd.scores(v + 1)).all()


def test_report_roc_fpr_and_deciding_dimensions():
    g = torch.Generator().manual_seed(4)
    v = _probe(n=40, d=20)
    ksd = KeySpaceDetector(alpha=1.2).fit_vectors(v)
    forget = v.mean(0) + 0.5 * (v[:25] - v.mean(0)) + 0.05 * torch.randn(25, 20, generator=g)
    retain = v.mean(0) + 3 * torch.randn(30, 20, generator=g) * v.std(0)
    retain[:3] = forget[:3] * 1.001                      # a few retain queries look in-skill
    rep = ksd.report(forget, retain, top_dims=5)
    # independent references: Mann-Whitney AUC, counts of inside / outside per dim
    dev = lambda x: ((x.double() - ksd.m_).abs() / (ksd.k_ * ksd.s_))  # noqa: E731
    sf, sr = dev(forget).max(1).values, dev(retain).max(1).values
    auc = np.mean([(a < b) + 0.5 * (a == b) for a in sf.tolist() for b in sr.tolist()])
    assert rep.auc == pytest.approx(auc)
    assert rep.fpr == pytest.approx(float((sr <= 1.2).double().mean()))
    assert rep.tpr == pytest.approx(float((sf <= 1.2).double().mean()))
    assert rep.fpr >= 3 / 30
    per_query = (dev(retain) > 1.2).sum(1)
    assert rep.retain_rejecting_dims == per_query.tolist()
    per_dim = (dev(retain) > 1.2).sum(0)
    assert rep.top_deciding_dims[0]["n_rejected"] == int(per_dim.max())
    assert len(rep.roc_fpr) == len(rep.roc_tpr) == len(rep.roc_thresholds)


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), "big"])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(SkillLensError, match="alpha"):
        KeySpaceDetector(alpha=alpha)


PROBES = ["What is 12 plus 7?", "Compute 3 times 4.", "What is 100 minus 1?", "Half of 8 is?"]


def test_decides_on_the_prompt_only(tiny_llama):
    ksd = KeySpaceDetector(alpha=1.0).fit(tiny_llama, PROBES, progress=False)
    a = [Item("a", "What is 12 plus 7?", " 19"), Item("b", "What is 12 plus 7?", " 20 or so")]
    v = ksd.query_vectors(tiny_llama, a)
    assert torch.equal(v[0], v[1])
    assert ksd.abstains(tiny_llama, a).tolist() == [True, True]


def test_abstention_happens_before_generation_and_costs_no_generation(tiny_llama):
    lm = tiny_llama
    ksd = KeySpaceDetector(alpha=1.0).fit(lm, PROBES, progress=False)
    import skilllens.eval.generation as gen
    calls, heads = [], []
    original = gen._greedy_batch
    handle = lm.model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    try:
        gen._greedy_batch = lambda *a: calls.append(1) or original(*a)
        out = ksd.generate(lm, [PROBES[0], "zzzz qqqq !!!! ####"], max_new_tokens=3)
        assert out[0] == "I cannot help with that."
        assert len(calls) == int(not ksd.abstains(lm, ["zzzz qqqq !!!! ####"])[0])
        heads.clear()
        items = [Item(f"p{i}", p, " 42") for i, p in enumerate(PROBES)]
        score = evaluate(lm, items, abstainer=ksd, progress=False)
        assert score.n_abstained == len(items) and score.score == 0.0
        assert heads == []          # the decision pass stops before the LM head; nothing scored
    finally:
        handle.remove()
        gen._greedy_batch = original


def test_save_load_and_fingerprint(tiny_llama, tmp_path):
    ksd = KeySpaceDetector(alpha=1.5, layer=0).fit(tiny_llama, PROBES, progress=False)
    path = ksd.save(tmp_path / "ksd.safetensors")
    back = KeySpaceDetector.load(path, tiny_llama)
    assert back.k_ == ksd.k_ and back.alpha == 1.5 and back.layer == 0
    assert torch.equal(back.abstains(tiny_llama, PROBES), ksd.abstains(tiny_llama, PROBES))
    with pytest.raises(FingerprintMismatchError):
        KeySpaceDetector.load(path, load_model("tiny-gpt2"))
    with pytest.raises(SkillLensError, match="another model"):
        ksd.abstains(load_model("tiny-mistral"), PROBES)


def _numpy_cube(v):
    m, s = v.mean(0), v.std(0)
    live = s > 0
    return m, s, (np.abs(v[:, live] - m[live]) / s[live]).max(), live


def _numpy_score(r, m, s, k, live):
    return (np.abs(r[:, live] - m[live]) / (k * s[live])).max(1)


def _numpy_calibrated_alpha(probe, retain, max_fpr, margin, cap, folds=5):
    """METHODS.md 2b and the calibration rule (skilllens.unlearning.calibration) from the raw
    vectors, in numpy float64 (nothing from the detector): cube m +- k*s, s the population std,
    k = max |v - m| / s over dims with s > 0. Retain bound: the (floor(max_fpr*n)+1)-th
    smallest retain score over (1 + margin), capped; forget probe scores cross-fitted (fold
    i % 5 scored by the cube of the other folds); alpha = the largest caught held-out score
    times (1 + margin), within the bound."""
    v, r = np.asarray(probe, dtype=np.float64), np.asarray(retain, dtype=np.float64)
    m, s, k, live = _numpy_cube(v)
    need = np.sort(_numpy_score(r, m, s, k, live))  # alpha putting each retain query inside
    n_fp = int(np.floor(max_fpr * len(r)))
    a_hi = min(cap, np.nextafter(need[n_fp], 0), need[n_fp] / (1 + margin))
    held = np.empty(len(v))
    fold = np.arange(len(v)) % folds
    for j in range(folds):
        held[fold == j] = _numpy_score(v[fold == j], *_numpy_cube(v[fold != j]))
    caught = held[held <= a_hi]
    alpha = a_hi if len(caught) == 0 else min(a_hi, caught.max() * (1 + margin))
    return alpha, a_hi, held, m, s, k, live


def _numpy_inside_share(retain, m, s, k, live, alpha):
    r = np.asarray(retain, dtype=np.float64)
    return float((np.abs(r[:, live] - m[live]) <= alpha * k * s[live]).all(1).mean())


def test_calibration_matches_an_independent_numpy_computation():
    g = torch.Generator().manual_seed(7)
    v = _probe(n=40, d=20)
    v[:, 3] = 0.7  # a degenerate dimension (s == 0) that must not decide
    ksd = KeySpaceDetector(alpha=3.0).fit_vectors(v)
    retain = v.mean(0) + 2.5 * torch.randn(50, 20, generator=g) * v.std(0).clamp(min=0.1)
    for max_fpr, margin in ((0.0, 0.1), (0.1, 0.1), (0.3, 0.0), (0.1, 0.5)):
        ksd.alpha = 3.0
        ksd.calibrate_vectors(retain, max_fpr=max_fpr, margin=margin)
        want, a_hi, held, m, s, k, live = _numpy_calibrated_alpha(v, retain, max_fpr, margin,
                                                                  100.0)
        # the detector's m, s come from float32-accumulated statistics: ~1e-7 relative
        assert ksd.alpha == pytest.approx(want, rel=1e-6)
        cal = ksd.calibration_
        assert cal["alpha_feasible_max"] == pytest.approx(a_hi, rel=1e-6)
        tol = 1 + 1e-9  # alpha may equal a held-out score (margin 0): rounding either way
        assert cal["forget_probe_catch"] == pytest.approx(
            float((held <= ksd.alpha * tol).mean()))
        share = _numpy_inside_share(retain, m, s, k, live, ksd.alpha)
        assert share <= max_fpr and cal["retain_probe_fpr"] == pytest.approx(share)
        assert np.array_equal(ksd.inside(retain).numpy(),
                              (np.abs(retain.double().numpy()[:, live] - m[live])
                               <= ksd.alpha * k * s[live]).all(1))
        # the curve is the catch and FPR over alpha, with the chosen point on it
        point = next(c for c in cal["curve"] if c["alpha"] == ksd.alpha)
        assert point["retain_probe_fpr"] == cal["retain_probe_fpr"]
        catches = [c["forget_probe_catch"] for c in cal["curve"]]
        assert catches == sorted(catches) and len(cal["curve"]) >= 25
    ksd.calibrate_vectors(v.mean(0, keepdim=True) + 100 * v.std(0), alpha_max=1.25)
    assert ksd.alpha <= 1.25                             # never wider than the cap


def test_calibration_widens_as_well_as_narrows():
    """Issue 21 item 11: calibration used the starting alpha as an upper bound, so a detector
    whose retain probes lie far outside the cube kept the reference's 2.0 while the held-out
    forget queries needed ~5. The search now goes both ways and never reads eval items."""
    g = torch.Generator().manual_seed(3)
    d = 40
    probe = torch.randn(12, d, generator=g, dtype=torch.float64)   # few probes: a tight cube
    retain = torch.randn(60, d, generator=g, dtype=torch.float64) * 0.5 + 12.0  # far away
    ksd = KeySpaceDetector(alpha=2.0).fit_vectors(probe)
    held = ksd.probe_heldout_scores_
    assert float(held.max()) > 2.0  # some unseen forget queries need alpha > 2
    ksd.calibrate_vectors(retain, max_fpr=0.05)
    assert ksd.alpha > 2.0 and ksd.calibration_["forget_probe_catch"] == 1.0
    assert ksd.alpha == pytest.approx(float(held.max()) * 1.1)
    assert ksd.calibration_["retain_probe_fpr"] == 0.0
    unseen = torch.randn(200, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert ksd.inside(unseen).double().mean() > KeySpaceDetector(alpha=2.0).fit_vectors(
        probe).inside(unseen).double().mean()
    ksd.alpha = 50.0  # and it narrows from a wide start when the retain probes come close
    ksd.calibrate_vectors(probe[:6] * 0.9, max_fpr=0.0)
    assert ksd.alpha < 1.0


@pytest.mark.parametrize("kw", [dict(max_fpr=1.0), dict(max_fpr=-0.1), dict(margin=-1.0)])
def test_calibration_rejects_bad_settings(kw):
    ksd = KeySpaceDetector(alpha=2.0).fit_vectors(_probe())
    with pytest.raises(SkillLensError):
        ksd.calibrate_vectors(_probe(seed=1), **kw)
