"""Per-neuron statistics against float64 references on random data."""
import numpy as np
import pytest
import torch

from skilllens.stats.neuron_stats import NeuronStats
from skilllens.stats import (AbsMean, Extrema, Histogram, Moments, PositiveFraction, batch_partials,
                             histogram_counts, HistogramSpec)

ALL = ("moments", "extrema", "abs", "positive", "histogram")


def ref_stats(x: torch.Tensor):
    x = x.double()
    return {"count": x.shape[0], "mean": x.mean(0), "var": x.var(0, unbiased=False),
            "min": x.amin(0), "max": x.amax(0), "mean_abs": x.abs().mean(0),
            "frac_pos": (x > 0).double().mean(0)}


def check(st: NeuronStats, x: torch.Tensor, rtol=1e-6, atol=1e-7):
    r = ref_stats(x)
    assert torch.all(st.count == r["count"])
    torch.testing.assert_close(st.mean, r["mean"], rtol=rtol, atol=atol * (1 + r["mean"].abs().max().item()))
    torch.testing.assert_close(st.var, r["var"], rtol=1e-5, atol=atol)
    torch.testing.assert_close(st.std, r["var"].sqrt(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(st.min, r["min"], rtol=0, atol=0)
    torch.testing.assert_close(st.max, r["max"], rtol=0, atol=0)
    torch.testing.assert_close(st.mean_abs, r["mean_abs"], rtol=rtol, atol=atol)
    torch.testing.assert_close(st.frac_pos, r["frac_pos"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,chunks", [((37, 19), 5), ((130, 67), 7), ((1, 5), 1), ((513, 3), 2)])
def test_streaming_matches_float64(shape, chunks):
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(*shape, generator=g) * 2.5 + torch.randn(shape[1], generator=g)
    st = NeuronStats(shape[1], ALL)
    for part in torch.tensor_split(x, chunks):
        st.update(part)
    check(st, x)


def test_masks_select_rows_and_3d_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 11, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.4
    st = NeuronStats(11, ALL).update(x, mask)
    check(st, x[mask])


def test_large_offset_no_cancellation():
    g = torch.Generator().manual_seed(2)
    x = 1e4 + torch.randn(2000, 13, generator=g)
    st = NeuronStats(13, ("moments",))
    for part in torch.tensor_split(x, 9):
        st.update(part)
    r = ref_stats(x)
    # float32 inputs near 1e4 carry ~1e-3 absolute resolution; the variance (~1) must still
    # be right to 1e-5 relative, i.e. no catastrophic cancellation
    torch.testing.assert_close(st.var, r["var"], rtol=1e-5, atol=0)
    torch.testing.assert_close(st.mean, r["mean"], rtol=1e-10, atol=0)


def test_bf16_input_matches_its_float64_values():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(301, 17, generator=g) * 3 + 1).to(torch.bfloat16)
    st = NeuronStats(17, ALL).update(x)
    check(st, x.float())


def test_merge_is_exact_and_order_free():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 21, generator=g) * 4 - 2
    whole = NeuronStats(21, ALL, hist_range=(-20.0, 20.0)).update(x)

    def parts():
        return [NeuronStats(21, ALL, hist_range=(-20.0, 20.0)).update(p)
                for p in torch.tensor_split(x, 6)]

    fwd, rev = parts(), parts()
    a, b = fwd[0], rev[-1]
    for p in fwd[1:]:
        a.merge(p)
    for p in reversed(rev[:-1]):
        b.merge(p)
    for k in ("count", "mean", "var", "min", "max", "mean_abs", "frac_pos"):
        # merging is exact: the order of merges changes nothing beyond float64 rounding
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-12, atol=1e-12)
        # and batching only changes the float32 rounding of each block's partial sums
        torch.testing.assert_close(getattr(a, k), getattr(whole, k), rtol=1e-6, atol=1e-7)
    check(a, x)
    assert torch.equal(a.histogram.counts, whole.histogram.counts)


def test_each_statistic_has_update_merge_state_dict():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g) + 0.5
    for cls in (Moments, Extrema, AbsMean, PositiveFraction):
        a, b, whole = cls(6), cls(6), cls(6)
        a.update(x[:20]); b.update(x[20:]); whole.update(x)
        a.merge(b)
        c = cls(6).load_state_dict(a.state_dict())
        for k, v in whole.state_dict().items():
            torch.testing.assert_close(c.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    h = Histogram(6, bins=8, lo=-3.0, hi=3.0).update(x)
    h2 = Histogram(6, bins=8).load_state_dict(h.state_dict())
    assert torch.equal(h2.counts, h.counts)


def test_histogram_counts_match_numpy():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1000, 4, generator=g) * 2
    spec = HistogramSpec(torch.full((4,), -3.0), torch.full((4,), 3.0), 12)
    counts = histogram_counts(x, spec)
    for j in range(4):
        v = x[:, j].numpy()
        inside, _ = np.histogram(v[(v >= -3) & (v < 3)], bins=12, range=(-3, 3))
        assert counts[j, 0] == (v < -3).sum() and counts[j, -1] == (v >= 3).sum()
        np.testing.assert_array_equal(counts[j, 1:-1].numpy(), inside)


