"""Choosing KSD's ``alpha`` from probe queries only (issue 21; METHODS.md 2b).

The reference fixes ``alpha`` per skill by hand (GSM8K 2.0, MBPP 1.4, languages 0.06: two orders
of magnitude apart), so no fixed value or fixed upper bound tuned on one model serves another.
:func:`choose_alpha` searches ``(0, cap]`` in both directions from any start:

1. **Retain bound.** ``r``: cube scores of the retain *probe* queries (a query is inside the
   cube iff its score ``<= alpha``). With ``n_fp = floor(max_fpr * n_r)``, every
   ``alpha < r_(n_fp+1)`` (the ``(n_fp+1)``-th smallest) keeps at most a ``max_fpr`` share of
   them inside. The largest feasible alpha is ``a_hi = min(cap, r_(n_fp+1) / (1 + margin))``
   (strictly below ``r_(n_fp+1)`` also when ``margin == 0``): the margin keeps unseen retain
   queries a factor ``1 + margin`` away from the cube's face.
2. **Forget catch.** ``h``: *held-out* cube scores of the forget probe queries
   (:func:`heldout_scores`: each query scored by a cube fitted without it, K-fold; in-sample
   scores are all ``<= 1`` by the definition of ``k`` and would say nothing about unseen
   queries). The catch at ``alpha`` is the share of ``h <= alpha``; it grows with ``alpha``,
   so its largest value under the retain bound is the catch at ``a_hi``.
3. **Choice.** The smallest alpha reaching that catch, ``a_min = max{h_i : h_i <= a_hi}``,
   widened by the same margin for unseen forget queries and kept feasible:
   ``alpha = min(a_hi, a_min * (1 + margin))`` (``a_hi`` when no probe query is caught).

No evaluation item is ever looked at. ``cap`` (default :data:`ALPHA_CAP` = 100, 50 times the
reference's largest value) only binds when the retain probes lie far outside the cube.

The cube's own scale ``k`` (the smallest with every probe vector inside ``m +- k*s``) is
:func:`exact_k` (closed form), checked by :func:`search_k` (binary search on ``[0, K_MAX]``).
"""
from __future__ import annotations

import math

import torch

from skilllens.errors import SkillLensError

ALPHA_CAP = 100.0
MARGIN = 0.1
N_FOLDS = 5


