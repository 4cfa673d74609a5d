"""``NeuronStats``: every per-neuron statistic of one site/layer, from one pass per batch.

>>> import torch
>>> from skilllens.stats.neuron_stats import NeuronStats
>>> a, b = NeuronStats(8), NeuronStats(8)
>>> x = torch.randn(50, 8)
>>> _ = a.update(x[:20]); _ = b.update(x[20:])
>>> bool(torch.allclose(a.merge(b).mean, x.double().mean(0)))
True
"""
from __future__ import annotations

import warnings

import torch

from skilllens.errors import SkillLensError
from skilllens.stats.partials import (ALL_STATS, DEFAULT_STATS, _select_rows, batch_partials,
                                      fused_update, histogram_counts)
from skilllens.stats.running import (AbsMean, Extrema, Histogram, Moments, NonFinite,
                                     PositiveFraction, owned)

#: with ``backend="auto"``, CPU blocks with at least this many values take the compiled path
FUSE_MIN = 1 << 15

#: tensors written per site/layer by ``StatsCollection.save`` (``{site}.{layer}.{stat}``)
EXPORTED = ("count", "mean", "var", "std", "m2", "min", "max", "mean_abs", "sum_abs",
            "frac_pos", "n_pos", "n_nonfinite", "hist", "hist_lo", "hist_hi")


def _kernel_partials(x, mask, spec):
    """Fused Triton kernel when available and ``x`` is on CUDA (or TRITON_INTERPRET=1)."""
    from skilllens.stats.kernels import fused_partials  # noqa: WPS433 (optional dependency)
    return fused_partials(x, mask, spec)