def test_nonfinite_counted_and_excluded():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 5, generator=g)
    x[3, 1] = float("nan")
    x[10, 1] = float("inf")
    x[7, 4] = float("-inf")
    st = NeuronStats(5, ALL, hist_range=(-5.0, 5.0)).update(x)
    assert st.n_nonfinite.tolist() == [0, 2, 0, 0, 1]
    assert st.count.tolist() == [50, 48, 50, 50, 49]
    clean = x[:, 1][torch.isfinite(x[:, 1])].double()
    torch.testing.assert_close(st.mean[1], clean.mean())
    torch.testing.assert_close(st.var[1], clean.var(unbiased=False))
    assert torch.isfinite(st.mean).all() and torch.isfinite(st.max).all()
    assert st.histogram.counts.sum(1).tolist() == [50, 48, 50, 50, 49]


def test_empty_and_all_masked_batches_change_nothing():
    x = torch.randn(10, 3)
    st = NeuronStats(3, ALL, hist_range=(-4.0, 4.0)).update(x)
    before = {k: v.clone() for k, v in st.state_dict().items()}
    st.update(torch.randn(0, 3))
    st.update(torch.randn(6, 3), torch.zeros(6, dtype=torch.bool))
    for k, v in st.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_shapes_are_clear_errors():
    st = NeuronStats(4)
    with pytest.raises(Exception, match="neurons"):
        st.update(torch.randn(3, 5))
    with pytest.raises(Exception, match="mask shape"):
        st.update(torch.randn(3, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(Exception, match="different ranges"):
        Histogram(4, 8, -1.0, 1.0).merge(Histogram(4, 8, -2.0, 2.0))


def test_export_roundtrip_keeps_merging_exact():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(80, 7, generator=g)
    a = NeuronStats(7, ALL).update(x[:40])
    b = NeuronStats.from_export(a.export())
    b.update(x[40:])
    check(b, x)


def test_partials_subset_skips_work_but_keeps_moments():
    x = torch.randn(30, 4) + 3
    p = batch_partials(x, stats=("moments",))
    assert "min" not in p and "sum_abs" not in p
    torch.testing.assert_close(p["mean"], x.double().mean(0))


def test_histogram_range_miss_is_counted_and_warned():
    x = torch.randn(200, 3) * 5
    st = NeuronStats(3, ("moments", "histogram"), bins=16, hist_range=(-1.0, 1.0)).update(x)
    h = st.histogram.counts
    assert h[:, 0].tolist() == (x < -1).sum(0).tolist() and h[:, -1].tolist() == (x >= 1).sum(0).tolist()
    with pytest.warns(UserWarning, match="widen hist_range"):
        st.warn_if_out_of_range("gate.0")


def test_float64_input_is_computed_in_float64():
    # issue 10 defect 6: 1e8 + {0.1, 0.2, 0.3} rounded to float32 gave variance 0
    x = torch.tensor([[1e8 + 0.1], [1e8 + 0.2], [1e8 + 0.3]], dtype=torch.float64).repeat(1, 3)
    x[:, 1] -= 2e8
    x[:, 2] = torch.tensor([1e-9, -2e-9, 3e-9], dtype=torch.float64)
    ref = ref_stats(x)
    p = batch_partials(x)
    torch.testing.assert_close(p["m2"] / 3, ref["var"], rtol=1e-6, atol=0)
    torch.testing.assert_close(p["mean"], ref["mean"], rtol=1e-15, atol=0)
    st = NeuronStats(3, ALL, hist_range=(-2e8, 2e8))
    for part in torch.tensor_split(x, 2):  # second block uses the running mean as shift
        st.update(part)
    torch.testing.assert_close(st.var, ref["var"], rtol=1e-6, atol=0)
    torch.testing.assert_close(st.mean_abs, ref["mean_abs"], rtol=1e-15, atol=0)
    assert torch.equal(st.min, ref["min"]) and torch.equal(st.max, ref["max"])


def test_float64_random_blocks_match_reference():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 9, generator=g, dtype=torch.float64) * 1e-3 + 1e6
    st = NeuronStats(9, ("moments", "extrema", "abs", "positive"))
    for part in torch.tensor_split(x, 4):
        st.update(part)
    r = ref_stats(x)
    torch.testing.assert_close(st.var, r["var"], rtol=1e-7, atol=0)
    torch.testing.assert_close(st.mean, r["mean"], rtol=1e-15, atol=0)


def test_histogram_first_update_without_rows_then_data():
    # issue 10 defect 5: an all-masked first block raised KeyError: 'hist'
    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 5, generator=g) * 2 + 1
    st = NeuronStats(5, ALL, bins=16)
    st.update(torch.randn(3, 5), torch.zeros(3, dtype=torch.bool))
    st.update(torch.randn(0, 5))
    assert st.histogram.lo is None
    st.update(x)
    check(st, x)
    ref = histogram_counts(x, HistogramSpec(st.histogram.lo, st.histogram.hi, 16))
    assert torch.equal(st.histogram.counts, ref) and int(st.histogram.counts.sum()) == 200
    h = Histogram(5, bins=8)
    h.update(x[:2], torch.zeros(2, dtype=torch.bool))
    h.update(x)
    assert int(h.counts.sum()) == 200


