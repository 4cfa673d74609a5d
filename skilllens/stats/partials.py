"""Block reduction to per-neuron *partials* (torch path) and their exact combination.

``batch_partials(x, mask)`` reduces one block ``x: [..., d]`` to count, mean, m2, min, max,
sum_abs, n_pos, n_nonfinite (and a histogram) per neuron; ``chan_merge`` combines moments
exactly. The fused Triton kernel (:mod:`skilllens.stats.kernels`) returns the same partials on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skilllens.errors import SkillLensError

PARTIAL_KEYS = ("count", "mean", "m2", "min", "max", "sum_abs", "n_pos", "n_nonfinite")
ALL_STATS = ("moments", "extrema", "abs", "positive", "histogram")
DEFAULT_STATS = ("moments", "extrema", "abs", "positive")


@dataclass(frozen=True)
class HistogramSpec:
    """Fixed bins: ``bins`` equal-width bins on ``[lo, hi)`` per neuron (``lo``/``hi``: ``[d]``),
    plus an underflow bin (index 0) and an overflow bin (index ``bins + 1``)."""

    lo: torch.Tensor
    hi: torch.Tensor
    bins: int = 256


class Partials(dict):
    """Partials dict; ``uniform_n`` is set when every neuron counted the same ``n`` finite
    values (no NaN/inf), which lets ``NeuronStats`` combine them with fewer ops."""

    uniform_n: int | None = None


def as_rows(x: torch.Tensor, mask: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x: [..., d]`` as rows ``[N, d]`` and ``mask: [...]`` as a flat bool ``[N]`` (checked
    against ``x``'s leading shape; None stays None)."""
    if x.dim() == 1:
        x = x[None]
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise SkillLensError(f"mask shape {tuple(mask.shape)} does not match activations "
                                 f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
        mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
    return x.reshape(-1, x.shape[-1]), mask


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows, mask = as_rows(x, mask)
    return rows if mask is None else rows[mask]


def histogram_counts(x: torch.Tensor, spec: HistogramSpec, all_finite: bool = False) -> torch.Tensor:
    """``[d, bins + 2]`` int64 counts of the finite values of ``x: [N, d]``.

    Bin of value v: ``floor((v - lo) * bins / (hi - lo))`` clamped to ``[-1, bins]``, plus one
    (0 = underflow, ``bins + 1`` = overflow), in float32 (the kernel's formula) or, for float64
    ``x``, in float64. Only the bin (a small integer, exact in float32) is computed in floating
    point; the flat index ``neuron * (bins + 2) + 1 + bin`` is int64 arithmetic, exact for any
    ``d * (bins + 2)`` (a float32 index is exact only below 2**24). Computed in reused buffers
    with ``scatter_add_``; ``all_finite=True`` (the caller knows there is no NaN/inf) skips the
    finiteness mask.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    n, d = x.shape
    nb = spec.bins + 2
    dump = d * nb  # NaN/inf land here and are dropped
    lo = spec.lo.to(x.device, dt)
    scale = spec.bins / (spec.hi.to(x.device, dt) - lo)
    work = _WS.get("hist_work", (n, d), dt, x.device)
    torch.sub(x, lo, out=work).mul_(scale).floor_().clamp_(-1, spec.bins)
    if not all_finite:
        work.nan_to_num_(0.0)  # NaN has no integer value; these entries are sent to ``dump``
    idx = _WS.get("hist_idx", (n, d), torch.int64, x.device)
    idx.copy_(work)
    idx.add_(torch.arange(d, device=x.device, dtype=torch.int64) * nb + 1)
    if not all_finite:
        idx.masked_fill_(~torch.isfinite(x), dump)
    idx = idx.view(-1)
    ones = _WS.get("hist_ones", (n * d,), torch.int64, x.device)
    if not _WS.filled.get(("hist_ones", str(x.device)), 0) >= n * d:
        ones.fill_(1)
        _WS.filled[("hist_ones", str(x.device))] = n * d
    counts = torch.zeros(dump + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx, ones)
    return counts[:dump].view(d, nb)


class _Workspace:
    """Reusable scratch buffers: CPU elementwise ops that allocate fresh 10-100 MB tensors
    spend most of their time in page faults, so the fast path writes into these instead."""

    def __init__(self):
        self.bufs: dict = {}
        self.filled: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        key = (name, dtype, str(device))
        n = int(torch.Size(shape).numel())
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=device)
            self.bufs[key] = buf
            self.filled.pop((name, str(device)), None)
        return buf[:n].view(shape)


_WS = _Workspace()


def _empty_partials(d, dev, hist, dtype=torch.float64):
    out = {k: torch.zeros(d, dtype=torch.float64, device=dev) for k in PARTIAL_KEYS}
    out["min"] = torch.full((d,), float("inf"), dtype=torch.float64, device=dev)
    out["max"] = torch.full((d,), float("-inf"), dtype=torch.float64, device=dev)
    if hist is not None:
        out["hist"] = torch.zeros(d, hist.bins + 2, dtype=torch.int64, device=dev)
    return out


def _select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[n, d]`` rows of ``x`` where ``mask``: float64 stays float64, every other dtype becomes
    float32 (into a reused buffer when a copy is needed)."""
    if x.dim() == 1:
        x = x[None]
    d = x.shape[-1]
    if mask is not None and mask.shape != x.shape[:-1]:
        raise SkillLensError(f"mask shape {tuple(mask.shape)} does not match activations "
                             f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, d)
    if mask is None or bool(mask.all()):
        if flat.dtype == dt and flat.is_contiguous():
            return flat
        return _WS.get("rows", flat.shape, dt, x.device).copy_(flat)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    out = _WS.get("rows", (idx.numel(), d), flat.dtype, x.device)
    torch.index_select(flat, 0, idx, out=out)
    return out if out.dtype == dt else out.to(dt)


def _update_block(x, count, mean, m2, mn, mx, sum_abs, n_pos):
    """One block ``x: [n, d]`` (float32) folded into float64 running state ``[d]`` (count, mean,
    M2, min, max, sum |x|, n > 0), all in one graph for ``torch.compile``: sums in float64
    around the running mean (the first row before any data), Chan's formula with a scalar
    ``n``. Returns ``(ok, new state ...)``; ``ok`` is False when ``x`` holds NaN/inf or the
    block's float64 sums lost more than 1e-9 of M2 to cancellation (callers then use
    :func:`batch_partials`)."""
    n = x.shape[0]
    xd = x.double()
    sh = torch.where(count > 0, mean, xd[0])
    y = xd - sh
    s1, s2 = y.sum(0), (y * y).sum(0)
    bm2 = s2 - s1 * s1 / n
    ok = torch.isfinite(s2).all() & (bm2 >= 1e-9 * s2).all()
    total = count + n
    delta = sh + s1 / n - mean
    frac = n / total
    return (ok, total, mean + delta * frac, m2 + bm2 + delta * delta * count * frac,
            torch.minimum(mn, x.amin(0).double()), torch.maximum(mx, x.amax(0).double()),
            sum_abs + xd.abs().sum(0), n_pos + (x > 0).sum(0, dtype=torch.float64))


_FUSED: dict = {}


def fused_update():
    """:func:`_update_block` compiled once per process (inductor's C++ backend; its cache on
    disk makes later processes fast), or None when ``SKILLLENS_FUSED_STATS=0`` or compiling
    fails (no C++ compiler ...: a warning, then the eager path)."""
    if "fn" not in _FUSED:
        import os
        import warnings
        _FUSED["fn"] = None
        if os.environ.get("SKILLLENS_FUSED_STATS", "1") != "0":
            try:
                fn = torch.compile(_update_block, dynamic=True)
                z = torch.zeros(8, dtype=torch.float64)
                fn(torch.randn(64, 8), z, z, z, z - 1, z + 1, z, z)  # compile now, fail here
                _FUSED["fn"] = fn
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"compiled statistics unavailable ({type(e).__name__}: {e}); "
                              f"using the eager torch path", stacklevel=3)
    return _FUSED["fn"]


