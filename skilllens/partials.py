"""Block reduction to per-neuron *partials* (torch path) and their exact combination.

``batch_partials(x, mask)`` reduces one block ``x: [..., d]`` to count, mean, m2, min, max,
sum_abs, n_pos, n_nonfinite (and a histogram) per neuron; ``chan_merge`` combines moments
exactly. The fused Triton kernel (:mod:`skilllens.kernels`) returns the same partials on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SkillLensError

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


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 1:
        x = x[None]
    d = x.shape[-1]
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise SkillLensError(f"mask shape {tuple(mask.shape)} does not match activations "
                                 f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
        return x[mask.to(torch.bool)].reshape(-1, d)
    return x.reshape(-1, d)


def histogram_counts(x: torch.Tensor, spec: HistogramSpec, all_finite: bool = False) -> torch.Tensor:
    """``[d, bins + 2]`` int64 counts of the finite values of ``x: [N, d]`` (float32).

    Bin of value v: ``floor((v - lo) * bins / (hi - lo))`` clamped to ``[-1, bins]``, plus one
    (0 = underflow, ``bins + 1`` = overflow). Computed in reused buffers with ``scatter_add_``;
    ``all_finite=True`` (the caller knows there is no NaN/inf) skips the finiteness mask.
    """
    n, d = x.shape
    nb = spec.bins + 2
    dump = d * nb  # NaN/inf land here and are dropped
    lo = spec.lo.to(x.device, torch.float32)
    scale = spec.bins / (spec.hi.to(x.device, torch.float32) - lo)
    work = _WS.get("hist_work", (n, d), torch.float32, x.device)
    torch.sub(x, lo, out=work).mul_(scale).floor_().clamp_(-1, spec.bins)
    work.add_(torch.arange(d, device=x.device, dtype=torch.float32) * nb + 1)
    if not all_finite:
        work.masked_fill_(~torch.isfinite(x), dump)
    idx = _WS.get("hist_idx", (n * d,), torch.int64, x.device)
    idx.copy_(work.view(-1))
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


def _empty_partials(d, dev, hist):
    out = {k: torch.zeros(d, dtype=torch.float64, device=dev) for k in PARTIAL_KEYS}
    out["min"] = torch.full((d,), float("inf"), dtype=torch.float64, device=dev)
    out["max"] = torch.full((d,), float("-inf"), dtype=torch.float64, device=dev)
    if hist is not None:
        out["hist"] = torch.zeros(d, hist.bins + 2, dtype=torch.int64, device=dev)
    return out


def _select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[n, d]`` float32 rows of ``x`` where ``mask`` (into a reused buffer when possible)."""
    if x.dim() == 1:
        x = x[None]
    d = x.shape[-1]
    if mask is not None and mask.shape != x.shape[:-1]:
        raise SkillLensError(f"mask shape {tuple(mask.shape)} does not match activations "
                             f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
    flat = x.reshape(-1, d)
    if mask is None or bool(mask.all()):
        n = flat.shape[0]
        if flat.dtype == torch.float32:
            return flat
        return _WS.get("rows", (n, d), torch.float32, x.device).copy_(flat)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    out = _WS.get("rows", (idx.numel(), d), flat.dtype, x.device)
    torch.index_select(flat, 0, idx, out=out)
    return out if out.dtype == torch.float32 else out.float()


def batch_partials(x: torch.Tensor, mask: torch.Tensor | None = None,
                   hist: HistogramSpec | None = None, stats=None) -> dict[str, torch.Tensor]:
    """Sufficient statistics of one block ``x: [..., d]`` per neuron (torch reference path).

    Sums are BLAS products with a ones vector; moments are two-pass around a shift (the first
    row, then the batch mean), so large offsets (1e4 + N(0, 1)) do not cancel. ``stats``
    (subset of ``ALL_STATS``, default all) skips work for statistics nobody reads.
    """
    x = _select_rows(x.detach(), mask)
    n, d = x.shape
    dev = x.device
    if n == 0:
        return _empty_partials(d, dev, hist)
    want = set(ALL_STATS if stats is None else stats)
    ones = torch.ones(1, n, dtype=torch.float32, device=dev)
    shift = x[0].clone()
    work = _WS.get("work", (n, d), torch.float32, dev)
    torch.sub(x, shift, out=work)
    s1 = (ones @ work)[0]
    work.sub_(s1 / n)
    resid = (ones @ work)[0].double()  # corrected two-pass: fixes the float32 rounding of s1
    work.mul_(work)
    m2 = (ones @ work)[0].double() - resid * resid / n
    mean = shift.double() + s1.double() / n + resid / n
    if not (bool(torch.isfinite(m2).all()) and bool(torch.isfinite(mean).all())):
        return _partials_nonfinite(x, hist)
    out = {"count": torch.full((d,), float(n), dtype=torch.float64, device=dev), "mean": mean,
           "m2": m2, "n_nonfinite": torch.zeros(d, dtype=torch.float64, device=dev)}
    if "extrema" in want:
        out["min"], out["max"] = x.amin(0).double(), x.amax(0).double()
    if "abs" in want:
        out["sum_abs"] = (ones @ torch.abs(x, out=work))[0].double()
    if "positive" in want:
        out["n_pos"] = (ones @ torch.gt(x, 0, out=work))[0].double()
    if hist is not None:
        out["hist"] = histogram_counts(x, hist, all_finite=True)
    return out


def _partials_nonfinite(x: torch.Tensor, hist: HistogramSpec | None) -> dict[str, torch.Tensor]:
    """Slow path when NaN/inf occur: exclude them per element, in float64."""
    xd = x.double()
    finite = torch.isfinite(xd)
    count = finite.sum(0, dtype=torch.float64)
    x0 = torch.where(finite, xd, 0.0)
    mean = x0.sum(0) / count.clamp(min=1)
    out = {"count": count, "mean": mean,
           "m2": (torch.where(finite, xd - mean, 0.0) ** 2).sum(0),
           "min": torch.where(finite, xd, float("inf")).amin(0),
           "max": torch.where(finite, xd, float("-inf")).amax(0),
           "sum_abs": x0.abs().sum(0), "n_pos": (x0 > 0).sum(0, dtype=torch.float64),
           "n_nonfinite": (~finite).sum(0, dtype=torch.float64)}
    if hist is not None:
        out["hist"] = histogram_counts(x, hist)
    return out


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Exact combination of two (count, mean, M2) summaries (float64 tensors)."""
    n = count_a + count_b
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return n, torch.where(n > 0, mean, torch.zeros_like(mean)), m2
