"""Neuron Adjust: selection rules, the intervention rule, and the reference-code defects."""
import math

import numpy as np
import pytest
import torch

from skilllens import load_model
from skilllens.core.collect import StatsCollection
from skilllens.errors import FingerprintMismatchError, SkillLensError
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.unlearning.neuron_adjust import (NeuronAdjuster, adjust_values, selection_scores,
                                                top_percent)
from skilllens.stats.neuron_stats import NeuronStats


def _collection(data: dict[int, torch.Tensor], site="gate") -> StatsCollection:
    return StatsCollection({(site, l): NeuronStats(x.shape[1], ("moments", "abs"),
                                                   backend="torch").update(x)
                            for l, x in data.items()})


def _random_stats(seed=0, n_layers=3, d=40, rows=200):
    g = torch.Generator().manual_seed(seed)
    f = {l: torch.randn(rows, d, generator=g) * (0.5 + 3 * torch.rand(d, generator=g))
         + 2 * torch.randn(d, generator=g) for l in range(n_layers)}
    r = {l: torch.randn(rows, d, generator=g) * (0.5 + 3 * torch.rand(d, generator=g))
         + 2 * torch.randn(d, generator=g) for l in range(n_layers)}
    return f, r


def test_std_is_a_real_standard_deviation_not_a_variance():
    f, r = _random_stats()
    na = NeuronAdjuster(percent=100).fit_stats(_collection(f), _collection(r))
    for l, p in na.params_.items():
        ref_f = f[l].double().std(0, correction=0)[p.index]  # float64 reference
        ref_r = r[l].double().std(0, correction=0)[p.index]
        assert torch.allclose(p.sd_f.double(), ref_f, rtol=1e-5)
        assert torch.allclose(p.sd_r.double(), ref_r, rtol=1e-5)
        assert not torch.allclose(p.sd_f.double(), f[l].double().var(0)[p.index], rtol=1e-2)


def _reference_adjust(x, mf, sf, mr, sr, u):
    x, mf, sf, mr, sr = (np.asarray(v, dtype=np.float64) for v in (x, mf, sf, mr, sr))
    pf = np.exp(-0.5 * ((x - mf) / sf) ** 2) / (sf * math.sqrt(2 * math.pi))
    pr = np.exp(-0.5 * ((x - mr) / sr) ** 2) / (sr * math.sqrt(2 * math.pi))
    prob = pf / (pf + pr)
    mapped = mr + (mf - x) * sr / sf
    return np.where((pf > pr) & (np.asarray(u) < prob), mapped, x)


def test_intervention_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    n = 7
    mu_f = torch.randn(n, generator=g) * 2
    mu_f[0] = -1.5                                   # mu_f <= 0 neurons must be adjusted too
    sd_f = 0.3 + torch.rand(n, generator=g)
    mu_r = torch.randn(n, generator=g) * 2 + 1
    sd_r = 0.3 + torch.rand(n, generator=g)
    x = mu_f + sd_f * torch.randn(3, 50, n, generator=g)
    out = adjust_values(x, mu_f, sd_f, mu_r, sd_r, torch.Generator().manual_seed(7))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    ref = _reference_adjust(x, mu_f, sd_f, mu_r, sd_r, u)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert (out != x).float().mean() > 0.3          # most forget-like values were moved


def test_neurons_with_nonpositive_forget_mean_are_adjusted_with_sigma_f():
    # the reference copied mu_f into sigma_f, so neurons with mu_f <= 0 were never adjusted
    mu_f, sd_f = torch.tensor([-2.0, 0.0]), torch.tensor([0.5, 0.25])
    mu_r, sd_r = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])
    x = mu_f + torch.tensor([[0.1, -0.05], [-0.2, 0.02]])
    out = adjust_values(x, mu_f, sd_f, mu_r, sd_r, torch.Generator().manual_seed(0))
    expected = mu_r - (x - mu_f) * sd_r / sd_f       # prob ~ 1 here
    assert torch.allclose(out, expected, atol=1e-5)