#: recompute a neuron in float64 when its shifted sums would lose more than this share of M2 to
#: cancellation (the block mean lies more than ~3 standard deviations from the shift)
_CANCEL = 0.1


def batch_partials(x: torch.Tensor, mask: torch.Tensor | None = None,
                   hist: HistogramSpec | None = None, stats=None,
                   shift: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sufficient statistics of one block ``x: [..., d]`` per neuron (torch path).

    Eager path (the compiled :func:`fused_update` is the CPU default for large blocks). One
    reduction over tokens sums a stacked ``[k, n, d]`` workspace holding ``x - shift``,
    ``(x - shift)^2``, ``|x|`` and ``x > 0`` (four elementwise passes into reused buffers, no
    allocation), plus ``amin``/``amax``. ``shift: [d]`` (default: the block mean;
    ``NeuronStats`` passes its running mean) keeps large offsets from cancelling;
    neurons whose block mean is still far from the shift are recomputed exactly in float64.
    float64 input is computed in float64, everything else in float32 with float64 results.
    NaN/inf (or float32 overflow) send the block to :func:`float64_partials`. ``stats`` (subset
    of ``ALL_STATS``, default all) skips work nobody reads.
    """
    x = _select_rows(x.detach(), mask)
    n, d = x.shape
    dev, dt = x.device, x.dtype
    if n == 0:
        return _empty_partials(d, dev, hist)
    want = ALL_STATS if stats is None else stats
    if n == 1:
        sh = x[0]
    else:  # no running mean yet: the block mean (one reduction) keeps cancellation away
        sh = x.mean(0) if shift is None else shift.to(dev, dt)
    rows = ["x", "xx"] + [s for s in ("abs", "positive") if s in want]
    work = _WS.get("stack", (len(rows), n, d), dt, dev)
    torch.sub(x, sh, out=work[0])
    torch.mul(work[0], work[0], out=work[1])
    if "abs" in want:
        torch.abs(x, out=work[rows.index("abs")])
    if "positive" in want:
        torch.gt(x, 0, out=work[rows.index("positive")])
    sums = work.sum(1).double()  # cascade summation: ~log(n) eps, unlike a BLAS gemv
    if not bool(torch.isfinite(sums).all()):
        return float64_partials(x, hist=hist)
    s1, s2 = sums[0], sums[1]
    mean = sh.double() + s1 / n
    m2 = s2 - s1 * s1 / n
    bad = m2 < _CANCEL * s2
    if bool(bad.any()):  # shift far from the block mean: exact two-pass float64 for those
        cols = bad.nonzero().squeeze(1)
        xd = x.index_select(1, cols).double()
        mean[cols] = xd.mean(0)
        m2[cols] = (xd - mean[cols]).square_().sum(0)
    out = Partials(count=torch.full((d,), float(n), dtype=torch.float64, device=dev),
                   mean=mean, m2=m2.clamp_(min=0),
                   n_nonfinite=torch.zeros(d, dtype=torch.float64, device=dev))
    out.uniform_n = n
    if "abs" in want:
        out["sum_abs"] = sums[rows.index("abs")]
    if "positive" in want:
        out["n_pos"] = sums[rows.index("positive")]
    if "extrema" in want:
        out["min"], out["max"] = x.amin(0).double(), x.amax(0).double()
    if hist is not None:
        out["hist"] = histogram_counts(x, hist, all_finite=True)
    return out


def float64_partials(x: torch.Tensor, mask: torch.Tensor | None = None,
                     hist: HistogramSpec | None = None) -> dict[str, torch.Tensor]:
    """Partials of the finite values of ``x: [N, k]`` (rows where ``mask: [N]``), in float64.

    The one fallback of both paths (torch and the Triton kernel) for blocks with NaN/inf or
    float32 overflow: each non-finite value is counted in ``n_nonfinite`` and excluded
    elementwise from everything else."""
    xs = x if mask is None else x[mask.bool()]
    xd = xs.double()
    fin = torch.isfinite(xd)
    count = fin.sum(0, dtype=torch.float64)
    x0 = torch.where(fin, xd, 0.0)
    mean = x0.sum(0) / count.clamp(min=1)
    out = {"count": count, "mean": mean,
           "m2": (torch.where(fin, xd - mean, 0.0) ** 2).sum(0),
           "min": torch.where(fin, xd, float("inf")).amin(0),
           "max": torch.where(fin, xd, float("-inf")).amax(0),
           "sum_abs": x0.abs().sum(0), "n_pos": (x0 > 0).sum(0, dtype=torch.float64),
           "n_nonfinite": (~fin).sum(0, dtype=torch.float64)}
    if hist is not None:
        out["hist"] = histogram_counts(xs, hist)  # binned in the input's precision
    return out


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Exact combination of two (count, mean, M2) summaries (float64 tensors)."""
    n = count_a + count_b
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return n, torch.where(n > 0, mean, torch.zeros_like(mean)), m2
