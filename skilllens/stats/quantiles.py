"""Per-neuron quantiles from fixed-bin histograms, vectorised over all neurons.

``histogram_quantiles(counts, lo, hi, qs)`` treats the values inside each bin as spread uniformly
and interpolates linearly. With ``n`` counted values of one neuron and rank ``r = q * n``, the bin
``j`` holding the answer is the first one whose cumulative count reaches ``r``: the same bin that
holds the order statistic ``x_(k)``, ``k = max(1, ceil(q * n))`` (the "inverted CDF" sample
quantile). Hence, **if that bin is inside ``[lo, hi)``, the error is at most one bin width
``(hi - lo) / bins``** (plus float rounding).

Quantiles whose rank falls into the underflow (overflow) bin return ``lo`` (``hi``): these are
only bounds, the true quantile is below ``lo`` (at or above ``hi``). Neurons with no counted
values give NaN.

>>> import torch
>>> counts = torch.tensor([[0, 1, 1, 1, 1, 0]])  # 4 bins on [0, 4), one value per bin
>>> histogram_quantiles(counts, torch.tensor([0.0]), torch.tensor([4.0]), [0.0, 0.5, 1.0])
tensor([[0.],
        [2.],
        [4.]], dtype=torch.float64)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from skilllens.errors import SkillLensError


def histogram_quantiles(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                        qs: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Quantiles ``[len(qs), d]`` (float64) from ``counts: [d, bins + 2]`` (bin 0 underflow,
    bin ``bins + 1`` overflow) with per-neuron ranges ``lo, hi: [d]`` and ``qs`` in ``[0, 1]``."""
    if counts is None or lo is None or hi is None:
        raise SkillLensError("histogram has no range yet (no data was added)")
    if counts.dim() != 2 or counts.shape[1] < 3:
        raise SkillLensError(f"counts must be [d, bins + 2] with bins >= 1, got "
                             f"{tuple(counts.shape)}")
    d, nb = counts.shape
    bins = nb - 2
    dev = counts.device
    q = torch.as_tensor(qs, dtype=torch.float64, device=dev).reshape(-1)
    if q.numel() and not bool(((q >= 0) & (q <= 1)).all()):
        raise SkillLensError(f"quantiles must lie in [0, 1], got {q.tolist()}")
    lo = torch.as_tensor(lo, dtype=torch.float64, device=dev).expand(d)
    hi = torch.as_tensor(hi, dtype=torch.float64, device=dev).expand(d)

    c = counts.to(torch.float64)
    cum = c.cumsum(1)                                   # [d, bins + 2]
    total = cum[:, -1:]                                 # [d, 1]
    rank = q[None, :] * total                           # [d, Q]
    # first bin whose cumulative count reaches the rank; cum holds integers, so searching for
    # max(rank, 0.5) also makes rank 0 land in the first non-empty bin
    j = torch.searchsorted(cum, rank.clamp(min=0.5), side="left").clamp(max=nb - 1)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), 0.0)
    in_bin = c.gather(1, j)
    frac = ((rank - before) / in_bin.clamp(min=1)).clamp(0, 1)
    width = ((hi - lo) / bins)[:, None]
    val = lo[:, None] + ((j - 1).to(torch.float64) + frac) * width
    val = torch.where(j == 0, lo[:, None], val)
    val = torch.where(j == nb - 1, hi[:, None], val)
    val = torch.where(total > 0, val, float("nan"))
    return val.t().contiguous()
