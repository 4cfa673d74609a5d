"""Streaming, exactly mergeable per-neuron statistics: the engine every method reads.

- :mod:`~skilllens.stats.partials`: one block of activations -> float64 partials (count, mean,
  m2, min, max, sum_abs, n_pos, n_nonfinite, histogram), Chan merging, the one float64 fallback.
- :mod:`~skilllens.stats.running`: statistic objects (``update``/``merge``/``state_dict``).
- :mod:`~skilllens.stats.quantiles`: quantiles from histograms.
- :mod:`~skilllens.stats.neuron_stats`: :class:`NeuronStats`, all statistics of one site.
- :mod:`~skilllens.stats.kernels`: the fused Triton kernel producing the same partials.

>>> import torch
>>> from skilllens.stats import Moments
>>> s = Moments(4).update(torch.randn(100, 4) + 5.0)
>>> s.mean.shape
torch.Size([4])
"""
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.stats.partials import (ALL_STATS, DEFAULT_STATS, PARTIAL_KEYS, HistogramSpec,
                                      Partials, batch_partials, chan_merge, float64_partials,
                                      fused_update, histogram_counts)
from skilllens.stats.quantiles import histogram_quantiles
from skilllens.stats.running import (AbsMean, Extrema, Histogram, Moments, NonFinite,
                                     PositiveFraction)

__all__ = ["NeuronStats", "Moments", "Extrema", "AbsMean", "PositiveFraction", "NonFinite",
           "Histogram", "HistogramSpec", "Partials", "batch_partials", "chan_merge",
           "float64_partials", "fused_update", "histogram_counts", "histogram_quantiles",
           "ALL_STATS", "DEFAULT_STATS", "PARTIAL_KEYS"]