def test_randomness_is_independent_per_element():
    # p_f/(p_f+p_r) ~ 0.5: identical values must not share one decision
    x = torch.zeros(1, 400, 1)
    out = adjust_values(x, torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.05]),
                        torch.tensor([1.0]), torch.Generator().manual_seed(3))
    frac = (out != x).float().mean().item()
    assert 0.35 < frac < 0.65


def test_identical_tokens_in_one_forward_get_different_decisions(tiny_llama):
    lm = tiny_llama
    ids = torch.full((1, 64), 65)                    # one token repeated: identical gate values
    seen = {}
    with hooks_applied(lm, [Hook("gate", 0, lambda a: seen.setdefault("x", a.clone()))]):
        lm.model(input_ids=ids)
    x0 = seen["x"][0, :, :4]
    assert torch.allclose(x0, x0[:1].expand_as(x0))
    f = {0: torch.randn(50, 64) + 1, 1: torch.randn(50, 64) + 1}
    na = NeuronAdjuster(percent=100, scope="per_layer").fit_stats(_collection(f), _collection(f), lm)
    for l, p in na.params_.items():                   # force p_f/(p_f+p_r) ~ 0.5 at these values
        val = seen["x"][0, 0, p.index] if l == 0 else p.mu_f
        p.mu_f, p.mu_r = val.clone(), val + 0.05
        p.sd_f, p.sd_r = torch.ones_like(val), torch.ones_like(val)
    after = {}
    with na.applied(lm):
        hooks = [Hook("key", 0, lambda a: after.setdefault("k", a.clone()))]
        with hooks_applied(lm, hooks):
            lm.model(input_ids=ids)
    k = after["k"][0, :, :4]
    assert not torch.allclose(k, k[:1].expand_as(k))  # same input values, different decisions


def test_statistics_move_to_the_device_once_per_application(tiny_llama):
    f, r = _random_stats(d=64, n_layers=2)
    na = NeuronAdjuster(percent=10).fit_stats(_collection(f), _collection(r), tiny_llama)
    ids = torch.randint(0, 250, (2, 12))
    with na.applied(tiny_llama):
        for _ in range(3):
            tiny_llama.model(input_ids=ids)
    assert na.n_device_transfers == 1


