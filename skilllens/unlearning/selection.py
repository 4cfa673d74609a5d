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


def top_percent(scores: torch.Tensor, percent: float, scope: str = "global") -> dict[int, torch.Tensor]:
    """Select the top ``percent`` % of ``scores [n_layers, d]``: ``{row: sorted indices}``.

    ``global``: one threshold across rows (``round(p/100 * n_layers * d)`` neurons, at least 1);
    ``per_layer``: ``round(p/100 * d)`` (at least 1) in every row. Ties break by index.
    """
    if scope not in SCOPES:
        raise SkillLensError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    percent = check_percent(percent)
    n_rows, d = scores.shape
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    if scope == "global":
        k = max(1, round(percent / 100 * n_rows * d))
        flat = torch.topk(s.reshape(-1), k, sorted=True).indices
        rows, cols = flat // d, flat % d
        return {r: torch.sort(cols[rows == r]).values for r in range(n_rows) if (rows == r).any()}
    k = max(1, round(percent / 100 * d))
    return {r: torch.sort(torch.topk(s[r], k).indices).values for r in range(n_rows)}


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
