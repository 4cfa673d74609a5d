"""Statistics across ``torch.distributed`` ranks that must agree before collection starts."""
from __future__ import annotations

import torch

from skilllens.errors import SkillLensError


def agree_histogram_ranges(histograms, group=None) -> None:
    """Give every rank the same automatic histogram ranges: per neuron the smallest ``lo`` and
    the largest ``hi`` over the ranks (a rank without a range yet takes part with an empty one).
    Histograms no rank has a range for stay without one. A no-op outside ``torch.distributed``.
    """
    import torch.distributed as dist

    if not histograms or not dist.is_available() or not dist.is_initialized():
        return
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    inf = float("inf")
    lo = torch.stack([h.lo.to(dev, torch.float32) if h.lo is not None else
                      torch.full((h.d,), inf, device=dev) for h in histograms])
    hi = torch.stack([h.hi.to(dev, torch.float32) if h.hi is not None else
                      torch.full((h.d,), -inf, device=dev) for h in histograms])
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    for h, l, u in zip(histograms, lo, hi):
        if bool(torch.isfinite(l).all()):
            if h.lo is not None and not (torch.equal(h.lo, l.to(h.lo.device))
                                         and torch.equal(h.hi, u.to(h.hi.device))) \
                    and int(h.counts.sum()):
                raise SkillLensError("a histogram already holds counts for another range; agree "
                                     "on ranges before collecting")
            h.set_range(l.cpu(), u.cpu())
