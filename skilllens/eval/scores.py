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
    ``after / before`` for higher-is-better metrics, ``before / after`` for ``nll`` (inf when
    only ``after`` is 0). An undefined ratio is NaN: the baseline ``before`` is 0 (a method
    that does nothing must not read as "fully forgotten"; reports print
    ``undefined: baseline 0``), or either score is NaN/None."""
    if after is None or before is None or math.isnan(after) or math.isnan(before):
        return float("nan")
    after, before = float(after), float(before)
    higher = higher_is_better(metric)
    if before == 0:
        return float("nan")
    if higher:
        return after / before
    return float("inf") if after == 0 else before / after


#: a baseline score at most this far above 0 (or above chance) makes relative scores meaningless
NEAR_ZERO = 0.05


def chance_level(items, metric: str) -> float:
    """Expected score of guessing: ``1 / 4`` for MMLU-style items (``meta["answer"]`` one of
    the letters A-D: four lettered choices, the answer one letter token) under every
    higher-is-better metric, else 0 (open answers). NaN for ``nll`` (its chance level is the
    uniform distribution's ``log V``: :attr:`SkillScore.abstain_nll`)."""
    if not higher_is_better(metric):
        return float("nan")
    items = list(items)
    if items and all(str(getattr(it, "meta", {}).get("answer", "")) in ("A", "B", "C", "D")
                     for it in items):
        return 0.25
    return 0.0


def baseline_warnings(baseline: dict, items: dict) -> list[str]:
    """One message per skill whose baseline (``{name: SkillScore}``) is at or near 0 or at
    chance (``items``: ``{name: items scored}``, for :func:`chance_level`): its relative scores
    are undefined (baseline 0) or say nothing about forgetting."""
    out = []
    for name, sc in baseline.items():
        score = sc.score
        if score is None or math.isnan(score):
            continue
        if sc.higher_is_better:
            chance = chance_level(items.get(name, ()), sc.metric)
            if score <= NEAR_ZERO:
                why = "at or near 0" + (" (relative: undefined: baseline 0)" if score == 0
                                        else "")
            elif chance > 0 and score <= chance + NEAR_ZERO:
                why = f"at chance ({chance:.2f})"
            else:
                continue
        elif score <= 1e-6:
            why = "0 (relative: undefined: baseline 0)"
        elif math.isfinite(sc.abstain_nll) and score >= sc.abstain_nll * (1 - NEAR_ZERO):
            why = f"at chance (uniform: {sc.abstain_nll:.2f} nats)"
        else:
            continue
        out.append(f"baseline {sc.metric} of {name!r} is {score:.3f}, {why}: the model cannot do "
                   f"this skill before any method, so its relative scores do not measure "
                   f"forgetting; use a metric or model with a baseline well above chance")
    return out


def format_relative(value, baseline, nd: int = 3) -> str:
    """``relative`` for reports: ``undefined: baseline 0`` where the baseline is 0, ``n/a``
    for other missing values, else ``nd`` decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined: baseline 0" if baseline == 0 else "n/a"
    return f"{value:.{nd}f}"


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