def test_selection_rules_against_references():
    f, r = _random_stats(seed=2)
    fs, rs = _collection(f), _collection(r)
    mf, mr = fs.stacked("gate", "mean"), rs.stacked("gate", "mean")
    sf, sr = fs.stacked("gate", "std"), rs.stacked("gate", "std")
    signed = NeuronAdjuster(percent=5, rule="signed").fit_stats(fs, rs)
    k = round(0.05 * mf.numel())
    assert signed.n_selected == k
    flat = torch.topk((mf - mr).reshape(-1), k).indices
    want = {(int(i) // 40, int(i) % 40) for i in flat}
    got = {(l, int(i)) for l, p in signed.params_.items() for i in p.index}
    assert got == want
    per = NeuronAdjuster(percent=10, rule="abs_standardized", scope="per_layer").fit_stats(fs, rs)
    assert per.selected_per_layer() == {0: 4, 1: 4, 2: 4}
    z = (mf - mr).abs() / torch.sqrt((sf ** 2 + sr ** 2) / 2)
    for l, p in per.params_.items():
        assert set(p.index.tolist()) == set(torch.topk(z[l], 4).indices.tolist())
    # symmetric KL, independent algebra: KL(f||r) + KL(r||f)
    kl = lambda m1, s1, m2, s2: torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - .5
    sym = kl(mf, sf, mr, sr) + kl(mr, sr, mf, sf)
    assert torch.allclose(selection_scores(mf, sf, mr, sr, "divergence", "sym_kl"), sym)
    # squared Hellinger by numerical integration of sqrt(p q)
    grid = np.linspace(-40, 40, 400001)
    i, j = 1, 3
    a, b, c, d = (float(t[i, j]) for t in (mf, sf, mr, sr))
    p = np.exp(-.5 * ((grid - a) / b) ** 2) / (b * np.sqrt(2 * np.pi))
    q = np.exp(-.5 * ((grid - c) / d) ** 2) / (d * np.sqrt(2 * np.pi))
    h2 = 1 - np.trapezoid(np.sqrt(p * q), grid)
    got = selection_scores(mf, sf, mr, sr, "divergence", "hellinger")[i, j]
    assert abs(float(got) - h2) < 1e-6


def test_top_percent_global_vs_per_layer():
    s = torch.tensor([[5.0, 4, 3, 2], [1.0, 0, -1, -2]])
    assert {r: v.tolist() for r, v in top_percent(s, 25).items()} == {0: [0, 1]}
    assert {r: v.tolist() for r, v in top_percent(s, 25, "per_layer").items()} == {0: [0], 1: [0]}


@pytest.mark.parametrize("bad", [0, -1, 100.5, float("nan"), "x"])
def test_percent_outside_range_is_rejected(bad):
    with pytest.raises(SkillLensError, match=r"\(0, 100\]"):
        NeuronAdjuster(percent=bad)


def test_fit_applied_reversible_and_save_load(tiny_llama, tmp_path):
    lm = tiny_llama
    forget = ["12+7=19", "3*4=12", "100-1=99", "8/2=4"]
    retain = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"]
    na = NeuronAdjuster(percent=20, rule="abs_standardized", seed=5).fit(
        lm, forget, retain, progress=False)
    assert na.n_selected == round(0.2 * 2 * 64)
    ids = lm.tokenizer(["5+5=10 and 6*6=36"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        with na.applied(lm):
            during = lm.model(input_ids=ids).logits
        after = lm.model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, during)
    path = na.save(tmp_path / "na.safetensors")
    back = NeuronAdjuster.load(path, lm)
    with torch.no_grad(), back.applied(lm):
        again = lm.model(input_ids=ids).logits
    assert torch.equal(during, again)               # same seed -> same draws
    with pytest.raises(FingerprintMismatchError):
        NeuronAdjuster.load(path, load_model("tiny-gpt2"))


def test_forget_and_retain_must_differ(tiny_llama, data_dir):
    with pytest.raises(SkillLensError, match="forgotten and kept"):
        NeuronAdjuster().fit(tiny_llama, "gsm8k", "humaneval,gsm8k", data_dir=data_dir,
                             progress=False)


def _closure_values(fn) -> list:
    return [c.cell_contents for c in (fn.__closure__ or ())]


def test_each_layer_gets_its_own_devices_statistics_and_generator():
    """Defect 10: statistics and the generator went to ``lm.device`` (the first parameter's),
    which breaks a model spread over devices. Test double: layer 1 lives on the ``meta``
    device (a second device without a GPU); its hook must get meta tensors and work on a meta
    activation, while layer 0 stays on the CPU."""
    lm = load_model("tiny-llama")
    lm.model.model.layers[1].to("meta")
    assert lm.device == torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    f = {l: torch.randn(50, 64, generator=g) + 2 for l in range(2)}
    r = {l: torch.randn(50, 64, generator=g) for l in range(2)}
    na = NeuronAdjuster(percent=10, scope="per_layer").fit_stats(_collection(f), _collection(r))
    hooks = {h.layer: h for h in na.hooks(lm)}
    for layer, dev in ((0, "cpu"), (1, "meta")):
        params = [v for v in _closure_values(hooks[layer].fn) if hasattr(v, "mu_f")]
        assert len(params) == 1
        p = params[0]
        assert {t.device.type for t in (p.index, p.mu_f, p.sd_f, p.mu_r, p.sd_r)} == {dev}
        gens = [v for v in _closure_values(hooks[layer].fn) if isinstance(v, torch.Generator)]
        assert [x.device.type for x in gens] == (["cpu"] if dev == "cpu" else [])
        out = hooks[layer].fn(torch.randn(2, 3, 64, device=dev) + 2)
        assert out.device.type == dev and out.shape == (2, 3, 64)
