"""The unlearning papers' three columns (Li et al. 2025, Table 1): the forgotten skill, the other
skills, and general knowledge (MMLU), from an audit's ``results.json``.

Multiple-choice retain skills (MMLU-Redux: items with ``meta["choices"]``) are also scored the
way lm-eval scores them (:mod:`skilllens.eval.multiple_choice`: ``acc``, ``acc_norm``, chance
0.25); the audit stores those under ``results["multiple_choice"]``:
``{"chance", "baseline": {skill: score}, "methods": {method: {skill: score + "relative"}}}``,
``relative`` = ``acc after / acc before``, with ``near_chance`` set when the baseline ``acc`` is
within two binomial standard errors of chance (then ``relative`` says nothing about forgetting).
"""
from __future__ import annotations

import math


def multiple_choice_skills(parts: dict) -> list[str]:
    """Skills whose eval items are all multiple-choice (``meta`` has ``choices``)."""
    return [s for s, (_, ev) in parts.items()
            if ev.items and all("choices" in it.meta for it in ev.items)]


def score_skills(lm, parts: dict, names: list[str], mc_names: list[str], ev: dict,
                 recorders: dict | None = None) -> tuple[dict, dict]:
    """``({skill: SkillScore}, {mc skill: MultipleChoiceScore})`` on the eval parts, one
    teacher-forced pass per skill (interventions active if the caller applied them): the
    multiple-choice scores of ``mc_names`` are read from that pass
    (:class:`~skilllens.eval.multiple_choice.ChoiceRecorder`; lm-eval ``acc``/``acc_norm``,
    ``token_accuracy`` left to ``evaluate``); ``recorders``: ``{skill: recorder}`` entered
    around its pass and given each batch (``PromptVectorRecorder``: KSD's queries)."""
    import contextlib

    from skilllens.eval import evaluate
    from skilllens.eval.multiple_choice import ChoiceRecorder

    scores, mc = {}, {}
    for s in names:
        items = parts[s][1].items
        rec = (recorders or {}).get(s)
        ch = ChoiceRecorder(lm, items, ev["max_length"], ev["batch_size"]) \
            if s in mc_names else None
        with rec if rec is not None else contextlib.nullcontext():
            scores[s] = evaluate(lm, parts[s][1], on_batch=rec and rec.on_batch,
                                 on_logits=ch and ch.on_logits, **ev)
        if ch is not None:
            mc[s] = ch.score(s)
    return scores, mc


def entry(scores: dict, baseline: dict | None = None) -> dict:
    """JSON entry per skill: ``acc``, ``acc_norm``, ``n_items``, ``n_abstained``, ``chance``,
    ``near_chance`` of the baseline, and ``relative`` acc (when ``baseline`` is given)."""
    out = {}
    for s, sc in scores.items():
        d = {k: v for k, v in sc.to_dict(per_item=False).items() if k != "token_accuracy"}
        if baseline is not None:
            b = baseline[s]
            d["relative"] = sc.acc / b.acc if b.acc else float("nan")
            d["near_chance"] = b.near_chance
        out[s] = d
    return out


def three_columns(results: dict) -> list[dict]:
    """One row per state (baseline, then each method): ``forget`` (relative score of the forget
    skill), ``other`` (mean relative score of the retain skills that are not multiple-choice),
    ``mmlu`` (relative lm-eval ``acc`` of the first multiple-choice retain skill), ``mmlu_acc``
    and ``mmlu_near_chance``. NaN where a column has no skill."""
    mc = results.get("multiple_choice", {})
    mc_skill = next(iter(mc.get("baseline", {})), None)
    others = [s for s in results["retain"] if s != mc_skill]
    rows = []
    base_acc = mc["baseline"][mc_skill]["acc"] if mc_skill else float("nan")
    near = mc["baseline"][mc_skill]["near_chance"] if mc_skill else False
    rows.append({"state": "baseline", "forget": 1.0,
                 "other": 1.0 if others else float("nan"),
                 "mmlu": 1.0 if mc_skill else float("nan"), "mmlu_acc": base_acc,
                 "mmlu_near_chance": near})
    for m, v in results["methods"].items():
        rel = v["relative"]
        vals = [rel[s] for s in others if rel.get(s) is not None]
        mm = mc.get("methods", {}).get(m, {}).get(mc_skill, {}) if mc_skill else {}
        rows.append({"state": m, "forget": rel[results["forget"]],
                     "other": sum(vals) / len(vals) if vals else float("nan"),
                     "mmlu": mm.get("relative", float("nan")),
                     "mmlu_acc": mm.get("acc", float("nan")), "mmlu_near_chance": near})
    return rows


def format_columns(results: dict) -> list[str]:
    """Console lines: forget / other skills / MMLU-Redux (relative; MMLU also its acc)."""
    mc = results.get("multiple_choice", {})
    mc_skill = next(iter(mc.get("baseline", {})), None)
    others = [s for s in results["retain"] if s != mc_skill]
    f = lambda x, nd=2: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) \
        else f"{x:.{nd}f}"  # noqa: E731
    lines = [f"  {'state':12s}{'forget':>8s}{'other':>8s}   {mc_skill or 'MMLU'} acc (relative)",
             f"  {'':12s}{results['forget'][:8]:>8s}{'(mean)':>8s}   other: {', '.join(others)}"]
    for r in three_columns(results):
        flag = "  near chance (0.25)" if r["mmlu_near_chance"] and mc_skill else ""
        lines.append(f"  {r['state'][:12]:12s}{f(r['forget']):>8s}{f(r['other']):>8s}   "
                     f"{f(r['mmlu_acc'], 3)} ({f(r['mmlu'])}){flag}")
    return lines
