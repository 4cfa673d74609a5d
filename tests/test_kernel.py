"""Fused Triton statistics kernel vs float64 references and the torch path.

On machines without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors; with CUDA the same tests also run the compiled kernel on the GPU.

Tolerances (reference = float64 statistics of the very same input values):
  count, n_pos, n_nonfinite, min, max, hist ..... exact
  mean ..... |err| <= 1e-5 * std + 1e-7 * |mean| (+1e-30)
  m2 ....... |err| <= 1e-5 * m2 + 1e-14 * count * mean**2 (+1e-30)
  hist vs a float64 binning: exact except values within 1e-4 bin widths of an edge;
  hist vs batch_partials (same float32 binning formula): exact
  sum_abs .. |err| <= 1e-6 * sum_abs (+1e-30)
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (interpreter on CPU tensors)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from skilllens.errors import SkillLensError  # noqa: E402
from skilllens.stats.kernels import fused_partials, triton_available  # noqa: E402
from skilllens.stats.neuron_stats import NeuronStats  # noqa: E402
from skilllens.stats import HistogramSpec, batch_partials, histogram_counts  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXACT = ("count", "n_pos", "n_nonfinite", "min", "max")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param == "cuda":  # compiled kernel, not the interpreter
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


def reference(x, mask=None, spec=None):
    """float64 statistics of the finite values of ``x: [..., d]`` (rows where mask)."""
    d = x.shape[-1]
    xd = x.reshape(-1, d).double().cpu()
    if mask is not None:
        xd = xd[mask.reshape(-1).cpu()]
    fin = torch.isfinite(xd)
    count = fin.sum(0).double()
    x0 = torch.where(fin, xd, 0.0)
    mean = x0.sum(0) / count.clamp(min=1)
    out = {"count": count, "mean": mean,
           "m2": (torch.where(fin, xd - mean, 0.0) ** 2).sum(0),
           "min": torch.where(fin, xd, float("inf")).amin(0) if len(xd) else
           torch.full((d,), float("inf"), dtype=torch.float64),
           "max": torch.where(fin, xd, float("-inf")).amax(0) if len(xd) else
           torch.full((d,), float("-inf"), dtype=torch.float64),
           "sum_abs": x0.abs().sum(0), "n_pos": (x0 > 0).sum(0).double(),
           "n_nonfinite": (~fin).sum(0).double()}
    if spec is not None:
        lo, hi = spec.lo.double().cpu(), spec.hi.double().cpu()
        b = torch.floor((xd - lo) * (spec.bins / (hi - lo)))
        b = b.clamp(-1, spec.bins).nan_to_num(0).long() + 1
        h = torch.zeros(d, spec.bins + 2, dtype=torch.int64)
        cols = torch.arange(d).expand_as(b)
        h.index_put_((cols[fin], b[fin]), torch.ones(int(fin.sum()), dtype=torch.int64),
                     accumulate=True)
        out["hist"] = h
    return out


def assert_close(got, ref, what=""):
    got = {k: v.cpu() for k, v in got.items()}
    for k in EXACT:
        assert torch.equal(got[k], ref[k].double()), (what, k, got[k], ref[k])
    n = ref["count"]
    std = (ref["m2"] / n.clamp(min=1)).sqrt()
    mean_tol = 1e-5 * std + 1e-7 * ref["mean"].abs() + 1e-30
    assert ((got["mean"] - ref["mean"]).abs() <= mean_tol).all(), (what, "mean")
    m2_tol = 1e-5 * ref["m2"] + 1e-14 * n * ref["mean"] ** 2 + 1e-30
    assert ((got["m2"] - ref["m2"]).abs() <= m2_tol).all(), (what, "m2")
    assert ((got["sum_abs"] - ref["sum_abs"]).abs() <= 1e-6 * ref["sum_abs"] + 1e-30).all(), \
        (what, "sum_abs")
    for k in got:
        assert got[k].dtype == (torch.int64 if k == "hist" else torch.float64), k


def assert_hist(got, ref, x, mask, spec):
    """Exact, except that values within float32 rounding of a bin edge may change bins."""
    got = got.cpu()
    assert torch.equal(got.sum(1), ref.sum(1))
    xd = x.reshape(-1, x.shape[-1]).double().cpu()
    if mask is not None:
        xd = xd[mask.reshape(-1).cpu()]
    t = (xd - spec.lo.double().cpu()) * (spec.bins / (spec.hi.double() - spec.lo.double()).cpu())
    near = (torch.isfinite(t) & ((t - t.round()).abs() < 1e-4)).sum(0)
    assert ((got - ref).abs().sum(1) <= 2 * near).all()


def make(n, d, dtype, device, offset=0.0, seed=0):
    """Random data, never zero, different location/scale per neuron."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(d, generator=g) * 3 + offset
    scale = torch.rand(d, generator=g) * 2 + 0.1
    x = torch.randn(n, d, generator=g) * scale + loc
    x = torch.where(x == 0, 0.5, x)
    return x.to(dtype).to(device)


