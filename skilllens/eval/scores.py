"""What an evaluation returns: :class:`SkillScore`, per-item rows, summaries, :func:`relative`.

Every mean is over all items, abstained ones included (see :mod:`skilllens.eval.evaluation`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from skilllens.errors import DataError, SkillLensError

METRICS = ("token_accuracy", "nll", "exact_match", "pass@1", "f1", "substring")
TEACHER_FORCED = ("token_accuracy", "nll")
LOWER_IS_BETTER = ("nll",)

@dataclass
class SkillScore:
    """One skill under one model state. ``score`` is the headline of ``metric`` (for ``nll``: mean
    NLL, lower is better: ``higher_is_better`` says which); ``accuracy`` is token accuracy
    (teacher-forced) or the mean item score (generation); ``nll`` is NaN for generation metrics.
    All means are over all ``n_items``, abstained ones included (module docstring):
    ``abstain_nll`` is the NLL charged per abstained item, ``nll_answered`` the mean NLL of the
    answered items only. ``n_truncated`` items were cut to ``max_length``;
    ``n_merged_boundary`` items had a token spanning their prompt/answer join (teacher-forced,
    :mod:`skilllens.core.batching`)."""

    skill: str
    metric: str
    score: float
    accuracy: float
    nll: float
    n_items: int
    n_abstained: int
    per_item: list[dict] = field(default_factory=list)
    n_truncated: int = 0
    higher_is_better: bool = True
    abstain_nll: float = float("nan")
    nll_answered: float = float("nan")
    n_merged_boundary: int = 0

    def to_dict(self, per_item: bool = True) -> dict:
        """JSON-ready dict (NaN -> None); ``per_item=False`` drops the item list."""
        d = asdict(self)
        if not per_item:
            d.pop("per_item")
        return _nan_to_none(d)


def _nan_to_none(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_nan_to_none(v) for v in o]
    return o


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` means a better model (False for ``nll``)."""
    if metric not in METRICS:
        raise SkillLensError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric not in LOWER_IS_BETTER


def relative(after: float, before: float, metric: str = "token_accuracy") -> float:
    """Relative performance, direction-aware so that ``< 1`` always means worse at the skill:
    ``after / before`` for higher-is-better metrics (0 when ``before == 0``), ``before / after``
    for ``nll`` (1 when both are 0, inf when only ``after`` is). NaN when either is NaN/None."""
    if after is None or before is None or math.isnan(after) or math.isnan(before):
        return float("nan")
    after, before = float(after), float(before)
    if higher_is_better(metric):
        return 0.0 if before == 0 else after / before
    if after == 0:
        return 1.0 if before == 0 else float("inf")
    return before / after


def abstained_row(metric: str, penalty: float) -> dict:
    """Per-item row of an abstained item: score/accuracy 0, NLL ``penalty`` (module docstring)."""
    if metric in TEACHER_FORCED:
        return {"score": penalty if metric == "nll" else 0.0, "accuracy": 0.0, "nll": penalty,
                "n_tokens": 0, "truncated": False}
    return {"score": 0.0, "truncated": False}


def summarize(name: str, metric: str, per_item: list[dict], penalty: float) -> SkillScore:
    """The :class:`SkillScore` of per-item rows (``abstained``, ``score``, teacher-forced also
    ``accuracy``/``nll``); every mean is over all rows (evaluate and the audit share it)."""
    n = len(per_item)
    if n == 0:
        raise DataError(f"skill {name!r} has no items to score")
    answered = [r for r in per_item if not r["abstained"]]
    n_trunc = sum(bool(r.get("truncated")) for r in per_item)
    nll = nll_answered = float("nan")
    if metric in TEACHER_FORCED:
        accuracy = sum(r["accuracy"] for r in per_item) / n
        nll = sum(r["nll"] for r in per_item) / n
        if answered:
            nll_answered = sum(r["nll"] for r in answered) / len(answered)
        score = accuracy if metric == "token_accuracy" else nll
    else:
        score = accuracy = sum(r["score"] for r in per_item) / n
    return SkillScore(name, metric, score, accuracy, nll, n, n - len(answered), per_item,
                      n_truncated=n_trunc, higher_is_better=higher_is_better(metric),
                      abstain_nll=penalty, nll_answered=nll_answered,
                      n_merged_boundary=sum(bool(r.get("merged_boundary")) for r in per_item))