def _cube_scores(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``[n_test]`` scores of ``test`` under the cube fitted on ``train`` (float64; mean,
    population std, ``k = max |v - m| / s``; dims with ``s == 0`` left out)."""
    train, test = train.double(), test.double()
    m, s = train.mean(0), train.std(0, unbiased=False)
    live = s > 0
    if not live.any():
        return torch.zeros(test.shape[0], dtype=torch.float64)
    k = float(((train[:, live] - m[live]).abs() / s[live]).max())
    return ((test[:, live] - m[live]).abs() / (max(k, 1e-30) * s[live])).max(1).values


def heldout_scores(vectors: torch.Tensor, n_folds: int = N_FOLDS) -> torch.Tensor:
    """``[n]`` cross-fitted cube scores of the probe vectors ``[n, d]``: row ``i`` (fold
    ``i % K``, ``K = min(n_folds, n)``) is scored by the cube of the other folds. With fewer
    than 3 rows no cube can be fitted without one of them: the in-sample scores are returned."""
    n = vectors.shape[0]
    if n < 3:
        return _cube_scores(vectors, vectors)
    folds = min(int(n_folds), n)
    idx = torch.arange(n)
    out = torch.empty(n, dtype=torch.float64)
    for j in range(folds):
        test = idx % folds == j
        out[test] = _cube_scores(vectors[~test], vectors[test])
    return out


def curve_grid(cap: float, extra=(), n: int = 25) -> list[float]:
    """Log-spaced alphas from 0.01 to ``cap`` plus ``extra`` (the points the report shows)."""
    lo, hi = math.log10(0.01), math.log10(cap)
    grid = {round(10 ** (lo + (hi - lo) * i / (n - 1)), 6) for i in range(n)}
    return sorted(grid | {float(a) for a in extra})


def choose_alpha(forget_heldout: torch.Tensor, retain_scores: torch.Tensor, *,
                 max_fpr: float = 0.05, margin: float = MARGIN, cap: float = ALPHA_CAP) -> dict:
    """The rule in the module docstring. ``forget_heldout``: ``[n_f]`` held-out forget probe
    scores; ``retain_scores``: ``[n_r]`` retain probe scores under the fitted cube. Returns
    ``{"alpha", "alpha_feasible_max", "forget_probe_catch", "retain_probe_fpr", "curve", ...}``
    (JSON-ready). Raises ``SkillLensError`` for settings out of range or when a retain probe
    query sits at the cube's centre (no alpha > 0 is feasible)."""
    if not 0.0 <= float(max_fpr) < 1.0:
        raise SkillLensError(f"max_fpr must be in [0, 1) (the share of retain probe queries "
                             f"allowed inside the cube), got {max_fpr}")
    if not float(margin) >= 0.0:
        raise SkillLensError(f"margin must be >= 0, got {margin}")
    if not (float(cap) > 0 and math.isfinite(float(cap))):
        raise SkillLensError(f"the alpha cap must be a positive number, got {cap}")
    r = retain_scores.double().sort().values
    h = forget_heldout.double()
    if len(r) == 0:
        raise SkillLensError("calibration needs at least one retain probe query")
    if len(h) == 0:
        raise SkillLensError("calibration needs the forget probe queries' held-out scores; "
                             "fit the detector first")
    n_fp = int(math.floor(float(max_fpr) * len(r)))
    bound = float(r[n_fp])
    a_hi = min(float(cap), math.nextafter(bound, 0.0), bound / (1.0 + float(margin)))
    if not a_hi > 0:
        raise SkillLensError("calibration found a retain probe query at the cube's centre "
                             "(score 0); the forget and retain probes are not separable here")
    caught = h[h <= a_hi]
    alpha = a_hi if len(caught) == 0 else min(a_hi, float(caught.max()) * (1.0 + float(margin)))

    def point(a: float) -> dict:
        return {"alpha": a, "forget_probe_catch": float((h <= a).double().mean()),
                "retain_probe_fpr": float((r <= a).double().mean())}
    return {"rule": "largest held-out forget probe catch with retain probe FPR <= max_fpr; "
                    "smallest such alpha, widened by (1 + margin) within the bound",
            "alpha": alpha, "alpha_feasible_max": a_hi, "alpha_cap": float(cap),
            "max_fpr": float(max_fpr), "margin": float(margin), "n_retain_probe": len(r),
            "n_forget_probe": len(h), **{k: v for k, v in point(alpha).items() if k != "alpha"},
            "min_retain_probe_score": float(r[0]),
            "curve": [point(a) for a in curve_grid(cap, (alpha, a_hi))]}


#: the largest hypercube scale :func:`search_k` tries
K_MAX = 1e4


def search_k(vectors: torch.Tensor, m: torch.Tensor, s: torch.Tensor, lo: float = 0.0,
             hi: float = K_MAX, tol: float = 1e-9) -> float:
    """Smallest ``k`` in ``[lo, hi]`` with every row of ``vectors`` inside ``m +- k*s`` (binary
    search; dims with ``s == 0`` are ignored). Raises if even ``hi`` does not contain them."""
    live = s > 0
    dev = (vectors[:, live] - m[live]).abs().double()
    bound = s[live].double()

    def inside(k: float) -> bool:
        return bool((dev <= k * bound).all())

    if not inside(hi):
        raise SkillLensError(f"the probe vectors do not fit in the cube even at k={hi}; the probe "
                             f"set has extreme outliers: remove them or use more probe items")
    for _ in range(200):
        if hi - lo <= tol * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if inside(mid):
            hi = mid
        else:
            lo = mid
    return hi


def exact_k(vectors: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> float:
    """``max over rows and dims with s > 0 of |v - m| / s`` (the closed form of :func:`search_k`)."""
    live = s > 0
    if not live.any():
        return 0.0
    return float(((vectors[:, live].double() - m[live].double()).abs() / s[live].double()).max())
