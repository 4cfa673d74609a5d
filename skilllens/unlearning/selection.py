"""Neuron selection shared by the unlearning methods: top-percent picks, argument checks."""
from __future__ import annotations

import math

import torch

from skilllens.data.items import Skill
from skilllens.errors import SkillLensError

SCOPES = ("global", "per_layer")


def check_percent(percent: float, what: str = "percent") -> float:
    """``percent`` must lie in (0, 100]."""
    try:
        p = float(percent)
    except (TypeError, ValueError):
        raise SkillLensError(f"{what} must be a number in (0, 100], got {percent!r}") from None
    if not (0 < p <= 100) or math.isnan(p):
        raise SkillLensError(f"{what} must lie in (0, 100] (e.g. 0.5, 1.5 or 3), got {percent}")
    return p


def top_percent(scores: torch.Tensor, percent: float, scope: str = "global",
                widths=None) -> dict[int, torch.Tensor]:
    """Select the top ``percent`` % of ``scores [n_layers, d]``: ``{row: sorted indices}``.

    ``widths``: the number of real neurons of each row (``[n_layers]`` ints, each ``<= d``;
    default ``d`` for every row); columns ``>= widths[r]`` are padding (a per-layer ``d_ff``,
    see :meth:`skilllens.core.collect.StatsCollection.stacked`) and are neither counted nor
    selected. ``global``: one threshold across rows, ``round(p/100 * sum(widths))`` neurons (at
    least 1); ``per_layer``: ``round(p/100 * widths[r])`` (at least 1) in row ``r``. NaN scores
    (e.g. experts no token reached) count as neurons but are never selected, so a row or the
    whole selection may come out smaller. Ties break by index (lower first). Rows with nothing
    selected are left out. Raises ``SkillLensError`` for an unknown scope, a percent outside
    (0, 100] or ``widths`` that do not fit ``scores``.
    """
    if scope not in SCOPES:
        raise SkillLensError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    percent = check_percent(percent)
    n_rows, d = scores.shape
    widths = [d] * n_rows if widths is None else [int(w) for w in widths]
    if len(widths) != n_rows or any(not 0 <= w <= d for w in widths):
        raise SkillLensError(f"widths {widths} do not fit scores of shape {tuple(scores.shape)}: "
                             f"give one width per row, each at most {d}")
    s = scores.double()
    real = torch.arange(d)[None, :] < torch.tensor(widths)[:, None]
    ok = real & ~torch.isnan(s)  # padding and NaN scores are never selected

    def best(vals: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the ``k`` largest ``vals`` (stable: equal values keep index order)."""
        return torch.sort(vals, descending=True, stable=True).indices[:k]

    if scope == "global":
        k = max(1, round(percent / 100 * sum(widths)))
        rows, cols = ok.nonzero(as_tuple=True)  # row-major: ties break by (row, index)
        top = best(s[rows, cols], k)
        rows, cols = rows[top], cols[top]
        return {r: torch.sort(cols[rows == r]).values for r in range(n_rows) if (rows == r).any()}
    out = {}
    for r in range(n_rows):
        cols = ok[r].nonzero(as_tuple=True)[0]
        if cols.numel():
            k = max(1, round(percent / 100 * widths[r]))
            out[r] = torch.sort(cols[best(s[r, cols], k)]).values
    return out


def check_disjoint(forget: Skill, retain: Skill) -> None:
    """Forget and retain must not be the same skill (or share items)."""
    if forget.source and forget.name in retain.name.split("+"):
        raise SkillLensError(f"forget and retain both name {forget.name!r}; a skill cannot be "
                             f"forgotten and kept at once: drop it from the retain list")
    shared = {(it.id, it.text) for it in forget.items} & {(it.id, it.text) for it in retain.items}
    if shared:
        raise SkillLensError(f"forget and retain share {len(shared)} items (e.g. "
                             f"{sorted(shared)[0][0]!r}); use different skills")


def collect_forget_retain(method, lm, forget, retain, stats: tuple[str, ...], *, data_dir=None,
                          progress: bool = True, forget_stats=None, retain_stats=None):
    """The fitting input every statistics-based method shares: ``forget`` (specs: their probe
    part) and the pooled ``retain`` skills resolved, checked disjoint and collected at
    ``method.site`` (``stats``), unless precomputed ``StatsCollection``s are given. Sets
    ``method.meta_`` (names, hashes, sources) and returns ``(forget_stats, retain_stats)``."""
    from skilllens.core.collect import collect
    from skilllens.data import combine_skills, resolve_skills

    f_skill = resolve_skills(forget, data_dir, part="probe")
    r_skill = combine_skills(retain, data_dir)  # the probe parts
    check_disjoint(f_skill, r_skill)
    kw = dict(sites=[method.site], layers=method.layers, tokens=method.tokens,
              batch_size=method.batch_size, max_length=method.max_length, stats=stats,
              progress=progress)
    fs = forget_stats or collect(lm, f_skill, **kw)
    rs = retain_stats or collect(lm, r_skill, **kw)
    method.meta_ = {"forget": f_skill.name, "retain": r_skill.name,
                   "forget_hash": f_skill.digest(), "retain_hash": r_skill.digest(),
                   "forget_source": f_skill.source, "retain_source": r_skill.source}
    return fs, rs


def check_same_layers(forget_stats, retain_stats, site: str) -> list[int]:
    """The layers both collections cover at ``site`` (an error if they differ)."""
    layers = forget_stats.layers(site)
    if layers != retain_stats.layers(site):
        raise SkillLensError("forget and retain statistics cover different layers; collect "
                             "both with the same layers")
    return layers


META_KEYS = ("forget", "retain", "forget_hash", "retain_hash")
#: artifact metadata that is not fit metadata (``meta_`` gets every other key back on load)
_SAVED_STATE = ("params", "fitted_layers", "fingerprint", "kind", "skilllens_version", "created")


def save_fitted(method, path, tensors: dict, kind: str):
    """Save a fitted method as an artifact: its tensors, ``get_params()``, fitted layers, meta
    and the fingerprint of the model it was fitted on."""
    from skilllens.core.artifacts import save_artifact

    meta = {"params": method.get_params(), "fitted_layers": method.fitted_layers_, **method.meta_}
    return save_artifact(path, tensors, meta, kind=kind, fingerprint=method.fingerprint_)


def load_fitted(cls, path, kind: str, model=None):
    """``(method, tensors)`` of an artifact written by :func:`save_fitted` (with ``model``, its
    fingerprint must match)."""
    from skilllens.core.artifacts import load_artifact

    tensors, meta = load_artifact(path, kind=kind, model=model)
    obj = cls(**meta["params"])
    obj.fingerprint_, obj.fitted_layers_ = meta.get("fingerprint"), meta["fitted_layers"]
    obj.meta_ = {k: v for k, v in meta.items() if k not in _SAVED_STATE}  # all fit metadata
    obj.scores_ = tensors["scores"]
    return obj, tensors
