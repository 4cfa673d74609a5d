"""Streaming, exactly mergeable per-neuron statistics (torch path).

Each statistic has ``update(x, mask=None)`` with ``x: [..., d]`` (any float dtype, bf16 included)
and ``mask: [...]`` (bool, True = count this row), an exact ``merge(other)``, ``state_dict()`` and
``load_state_dict()``. Moments use float64 accumulators and Chan's pairwise combination, so
splitting data into batches, processes or resumed runs gives the same result as one pass.

A batch is first reduced to *partials* (``batch_partials``: count, mean, m2, min, max, sum_abs,
n_pos, n_nonfinite, hist per neuron); the fused Triton kernel produces the same partials on GPU.
float64 input stays float64; other dtypes are reduced in float32 into float64 accumulators.
NaN/inf values are counted in ``n_nonfinite`` and excluded from every other statistic.

>>> import torch
>>> s = Moments(4).update(torch.randn(100, 4) + 5.0)
>>> s.mean.shape, bool((s.std > 0.5).all())
(torch.Size([4]), True)
"""
from __future__ import annotations

import torch

from skilllens.errors import SkillLensError
from skilllens.stats.partials import HistogramSpec, _flatten, batch_partials, chan_merge


def owned(t: torch.Tensor, device="cpu", dtype=None) -> torch.Tensor:
    """A contiguous copy of ``t`` on ``device`` (in ``dtype``) that shares no storage with it.

    Every state dict, export and load goes through this: ``merge`` adds histogram counts in
    place, so a copy that shared storage with its original would change the original."""
    return t.detach().to(device=device, dtype=dtype, copy=True,
                         memory_format=torch.contiguous_format)


