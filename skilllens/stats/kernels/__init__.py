"""Optional fused GPU kernels (Triton) for per-neuron statistics.

``fused_partials(x, mask=None, hist=None)`` returns the same dict as
:func:`skilllens.stats.batch_partials` from one read of ``x: [..., d]``; ``triton_available()``
says whether it can run here (Triton installed and a CUDA device, or ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import torch

from skilllens.errors import SkillLensError
from skilllens.stats.partials import HistogramSpec

__all__ = ["fused_partials", "triton_available"]


def triton_available() -> bool:
    """True if Triton imports and there is a CUDA device (or ``TRITON_INTERPRET=1`` is set)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return interpret or torch.cuda.is_available()


def fused_partials(x: torch.Tensor, mask: torch.Tensor | None = None,
                   hist: HistogramSpec | None = None, **launch) -> dict[str, torch.Tensor]:
    """Per-neuron partials of ``x: [..., d]`` (rows where ``mask: [...]`` is True): float64 ``[d]``
    count, mean, m2, min, max, sum_abs, n_pos, n_nonfinite and int64 ``hist: [d, bins + 2]``."""
    try:
        from skilllens.stats.kernels.triton_stats import fused_partials as _fused
    except ImportError as e:
        raise SkillLensError("the fused statistics kernel needs Triton (pip install triton); "
                             "or use backend='torch'") from e
    return _fused(x, mask, hist, **launch)