def test_first_row_outlier_does_not_cancel():
    # the first row lies 1e4 standard deviations from the rest (main: 8e-6 relative error)
    g = torch.Generator().manual_seed(13)
    x = 5.0 + 1e-3 * torch.randn(4000, 6, generator=g)
    x[0] = -5.0
    p = batch_partials(x)
    xd = x.double()
    torch.testing.assert_close(p["m2"], ((xd - xd.mean(0)) ** 2).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(p["mean"], xd.mean(0), rtol=1e-8, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_compiled_cpu_update_matches_float64_and_eager(offset):
    """The compiled one-pass CPU update (the default for large blocks) against float64
    references and the eager path: masks, several blocks, histogram, a NaN block (falls back)."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 70, 33, generator=g) * 2.5 + torch.randn(33, generator=g) + offset
    mask = torch.rand(3, 70, generator=g) > 0.3
    comp = NeuronStats(33, ALL, hist_range=(offset - 12, offset + 12), backend="compiled")
    eager = NeuronStats(33, ALL, hist_range=(offset - 12, offset + 12), backend="torch")
    for b in range(3):
        comp.update(x[b], mask[b])
        eager.update(x[b], mask[b])
    rows = x[mask]
    if offset == 0.0:
        check(comp, rows)
    r = ref_stats(rows)
    torch.testing.assert_close(comp.mean, r["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comp.var, r["var"], rtol=1e-9, atol=0)
    assert torch.equal(comp.histogram.counts, eager.histogram.counts)
    for k in ("count", "min", "max", "frac_pos"):
        assert torch.equal(getattr(comp, k), getattr(eager, k)), k
    torch.testing.assert_close(comp.mean_abs, eager.mean_abs, rtol=1e-6, atol=0)
    bad = torch.randn(5, 33, generator=g) + offset
    bad[2, 4] = float("nan")
    comp.update(bad)
    assert comp.n_nonfinite[4] == 1 and comp.count[4] == rows.shape[0] + 4
    torch.testing.assert_close(comp.mean[5], torch.cat([rows[:, 5], bad[:, 5]]).double().mean())
