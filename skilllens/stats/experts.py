"""``ExpertStats``: per-neuron statistics of a mixture-of-experts layer, one ``NeuronStats`` per
expert, read out over the flattened neuron axis ``j = offsets[e] + i``.

Each expert sees only the tokens routed to it, so every expert has its own per-neuron
``count``; the flattened export is an ordinary ``NeuronStats`` export (per-neuron counts, Chan's
merge per neuron), hence exactly mergeable with other collections and saved like any site.

>>> import torch
>>> from skilllens.stats.experts import ExpertStats
>>> st = ExpertStats([3, 3], ("moments",))
>>> _ = st.update_expert(0, torch.ones(5, 3)); _ = st.update_expert(1, torch.zeros(2, 3))
>>> st.count.tolist()
[5.0, 5.0, 5.0, 2.0, 2.0, 2.0]
"""
from __future__ import annotations

import torch

from skilllens.errors import SkillLensError
from skilllens.stats.neuron_stats import DEFAULT_STATS, NeuronStats


class ExpertStats:
    """Statistics of experts of widths ``widths`` (routed experts, then shared experts)."""

    def __init__(self, widths, stats=DEFAULT_STATS, bins: int = 256, hist_range=None,
                 device=None, backend: str = "auto"):
        self.widths = [int(w) for w in widths]
        self.stats = tuple(stats)
        self.experts = [NeuronStats(w, stats, bins, hist_range, device, backend)
                        for w in self.widths]
        self.d = sum(self.widths)

    @property
    def offsets(self) -> list[int]:
        return [sum(self.widths[:e]) for e in range(len(self.widths))]

    @property
    def components(self):
        return [c for st in self.experts for c in st.components]

    @property
    def histogram(self):
        return None  # per-expert histograms: ranges are per neuron already

    def update_expert(self, expert: int, x: torch.Tensor, mask=None) -> "ExpertStats":
        """Add expert ``expert``'s activations ``x [n, f_e]`` (rows where ``mask`` is True)."""
        self.experts[expert].update(x, mask)
        return self

    def update(self, x, mask=None):
        raise SkillLensError("ExpertStats is updated per expert (update_expert): each expert "
                             "sees only the tokens routed to it")

    def flat(self) -> NeuronStats:
        """One ``NeuronStats`` over the flattened neurons (exact)."""
        return NeuronStats.from_export(self.export())

    def export(self) -> dict[str, torch.Tensor]:
        parts = [st.export() for st in self.experts]
        keys = set.intersection(*(set(p) for p in parts))
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    def merge(self, other) -> "ExpertStats":
        """Exact merge of another ``ExpertStats`` or a flattened ``NeuronStats`` of equal width."""
        if other.d != self.d:
            raise SkillLensError(f"cannot merge expert statistics of width {other.d} into {self.d}")
        if isinstance(other, ExpertStats):
            theirs = other.experts
        else:
            t = other.export()
            theirs = [NeuronStats.from_export({k: v[o:o + w] for k, v in t.items()})
                      for o, w in zip(self.offsets, self.widths)]
        for mine, th in zip(self.experts, theirs):
            mine.merge(th)
        return self

    def warn_if_out_of_range(self, label: str = "", limit: float = 0.01) -> float:
        return max([st.warn_if_out_of_range(f"{label} expert {e}", limit)
                    for e, st in enumerate(self.experts)] or [0.0])

    def __getattr__(self, name):
        if name in ("count", "mean", "var", "std", "n_nonfinite", "min", "max", "mean_abs",
                    "frac_pos"):
            return torch.cat([getattr(st, name) for st in self.experts])
        raise AttributeError(name)
