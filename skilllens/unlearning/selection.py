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
