"""Histogram quantiles: vectorised interpolation and its one-bin-width error bound.

Reference: the "inverted CDF" sample quantile x_(k), k = max(1, ceil(q * n)), of the raw data in
float64. Tolerance: |estimate - reference| <= (hi - lo) / bins (+1e-9 * bin width for rounding)
whenever the reference lies inside [lo, hi); outside, the estimate is exactly lo or hi.
"""
import math

import pytest
import torch

from skilllens.errors import SkillLensError
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.stats.quantiles import histogram_quantiles
from skilllens.stats import Histogram, HistogramSpec, histogram_counts

QS = [0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0]


def inverted_cdf(x: torch.Tensor, qs) -> torch.Tensor:
    """``[len(qs), d]`` order statistics x_(k), k = max(1, ceil(q n)), of ``x: [n, d]``."""
    xs = x.double().sort(0).values
    n = xs.shape[0]
    ks = [max(1, math.ceil(q * n - 1e-9)) for q in qs]
    return torch.stack([xs[k - 1] for k in ks])


def data(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = torch.rand(d, generator=g)
    x = torch.randn(n, d, generator=g) * (torch.rand(d, generator=g) * 3 + 0.1)
    x = torch.where(shape > 0.5, x.exp(), x) + torch.randn(d, generator=g) * 5  # skewed ones too
    return x


@pytest.mark.parametrize("bins", [1, 7, 64, 256])
def test_error_at_most_one_bin_width(bins):
    x = data(1000, 37, seed=bins)
    lo, hi = x.amin(0) - 0.01, x.amax(0) + 0.01
    counts = histogram_counts(x, HistogramSpec(lo, hi, bins))
    assert counts[:, [0, -1]].sum() == 0
    est = histogram_quantiles(counts, lo, hi, QS)
    ref = inverted_cdf(x, QS)
    width = ((hi - lo) / bins).double()
    assert est.shape == (len(QS), 37) and est.dtype == torch.float64
    assert ((est - ref).abs() <= width * (1 + 1e-9)).all()
    assert (est[1:] >= est[:-1]).all()  # monotone in q


def test_error_shrinks_with_bins():
    x = data(20000, 5, seed=1)
    lo, hi = x.amin(0) - 0.01, x.amax(0) + 0.01
    ref = inverted_cdf(x, [0.1, 0.5, 0.9])
    errs = []
    for bins in (8, 64, 512):
        est = histogram_quantiles(histogram_counts(x, HistogramSpec(lo, hi, bins)), lo, hi,
                                  [0.1, 0.5, 0.9])
        errs.append(float((est - ref).abs().max()))
    assert errs[0] > errs[1] > errs[2]


def test_exact_small_case():
    # 4 bins on [0, 4): one value in each of bins 0..3, none out of range
    counts = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 4, 0, 0, 0]])
    lo, hi = torch.tensor([0.0, 0.0]), torch.tensor([4.0, 4.0])
    est = histogram_quantiles(counts, lo, hi, [0.0, 0.25, 0.5, 0.625, 1.0])
    assert est[:, 0].tolist() == [0.0, 1.0, 2.0, 2.5, 4.0]
    # all mass in bin [1, 2): linear interpolation inside the bin
    assert est[:, 1].tolist() == [1.0, 1.25, 1.5, 1.625, 2.0]


def test_under_and_overflow_give_bounds():
    x = data(1000, 6, seed=3)
    lo, hi = torch.quantile(x, 0.2, dim=0), torch.quantile(x, 0.7, dim=0)
    counts = histogram_counts(x, HistogramSpec(lo, hi, 32))
    qs = [0.05, 0.15, 0.3, 0.5, 0.65, 0.8, 0.99]
    est = histogram_quantiles(counts, lo, hi, qs)
    ref = inverted_cdf(x, qs)
    lo64, hi64 = lo.double(), hi.double()
    inside = (ref >= lo64) & (ref < hi64)
    width = (hi64 - lo64) / 32
    assert ((est - ref).abs() <= width * (1 + 1e-9))[inside].all()
    below, above = ref < lo64, ref >= hi64
    assert below[:2].all() and above[-2:].all()
    assert torch.equal(est[below], lo64.expand_as(est)[below])  # only an upper bound
    assert torch.equal(est[above], hi64.expand_as(est)[above])  # only a lower bound


def test_empty_neuron_is_nan_and_shapes():
    counts = torch.zeros(3, 6, dtype=torch.int64)
    counts[1, 2] = 5
    est = histogram_quantiles(counts, torch.zeros(3), torch.ones(3), 0.5)
    assert est.shape == (1, 3)
    assert est[0, 0].isnan() and est[0, 2].isnan() and est[0, 1] == 0.375
    assert histogram_quantiles(counts, torch.zeros(3), torch.ones(3), []).shape == (0, 3)
    t = histogram_quantiles(counts, torch.zeros(3), torch.ones(3), torch.tensor([0.1, 0.9]))
    assert t.shape == (2, 3)


def test_invalid_inputs():
    counts = torch.ones(2, 5, dtype=torch.int64)
    with pytest.raises(SkillLensError, match="lie in"):
        histogram_quantiles(counts, torch.zeros(2), torch.ones(2), [0.5, 1.5])
    with pytest.raises(SkillLensError, match="bins"):
        histogram_quantiles(torch.ones(2, 2), torch.zeros(2), torch.ones(2), [0.5])
    with pytest.raises(SkillLensError, match="no range"):
        histogram_quantiles(counts, None, None, [0.5])


def test_histogram_and_neuron_stats_quantiles():
    x = data(3000, 9, seed=4)
    lo, hi = x.amin(0) - 0.1, x.amax(0) + 0.1
    h = Histogram(9, bins=128, lo=lo, hi=hi)
    for chunk in x.split(700):
        h.update(chunk)
    ref = inverted_cdf(x, QS)
    width = ((hi - lo) / 128).double()
    assert ((h.quantiles(QS) - ref).abs() <= width * (1 + 1e-9)).all()
    s = NeuronStats(9, ("moments", "histogram"), bins=128, hist_range=(lo, hi), backend="torch")
    s.update(x)
    assert torch.equal(s.quantiles(QS), h.quantiles(QS))


def test_vectorised_matches_per_neuron():
    x = data(500, 12, seed=5)
    lo, hi = x.amin(0) - 0.5, x.amax(0) + 0.5
    counts = histogram_counts(x, HistogramSpec(lo, hi, 20))
    full = histogram_quantiles(counts, lo, hi, QS)
    for i in range(12):
        one = histogram_quantiles(counts[i:i + 1], lo[i:i + 1], hi[i:i + 1], QS)
        assert torch.equal(one[:, 0], full[:, i])
