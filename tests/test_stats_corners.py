"""Statistics corners: histogram indices past 2**24 and copies that own their tensors."""
import pytest
import torch

from skilllens.core.collect import StatsCollection
from skilllens.stats import HistogramSpec, histogram_counts
from skilllens.stats.neuron_stats import NeuronStats

ALL = ("moments", "extrema", "abs", "positive", "histogram")


def centred_values(d, bins, n, seed=0):
    """Per-neuron ranges and ``[n, d]`` values at bin centres (``k`` in ``[-1, bins]``: -1 and
    ``bins`` land in the under/overflow bins), so float32 and exact binning agree."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(d, generator=g) - 2
    hi = lo + 1 + 3 * torch.rand(d, generator=g)
    k = torch.randint(-1, bins + 1, (n, d), generator=g)
    x = (lo.double() + (k.double() + 0.5) * (hi.double() - lo.double()) / bins).float()
    return x, k, lo, hi


def exact_hist(k, bins):
    n, d = k.shape
    ref = torch.zeros(d, bins + 2, dtype=torch.int64)
    ref.scatter_add_(1, (k + 1).T.contiguous(), torch.ones(d, n, dtype=torch.int64))
    return ref


@pytest.mark.parametrize("all_finite", [True, False])
def test_histogram_index_exact_past_2_24(all_finite):
    """d_ff 36,864 x 512 bins: flat indices reach 18.9M > 2**24 (float32 indices went to the
    wrong bin, or the next neuron's row, for every neuron past 32,640)."""
    d, bins = 36864, 512
    x, k, lo, hi = centred_values(d, bins, 3)
    ref = exact_hist(k, bins)
    if not all_finite:  # NaN/inf are dropped, not counted in a neighbour's row
        x = torch.cat([x, torch.full((1, d), float("nan")), torch.full((1, d), float("inf"))])
    got = histogram_counts(x, HistogramSpec(lo, hi, bins), all_finite=all_finite)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref), f"{int((got != ref).any(1).sum())} neurons binned wrong"


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_neuron_stats_histogram_and_median_at_large_d(backend):
    """Every update path (eager, compiled CPU update) bins exactly; the median from the histogram
    is within one bin width of the exact median."""
    d, bins = 36864, 512
    x, k, lo, hi = centred_values(d, bins, 5, seed=1)
    st = NeuronStats(d, ALL, bins=bins, hist_range=(lo, hi), backend=backend).update(x)
    assert torch.equal(st.histogram.counts, exact_hist(k, bins))
    width = ((hi - lo) / bins).double()
    inside = ((k >= 0) & (k < bins)).all(0)  # median of in-range values only
    med = st.quantiles([0.5])[0]
    exact = x.double().median(0).values  # lower median; the histogram interpolates in its bin
    assert ((med - exact).abs()[inside] <= 1.0 * width[inside] + 1e-9).all()


def _stats(seed, n, d=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    st = NeuronStats(d, ALL, bins=8, hist_range=(-4.0, 4.0), backend="torch").update(x)
    return st, x


def test_copy_from_state_owns_its_tensors():
    """The issue's scenario: ``from_state(a.state_dict(), {}).merge(b)`` left ``a``'s histogram
    total at 480 while its count stayed 50 (shared storage)."""
    a, _ = _stats(0, 50, d=4)
    b, _ = _stats(1, 70, d=4)
    ca, cb = StatsCollection({("gate", 0): a}), StatsCollection({("gate", 0): b})
    before = {k: v.clone() for k, v in ca.state_dict().items()}
    copy = StatsCollection.from_state(ca.state_dict(), {}).merge(cb)
    assert int(copy[("gate", 0)].histogram.counts.sum()) == 4 * 120
    assert int(a.histogram.counts.sum()) == 4 * 50 and int(a.count[0]) == 50
    for k, v in ca.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("via", ["export", "state_dict"])
def test_exports_and_state_dicts_share_no_storage(via):
    st, _ = _stats(2, 30)
    live = [getattr(c, f) for c in st.components for f in c._fields if getattr(c, f) is not None]
    out = st.export() if via == "export" else st.state_dict()
    ptrs = {t.untyped_storage().data_ptr() for t in live}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in out.values()}
    # loading owns too: merging into the loaded copy leaves the dict (and the original) alone
    loaded = NeuronStats.from_export(out) if via == "export" else \
        NeuronStats(6, ALL, bins=8).load_state_dict(out)
    saved = {k: v.clone() for k, v in out.items()}
    loaded.merge(_stats(3, 20)[0])
    assert all(torch.equal(out[k], saved[k]) for k in out)