def hist_spec(x, bins=16, margin=0.0):
    xf = x.float().cpu()
    fin = torch.isfinite(xf)
    lo = torch.where(fin, xf, float("inf")).amin(0).clamp(min=-1e6, max=1e6)
    hi = torch.where(fin, xf, float("-inf")).amax(0).clamp(min=-1e6, max=1e6)
    lo, hi = torch.where(torch.isfinite(lo), lo, -1.0), torch.where(torch.isfinite(hi), hi, 1.0)
    span = (hi - lo).clamp(min=1e-3)
    # margin < 0 puts part of the data into under/overflow
    return HistogramSpec((lo - margin * span).to(x.device), (hi + margin * span).to(x.device), bins)


@pytest.mark.parametrize("shape", [(37, 19), (130, 67), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_random_against_float64(device, shape, dtype, masked):
    x = make(*shape, dtype, device, seed=shape[0] + shape[1])
    mask = None
    if masked:
        mask = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0] = True
        mask = mask.to(device)
    spec = hist_spec(x, bins=8, margin=-0.1 if shape[0] > 1 else 0.5)
    got = fused_partials(x, mask, spec)
    ref = reference(x, mask, spec)
    assert_close(got, ref, f"{shape} {dtype} masked={masked}")
    assert_hist(got["hist"], ref["hist"], x, mask, spec)
    torch_path = batch_partials(x, mask, spec)
    assert_close(got, {k: v.cpu() for k, v in torch_path.items()}, "vs batch_partials")
    assert torch.equal(got["hist"].cpu(), torch_path["hist"].cpu())
    assert got["hist"].shape == (shape[1], 10)
    if shape[0] > 1:  # the narrowed range puts some values into under- and overflow
        assert got["hist"][:, 0].sum() > 0 and got["hist"][:, -1].sum() > 0


def test_many_programs_and_tiles(device):
    """Tiny blocks: several neuron blocks, token blocks and tiles per program, ragged edges."""
    x = make(130, 67, torch.float32, device, seed=3)
    mask = torch.ones(130, dtype=torch.bool)
    mask[20:70] = False  # whole tiles / token blocks without data
    mask = mask.to(device)
    spec = hist_spec(x, bins=5)
    got = fused_partials(x, mask, spec, block_n=16, block_d=32, n_token_blocks=3)
    ref = reference(x, mask, spec)
    assert_close(got, ref, "tiny blocks")
    assert_hist(got["hist"], ref["hist"], x, mask, spec)
    assert torch.equal(got["hist"], batch_partials(x, mask, spec)["hist"])


def test_large_offset_no_cancellation(device):
    """1e4 + N(0, 1): the variance must survive float32 accumulation (shifted moments)."""
    g = torch.Generator().manual_seed(5)
    x = (1e4 + torch.randn(512, 6, generator=g)).to(device)
    got = fused_partials(x, block_n=16, n_token_blocks=2)
    ref = reference(x)
    var_got, var_ref = got["m2"].cpu() / 512, ref["m2"] / 512
    assert ((var_got / var_ref - 1).abs() < 1e-4).all()
    assert ((got["mean"].cpu() - ref["mean"]).abs() < 1e-5).all()
    assert_close(got, ref, "offset")
    assert_close(batch_partials(x), ref, "torch path offset")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_extreme_values_nan_inf(device):
    x = make(64, 9, torch.float32, device, seed=7).cpu()
    x[:, 1] = x[:, 1] * 1e30  # squares overflow float32 -> float64 fallback for this neuron
    x[:, 2] = 1e30 + x[:, 2] * 1e24
    x[3, 0] = float("nan")
    x[5, 0] = float("inf")
    x[6, 3] = float("-inf")
    x[:, 4] = float("nan")  # a neuron with no finite value at all
    x[7, 1] = float("nan")
    x = x.to(device)
    spec = hist_spec(x, bins=7)
    got = fused_partials(x, None, spec, block_n=16)
    ref = reference(x, None, spec)
    assert_close(got, ref, "extreme")
    assert_hist(got["hist"], ref["hist"], x, None, spec)
    assert torch.equal(got["hist"], batch_partials(x, None, spec)["hist"])
    assert got["n_nonfinite"].cpu().tolist() == [2, 1, 0, 1, 64, 0, 0, 0, 0]
    assert got["count"][4] == 0 and got["min"][4] == float("inf") and got["max"][4] == -float("inf")
    assert_close(batch_partials(x, None, spec), ref, "torch path extreme")


def test_half_precision_extremes(device):
    x = make(48, 11, torch.float16, device, seed=9).cpu()
    x[2, 3] = float("inf")
    x[4, 5] = float("nan")
    x[:, 6] = 6e4  # near the float16 maximum
    x = x.to(device)
    for dt in (torch.float16, torch.bfloat16):
        xx = x.to(dt)
        assert_close(fused_partials(xx), reference(xx), str(dt))


@pytest.mark.parametrize("case", ["all_masked", "empty", "empty_3d"])
def test_empty_blocks(device, case):
    d = 7
    spec = HistogramSpec(torch.full((d,), -1.0), torch.full((d,), 1.0), 4)
    if case == "all_masked":
        x = make(20, d, torch.float32, device)
        mask = torch.zeros(20, dtype=torch.bool, device=device)
    elif case == "empty":
        x, mask = torch.empty(0, d, device=device), None
    else:
        x = torch.empty(2, 0, d, device=device)
        mask = torch.empty(2, 0, dtype=torch.bool, device=device)
    got = fused_partials(x, mask, spec)
    want = batch_partials(x, mask, spec)
    for k in want:
        assert torch.equal(got[k].cpu(), want[k].cpu()), k
    assert got["min"].isinf().all() and (got["min"] > 0).all() and (got["max"] < 0).all()
    assert (got["count"] == 0).all() and (got["hist"] == 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_histogram_out_of_range(device):
    d = 3
    spec = HistogramSpec(torch.tensor([0.0, -2.0, 10.0]), torch.tensor([4.0, 2.0, 11.0]), 4)
    col = torch.tensor([-1e30, -0.5, 0.0, 0.999, 1.0, 3.5, 4.0, 7.0, 1e30, float("nan"),
                        float("inf"), float("-inf")])
    x = torch.stack([col, col, col + 10], 1)
    spec_dev = HistogramSpec(spec.lo.to(device), spec.hi.to(device), 4)
    got = fused_partials(x.to(device), None, spec_dev)
    # neuron 0: bins [0,1) [1,2) [2,3) [3,4); under: -1e30, -0.5; over: 4, 7, 1e30
    assert got["hist"][0].tolist() == [2, 2, 1, 0, 1, 3]
    assert torch.equal(got["hist"].cpu(), histogram_counts(x[torch.isfinite(x).all(1)], spec))
    assert got["hist"].sum(1).tolist() == [9, 9, 9]


def test_noncontiguous_and_3d(device):
    base = make(40, 30, torch.bfloat16, device, seed=11)
    views = {"strided": base[:, ::3], "transposed": base.t().contiguous().t(),
             "sliced_rows": base[5:33:2, 4:21]}
    for name, x in views.items():
        assert not x.is_contiguous() or name == "transposed"
        assert_close(fused_partials(x), reference(x), name)
    x3 = make(60, 13, torch.float16, device, seed=12).reshape(4, 15, 13)
    m3 = (torch.rand(4, 15, generator=torch.Generator().manual_seed(2)) > 0.5).to(device)
    assert_close(fused_partials(x3, m3), reference(x3, m3), "3d")
    xt = make(13, 40, torch.float32, device, seed=13).t()  # stride (1, 40)
    assert_close(fused_partials(xt), reference(xt), "x.t()")


def test_mask_shape_error(device):
    with pytest.raises(SkillLensError, match="mask shape"):
        fused_partials(make(10, 4, torch.float32, device),
                       torch.ones(9, dtype=torch.bool, device=device))


def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SkillLensError, match="CUDA"):
        fused_partials(torch.randn(4, 3))
    assert triton_available() == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available()


def test_neuron_stats_triton_matches_torch(device):
    stats = ("moments", "extrema", "abs", "positive", "histogram")
    a = NeuronStats(23, stats, bins=12, device=device, backend="torch")
    b = NeuronStats(23, stats, bins=12, device=device, backend="triton")
    for i in range(3):
        x = make(50, 23, torch.bfloat16, device, seed=20 + i)
        x[3, 4] = float("nan")
        mask = (torch.rand(50, generator=torch.Generator().manual_seed(i)) > 0.3).to(device)
        a.update(x, mask)
        b.update(x, mask)
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ("count", "n_nonfinite", "min", "max", "n_pos", "hist", "hist_lo", "hist_hi"):
        assert torch.equal(ea[k], eb[k]), k
    for k in ("mean", "var", "std", "m2", "mean_abs", "sum_abs", "frac_pos"):
        assert torch.allclose(ea[k], eb[k], rtol=1e-5, atol=1e-6), k
    assert torch.allclose(a.quantiles([0.1, 0.5, 0.9]), b.quantiles([0.1, 0.5, 0.9]))


def test_float64_input_stays_float64(device):
    # issue 10 defect 6 on the kernel path: float64 goes to the shared float64 fallback
    g = torch.Generator().manual_seed(21)
    x = (1e8 + torch.randn(64, 5, generator=g, dtype=torch.float64) * 0.1).to(device)
    mask = torch.rand(64, generator=g) > 0.3
    spec = HistogramSpec(torch.full((5,), 1e8 - 0.25, dtype=torch.float64),
                         torch.full((5,), 1e8 + 0.25, dtype=torch.float64), 8)
    got = fused_partials(x, mask.to(device), spec)
    ref = reference(x, mask)
    torch.testing.assert_close(got["m2"].cpu(), ref["m2"], rtol=1e-9, atol=0)
    torch.testing.assert_close(got["mean"].cpu(), ref["mean"], rtol=1e-15, atol=0)
    hist = got["hist"].cpu()
    assert torch.equal(hist, histogram_counts(x[mask.to(device)], spec).cpu())
    assert int(hist[:, 1:-1].sum()) > 0.5 * int(mask.sum()) * 5  # binned at float64 resolution


def test_histogram_index_int64_past_2_24(device):
    """issue 21 item 1 on the kernel path: d_ff 36,864 x 512 bins puts flat bin indices past
    2**24; the kernel's index arithmetic is int64, so every count matches exact binning."""
    d, bins, n = 36864, 512, 3
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(d, generator=g) - 2
    hi = lo + 1 + 3 * torch.rand(d, generator=g)
    k = torch.randint(-1, bins + 1, (n, d), generator=g)  # bin centres; -1/bins: under/overflow
    x = (lo.double() + (k.double() + 0.5) * (hi.double() - lo.double()) / bins).float()
    ref = torch.zeros(d, bins + 2, dtype=torch.int64)
    ref.scatter_add_(1, (k + 1).T.contiguous(), torch.ones(d, n, dtype=torch.int64))
    launch = {"block_n": 4, "block_d": 4096} if device.type == "cpu" else {}
    got = fused_partials(x.to(device), hist=HistogramSpec(lo, hi, bins), **launch)["hist"].cpu()
    assert torch.equal(got, ref), f"{int((got != ref).any(1).sum())} neurons binned wrong"