class NeuronStats:
    """Composite of per-neuron statistics over ``d`` neurons.

    ``stats``: any of ``moments`` (count/mean/var/std), ``extrema`` (min/max), ``abs`` (mean |x|),
    ``positive`` (fraction > 0), ``histogram`` (``bins`` fixed bins, range from ``hist_range`` or
    the first batch). NaN/inf are always counted (``n_nonfinite``) and excluded elsewhere.
    ``backend``: ``"auto"`` (fused Triton kernel on CUDA when installed; on the CPU the compiled
    one-pass update for blocks of at least ``FUSE_MIN`` values, else torch), ``"torch"`` (eager
    ops), ``"compiled"`` (the compiled CPU update for every block) or ``"triton"``.
    """

    def __init__(self, d: int, stats=DEFAULT_STATS, bins: int = 256, hist_range=None,
                 device=None, backend: str = "auto"):
        unknown = set(stats) - set(ALL_STATS)
        if unknown:
            raise SkillLensError(f"unknown statistics {sorted(unknown)}; choose from {ALL_STATS}")
        if backend not in ("auto", "torch", "compiled", "triton"):
            raise SkillLensError(f"unknown statistics backend {backend!r}; use auto, torch, "
                                 f"compiled or triton")
        self.d, self.backend, self.stats = int(d), backend, tuple(stats)
        self.moments = Moments(d, device)
        self.nonfinite = NonFinite(d, device)
        self.extrema = Extrema(d, device) if "extrema" in stats else None
        self.abs = AbsMean(d, device) if "abs" in stats else None
        self.positive = PositiveFraction(d, device) if "positive" in stats else None
        self.histogram = None
        if "histogram" in stats:
            lo, hi = hist_range if hist_range is not None else (None, None)
            self.histogram = Histogram(d, bins, lo, hi, device)

    @property
    def components(self):
        return [c for c in (self.moments, self.nonfinite, self.extrema, self.abs, self.positive,
                            self.histogram) if c is not None]

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            return True
        if not x.is_cuda:
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> "NeuronStats":
        """Add a block ``x: [..., d]`` (rows where ``mask`` is True)."""
        if x.shape[-1] != self.d:
            raise SkillLensError(f"activations have {x.shape[-1]} neurons; these statistics "
                                 f"have {self.d}")
        hist = self.histogram
        if hist is not None:
            hist.ensure_range(x, mask)
        spec = hist.spec if hist is not None else None
        if self._update_compiled(x, mask, spec):
            return self
        if self._use_kernel(x):
            p = _kernel_partials(x.detach(), mask, spec)
        else:
            m = self.moments
            shift = m.mean if bool(m.count.any()) else None  # running mean: little cancellation
            p = batch_partials(x.detach(), mask, spec, self.stats, shift)
        n = getattr(p, "uniform_n", None)
        if n is not None and p["mean"].device == self.moments.mean.device:
            self._add_uniform(p, n)
        else:
            for c in self.components:
                c.update_partials(p)
        return self

    def _update_compiled(self, x: torch.Tensor, mask, spec) -> bool:
        """One compiled pass (:func:`skilllens.stats.partials.fused_update`) for the default
        statistics of a float32 CPU block; False (nothing changed) when it does not apply."""
        if self.backend not in ("auto", "compiled") or x.is_cuda or x.dtype == torch.float64 \
                or None in (self.extrema, self.abs, self.positive):
            return False
        if self.backend == "auto" and x.numel() < FUSE_MIN:
            return False
        fn = fused_update()
        rows = _select_rows(x.detach(), mask) if fn is not None else None
        if rows is None or rows.shape[0] == 0 or rows.device != self.moments.mean.device:
            return False
        mo, ex = self.moments, self.extrema
        ok, *new = fn(rows, mo.count, mo.mean, mo.m2, ex.min, ex.max, self.abs.total,
                      self.positive.total)
        if not bool(ok):  # NaN/inf or cancellation: the eager path handles it exactly
            return False
        mo.count, mo.mean, mo.m2, ex.min, ex.max, self.abs.total, self.positive.total = new
        self.abs.count = self.positive.count = mo.count
        if spec is not None:
            self.histogram.counts += histogram_counts(rows, spec, all_finite=True)
        return True

    def _add_uniform(self, p: dict, n: int) -> None:
        """Combine partials where every neuron counted ``n`` finite values (the common case)
        with fewer small ops than the components' general ``update_partials``: Chan's formula
        with a scalar ``n``, no non-finite counts to add."""
        mo = self.moments
        total = mo.count + n
        frac = n / total
        delta = p["mean"] - mo.mean
        mo.mean = torch.addcmul(mo.mean, delta, frac)
        mo.m2 = torch.addcmul(mo.m2 + p["m2"], delta.mul_(delta), mo.count * frac)
        mo.count = total
        if self.extrema is not None:
            self.extrema.min = torch.minimum(self.extrema.min, p["min"])
            self.extrema.max = torch.maximum(self.extrema.max, p["max"])
        for comp, key in ((self.abs, "sum_abs"), (self.positive, "n_pos")):
            if comp is not None:
                comp.total, comp.count = comp.total + p[key], comp.count + n
        if self.histogram is not None:
            self.histogram.update_partials(p)

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Exact merge (same statistics and, for histograms, the same range); ``other`` may be
        the per-expert :class:`~skilllens.stats.experts.ExpertStats` of a MoE layer."""
        if hasattr(other, "flat"):
            other = other.flat()
        if other.d != self.d or set(other.stats) != set(self.stats):
            raise SkillLensError(f"cannot merge statistics {other.stats} (d={other.d}) into "
                                 f"{self.stats} (d={self.d})")
        for mine, theirs in zip(self.components, other.components):
            mine.merge(theirs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, c in self._named():
            for k, v in c.state_dict().items():
                out[f"{name}.{k}"] = v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "NeuronStats":
        for name, c in self._named():
            c.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()
                               if k.startswith(name + ".")})
        return self

    def _named(self):
        names = ("moments", "nonfinite", "extrema", "abs", "positive", "histogram")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]

    # --- read-outs -----------------------------------------------------------------------
    count = property(lambda self: self.moments.count)
    mean = property(lambda self: self.moments.mean)
    var = property(lambda self: self.moments.var)
    std = property(lambda self: self.moments.std)
    n_nonfinite = property(lambda self: self.nonfinite.n_nonfinite)

    def _need(self, comp, name):
        if comp is None:
            raise SkillLensError(f"statistic {name!r} was not collected; add it to stats=")
        return comp

    min = property(lambda self: self._need(self.extrema, "extrema").min)
    max = property(lambda self: self._need(self.extrema, "extrema").max)
    mean_abs = property(lambda self: self._need(self.abs, "abs").value)
    frac_pos = property(lambda self: self._need(self.positive, "positive").value)

    def quantiles(self, qs) -> torch.Tensor:
        """``[len(qs), d]`` per-neuron quantiles from the histogram."""
        return self._need(self.histogram, "histogram").quantiles(qs)

    def export(self) -> dict[str, torch.Tensor]:
        """Flat tensors named by statistic (see ``EXPORTED``), float64 on the CPU; each one a copy
        that shares no storage with these statistics."""
        out = {"count": self.count, "mean": self.mean, "var": self.var, "std": self.std,
               "m2": self.moments.m2, "n_nonfinite": self.n_nonfinite}
        if self.extrema is not None:
            out.update(min=self.extrema.min, max=self.extrema.max)
        if self.abs is not None:
            out.update(mean_abs=self.abs.value, sum_abs=self.abs.total)
        if self.positive is not None:
            out.update(frac_pos=self.positive.value, n_pos=self.positive.total)
        if self.histogram is not None and self.histogram.lo is not None:
            out.update(hist=self.histogram.counts, hist_lo=self.histogram.lo,
                       hist_hi=self.histogram.hi)
        return {k: owned(v) for k, v in out.items()}  # copies: never the live state

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor]) -> "NeuronStats":
        stats = ["moments"]
        if "min" in t:
            stats.append("extrema")
        if "sum_abs" in t:
            stats.append("abs")
        if "n_pos" in t:
            stats.append("positive")
        if "hist" in t:
            stats.append("histogram")
        d = t["count"].shape[0]
        s = cls(d, stats, bins=t["hist"].shape[1] - 2 if "hist" in t else 256)
        s.moments.load_state_dict({"count": t["count"], "mean": t["mean"], "m2": t["m2"]})
        s.nonfinite.load_state_dict({"n_nonfinite": t["n_nonfinite"]})
        if s.extrema is not None:
            s.extrema.load_state_dict({"min": t["min"], "max": t["max"]})
        if s.abs is not None:
            s.abs.load_state_dict({"total": t["sum_abs"], "count": t["count"]})
        if s.positive is not None:
            s.positive.load_state_dict({"total": t["n_pos"], "count": t["count"]})
        if s.histogram is not None:
            s.histogram.load_state_dict({"counts": t["hist"], "lo": t["hist_lo"], "hi": t["hist_hi"]})
        return s

    def warn_if_out_of_range(self, label: str = "", limit: float = 0.01) -> float:
        """Warn when more than ``limit`` of some neuron's values fell outside the histogram
        range (they are kept in the under/overflow bins); returns the worst fraction."""
        if self.histogram is None or self.histogram.lo is None:
            return 0.0
        worst = float(self.histogram.out_of_range_fraction.max())
        if worst > limit:
            n = int((self.histogram.out_of_range_fraction > limit).sum())
            warnings.warn(f"{label}: the histogram range misses up to {worst:.1%} of the values of "
                          f"{n} neurons (counted in the under/overflow bins); widen hist_range",
                          stacklevel=2)
        return worst

    def __repr__(self) -> str:
        from skilllens.stats.display import neuron_stats_display
        return neuron_stats_display(self, figure=False).text

    def _repr_html_(self) -> str:
        from skilllens.stats.display import neuron_stats_display
        return neuron_stats_display(self)._repr_html_()