class _Statistic:
    """Common state handling: subclasses list their tensor ``_fields``."""

    _fields: tuple[str, ...] = ()

    def __init__(self, d: int, device=None):
        self.d = int(d)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._init()

    def _zeros(self, fill=0.0):
        return torch.full((self.d,), fill, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        if x.shape[-1] != self.d:
            raise SkillLensError(f"activations have {x.shape[-1]} neurons, statistic has {self.d}")
        self.update_partials(batch_partials(x, mask, getattr(self, "spec", None)))
        return self

    def _check_peer(self, other):
        if type(other) is not type(self) or other.d != self.d:
            raise SkillLensError(f"cannot merge {type(other).__name__}(d={other.d}) into "
                                 f"{type(self).__name__}(d={self.d})")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the state tensors: the dict owns its storage (changing this statistic,
        or merging into one loaded from the dict, never changes the other)."""
        return {f: owned(getattr(self, f)) for f in self._fields}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        for f in self._fields:
            if f not in state:
                raise SkillLensError(f"{type(self).__name__} state lacks {f!r}")
            t = state[f]
            if t.shape[0] != self.d:
                raise SkillLensError(f"{type(self).__name__}: state {f!r} has {t.shape[0]} "
                                     f"neurons, expected {self.d}")
            setattr(self, f, owned(t, self.device))
        return self

    def to(self, device):
        self.device = torch.device(device)
        for f in self._fields:
            if getattr(self, f) is not None:
                setattr(self, f, getattr(self, f).to(self.device))
        return self


class Moments(_Statistic):
    """count, mean, M2 per neuron (float64); ``var`` (population), ``std``, ``sample_var``."""

    _fields = ("count", "mean", "m2")

    def _init(self):
        self.count, self.mean, self.m2 = self._zeros(), self._zeros(), self._zeros()

    def update_partials(self, p):
        self.count, self.mean, self.m2 = chan_merge(
            self.count, self.mean, self.m2, p["count"].to(self.device, torch.float64),
            p["mean"].to(self.device, torch.float64), p["m2"].to(self.device, torch.float64))

    def merge(self, other: "Moments"):
        self._check_peer(other)
        self.update_partials({"count": other.count, "mean": other.mean, "m2": other.m2})
        return self

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count.clamp(min=1)

    @property
    def sample_var(self) -> torch.Tensor:
        return self.m2 / (self.count - 1).clamp(min=1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


class Extrema(_Statistic):
    """min and max per neuron (``+inf``/``-inf`` before any value)."""

    _fields = ("min", "max")

    def _init(self):
        self.min, self.max = self._zeros(float("inf")), self._zeros(float("-inf"))

    def update_partials(self, p):
        self.min = torch.minimum(self.min, p["min"].to(self.device, torch.float64))
        self.max = torch.maximum(self.max, p["max"].to(self.device, torch.float64))

    def merge(self, other: "Extrema"):
        self._check_peer(other)
        self.update_partials({"min": other.min, "max": other.max})
        return self


class _CountedSum(_Statistic):
    _key = ""

    def _init(self):
        self.total, self.count = self._zeros(), self._zeros()

    def update_partials(self, p):
        self.total = self.total + p[self._key].to(self.device, torch.float64)
        self.count = self.count + p["count"].to(self.device, torch.float64)

    def merge(self, other):
        self._check_peer(other)
        self.total, self.count = self.total + other.total, self.count + other.count
        return self

    @property
    def value(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class AbsMean(_CountedSum):
    """mean |x| per neuron."""

    _fields = ("total", "count")
    _key = "sum_abs"


class PositiveFraction(_CountedSum):
    """fraction of values > 0 per neuron."""

    _fields = ("total", "count")
    _key = "n_pos"


class NonFinite(_Statistic):
    """number of NaN/inf values seen per neuron (excluded from every other statistic)."""

    _fields = ("n_nonfinite",)

    def _init(self):
        self.n_nonfinite = self._zeros()

    def update_partials(self, p):
        self.n_nonfinite = self.n_nonfinite + p["n_nonfinite"].to(self.device, torch.float64)

    def merge(self, other):
        self._check_peer(other)
        self.n_nonfinite = self.n_nonfinite + other.n_nonfinite
        return self


class Histogram(_Statistic):
    """Fixed-bin histogram per neuron: ``counts: [d, bins + 2]`` (under- and overflow at the ends).

    The range is per neuron: give ``lo``/``hi`` (floats or ``[d]`` tensors), or leave them out and
    the first update sets ``[min - m, max + m]`` with ``m = 0.25 * (max - min)`` (a warm-up batch).
    """

    _fields = ("counts", "lo", "hi")

    def __init__(self, d: int, bins: int = 256, lo=None, hi=None, device=None):
        self.bins = int(bins)
        if self.bins < 1:
            raise SkillLensError("histogram needs at least one bin")
        self._lo, self._hi = lo, hi
        super().__init__(d, device)

    def _init(self):
        self.counts = torch.zeros(self.d, self.bins + 2, dtype=torch.int64, device=self.device)
        self.lo = self.hi = None
        if self._lo is not None and self._hi is not None:
            self.set_range(self._lo, self._hi)

    def set_range(self, lo, hi):
        lo = torch.as_tensor(lo, dtype=torch.float32, device=self.device).expand(self.d).clone()
        hi = torch.as_tensor(hi, dtype=torch.float32, device=self.device).expand(self.d).clone()
        if not bool((hi > lo).all()):
            raise SkillLensError("histogram range needs hi > lo for every neuron")
        self.lo, self.hi = lo, hi

    def range_from(self, mn: torch.Tensor, mx: torch.Tensor):
        mn, mx = mn.float(), mx.float()
        ok = torch.isfinite(mn) & torch.isfinite(mx)
        mn, mx = torch.where(ok, mn, -1.0), torch.where(ok, mx, 1.0)
        margin = 0.25 * (mx - mn) + 1e-3 * (mx.abs() + mn.abs()) + 1e-6
        self.set_range(mn - margin, mx + margin)

    @property
    def spec(self) -> HistogramSpec | None:
        return None if self.lo is None else HistogramSpec(self.lo, self.hi, self.bins)

    def ensure_range(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set the range from this (warm-up) block if none was given."""
        if self.lo is not None:
            return
        flat = _flatten(x.detach(), mask).float()
        if flat.shape[0]:
            fin = torch.isfinite(flat)
            self.range_from(torch.where(fin, flat, float("inf")).amin(0),
                            torch.where(fin, flat, float("-inf")).amax(0))

    def update(self, x, mask=None):
        self.ensure_range(x, mask)
        return super().update(x, mask)

    def update_partials(self, p):
        h = p.get("hist")
        if h is None:  # no range yet: only a block without any (finite) row may come here
            if bool((p["count"] > 0).any()):
                raise SkillLensError("histogram received data before its range was set; call "
                                     "ensure_range(x, mask) or give lo/hi")
            return
        self.counts += h.to(self.device, torch.int64)

    def merge(self, other: "Histogram"):
        self._check_peer(other)
        if other.bins != self.bins:
            raise SkillLensError(f"histograms have {self.bins} and {other.bins} bins")
        if self.lo is None:
            self.lo, self.hi = other.lo, other.hi
        elif other.lo is not None and not (torch.equal(self.lo, other.lo.to(self.device))
                                           and torch.equal(self.hi, other.hi.to(self.device))):
            raise SkillLensError("histograms with different ranges cannot be merged exactly; "
                                 "fix the range (lo, hi) before collecting")
        self.counts += other.counts.to(self.device)
        return self

    def state_dict(self):
        if self.lo is None:
            return {"counts": owned(self.counts)}
        return super().state_dict()

    def load_state_dict(self, state):
        self.counts = owned(state["counts"], self.device, torch.int64)
        self.bins = self.counts.shape[1] - 2
        if "lo" in state:
            self.lo, self.hi = owned(state["lo"], self.device), owned(state["hi"], self.device)
        return self

    @property
    def out_of_range_fraction(self) -> torch.Tensor:
        total = self.counts.sum(1).clamp(min=1)
        return (self.counts[:, 0] + self.counts[:, -1]).double() / total

    def quantiles(self, qs) -> torch.Tensor:
        """Per-neuron quantiles ``[len(qs), d]`` by linear interpolation inside the bins (see
        :mod:`skilllens.stats.quantiles`; error at most one bin width for in-range quantiles)."""
        from skilllens.stats.quantiles import histogram_quantiles
        return histogram_quantiles(self.counts, self.lo, self.hi, qs)

