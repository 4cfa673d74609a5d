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
    assert ksd.k == pytest.approx(ref, rel=1e-6)
    assert ksd.k_exact == pytest.approx(ref, rel=1e-6)
    assert search_k(v, m, s) == pytest.approx(exact_k(v, m, s), rel=1e-7)
    assert bool(ksd.inside(v).all())                     # every probe inside at alpha = 1
    assert not bool(ksd.inside(v, alpha=0.99).all())     # k is the smallest such scale


def test_zero_std_dimensions_are_guarded():
    v = _probe(d=6)
    v[:, 2] = 0.7                                        # a constant dimension: s == 0
    ksd = KeySpaceDetector(alpha=1.0).fit_vectors(v)
    assert ksd.n_degenerate_dims == 1
    assert torch.isfinite(torch.tensor(ksd.k)) and bool(ksd.inside(v).all())
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
    dev = lambda x: ((x.double() - ksd.m).abs() / (ksd.k * ksd.s))  # noqa: E731
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
    assert back.k == ksd.k and back.alpha == 1.5 and back.layer == 0
    assert torch.equal(back.abstains(tiny_llama, PROBES), ksd.abstains(tiny_llama, PROBES))
    with pytest.raises(FingerprintMismatchError):
        KeySpaceDetector.load(path, load_model("tiny-gpt2"))
    with pytest.raises(SkillLensError, match="another model"):
        ksd.abstains(load_model("tiny-mistral"), PROBES)


def _numpy_calibrated_alpha(probe, retain, max_fpr, margin, cap):
    """METHODS.md 2b from the raw vectors, in numpy float64 (nothing from the detector): cube
    m +- k*s with s the population std, k = max |v - m| / s over dims with s > 0; the alpha
    the calibration must pick is the (floor(max_fpr*n)+1)-th smallest retain score (the
    smallest alpha that puts that query inside the cube), shrunk by 1 + margin, capped."""
    v, r = np.asarray(probe, dtype=np.float64), np.asarray(retain, dtype=np.float64)
    m, s = v.mean(0), v.std(0)
    live = s > 0
    k = (np.abs(v[:, live] - m[live]) / s[live]).max()
    need = (np.abs(r[:, live] - m[live]) / (k * s[live])).max(1)  # alpha putting each inside
    need.sort()
    n_fp = int(np.floor(max_fpr * len(r)))
    return min(cap, need[n_fp] / (1 + margin)), m, s, k, live


def _numpy_inside_share(retain, m, s, k, live, alpha):
    r = np.asarray(retain, dtype=np.float64)
    return float((np.abs(r[:, live] - m[live]) <= alpha * k * s[live]).all(1).mean())


def test_calibration_matches_an_independent_numpy_computation():
    g = torch.Generator().manual_seed(7)
    v = _probe(n=40, d=20)
    v[:, 3] = 0.7  # a degenerate dimension (s == 0) that must not decide
    ksd = KeySpaceDetector(alpha=3.0).fit_vectors(v)
    retain = v.mean(0) + 2.5 * torch.randn(50, 20, generator=g) * v.std(0).clamp(min=0.1)
    for max_fpr, margin in ((0.0, 0.1), (0.1, 0.1), (0.3, 0.0)):
        ksd.alpha = 3.0
        ksd.calibrate_vectors(retain, max_fpr=max_fpr, margin=margin)
        want, m, s, k, live = _numpy_calibrated_alpha(v, retain, max_fpr, margin, 3.0)
        assert want < 3.0  # the cap does not decide these cases
        # the detector's m, s come from float32-accumulated statistics: ~1e-7 relative
        assert ksd.alpha == pytest.approx(want, rel=1e-6)
        if margin > 0:
            share = _numpy_inside_share(retain, m, s, k, live, ksd.alpha)
            assert share <= max_fpr
            assert ksd.calibration["retain_probe_fpr"] == pytest.approx(share)
            assert np.array_equal(ksd.inside(retain).numpy(),
                                  (np.abs(retain.double().numpy()[:, live] - m[live])
                                   <= ksd.alpha * k * s[live]).all(1))
        else:  # no margin: the (n_fp+1)-th retain query lies on the cube's face
            assert _numpy_inside_share(retain, m, s, k, live, ksd.alpha * (1 - 1e-5)) <= max_fpr
            assert _numpy_inside_share(retain, m, s, k, live, ksd.alpha * (1 + 1e-5)) > max_fpr
    ksd.alpha = 3.0
    ksd.calibrate_vectors(v.mean(0, keepdim=True) + 100 * v.std(0), alpha_max=1.25)
    assert ksd.alpha == 1.25                             # never wider than the upper bound


@pytest.mark.parametrize("kw", [dict(max_fpr=1.0), dict(max_fpr=-0.1), dict(margin=-1.0)])
def test_calibration_rejects_bad_settings(kw):
    ksd = KeySpaceDetector(alpha=2.0).fit_vectors(_probe())
    with pytest.raises(SkillLensError):
        ksd.calibrate_vectors(_probe(seed=1), **kw)
