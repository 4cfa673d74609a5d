"""Documents of the offline lm-eval tasks (``skilllens/lmeval/tasks/*.yaml``), read from the
data skilllens resolves (``--data-dir``/``$SKILLLENS_DATA``/packaged; never the network).

Each task evaluates skilllens's *eval* part of the skill (the probe part is the task's
``train`` split, for few-shot examples), so lm-eval scores the same items as
``skilllens.evaluate``. Scoring functions mirror :mod:`skilllens.eval.scoring` and
:mod:`skilllens.eval.multiple_choice`; an abstained request (the bridge's KSD: every
log-likelihood ``-inf``, or the refusal text) is scored wrong (see :mod:`skilllens.lmeval.model`).
"""
from __future__ import annotations

import math


def _dataset(rows_probe: list[dict], rows_eval: list[dict]):
    import datasets
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_probe),
                                 "test": datasets.Dataset.from_list(rows_eval)})


def _parts(spec: str, data_dir=None):
    from skilllens.data import load_skill
    return load_skill(spec, data_dir, "probe"), load_skill(spec, data_dir, "eval")


def load_gsm8k(data_dir=None, **_):
    """GSM8K docs ``{id, question, prompt, answer (worked), final}``."""
    def rows(sk):
        return [{"id": it.id, "prompt": it.prompt, "answer": it.answer.strip(),
                 "final": it.meta["final"]} for it in sk]
    return _dataset(*(rows(p) for p in _parts("gsm8k", data_dir)))


def load_mmlu_redux(data_dir=None, subject: str | None = None, **_):
    """MMLU-Redux docs ``{id, subject, prompt, choices, gold}`` (``ok`` rows)."""
    spec = "mmlu-redux" + (f":{subject}" if subject else "")

    def rows(sk):
        return [{"id": it.id, "subject": it.meta["subject"], "prompt": it.prompt,
                 "choices": it.meta["choices"], "gold": it.meta["gold"]} for it in sk]
    return _dataset(*(rows(p) for p in _parts(spec, data_dir)))


def load_xquad(lang: str = "en", data_dir=None, **_):
    """XQuAD docs ``{id, prompt, answers, lang}``."""
    def rows(sk):
        return [{"id": it.id, "prompt": it.prompt, "answers": it.meta["answers"],
                 "lang": lang} for it in sk]
    return _dataset(*(rows(p) for p in _parts(f"xquad-{lang}", data_dir)))


def _abstained(results) -> bool:
    return all(math.isinf(r[0]) and r[0] < 0 for r in results)


def process_multiple_choice(doc, results) -> dict:
    """lm-eval's ``acc``/``acc_norm`` (argmax of the log-likelihoods; per character of the
    choice for ``acc_norm``; ties to the first choice), an abstained question wrong in both."""
    lls = [r[0] for r in results]
    if _abstained(results):
        return {"acc": 0.0, "acc_norm": 0.0}
    n = len(lls)
    pred = max(range(n), key=lambda j: (lls[j], -j))
    pred_n = max(range(n), key=lambda j: (lls[j] / 1.0, -j))  # choices " A".." D": 1 char each
    gold = int(doc["gold"])
    return {"acc": float(pred == gold), "acc_norm": float(pred_n == gold)}


def process_gsm8k(doc, results) -> dict:
    """``exact_match``: the final number of the generation equals the gold one
    (:func:`skilllens.eval.scoring.number_match`, the rule of ``evaluate(..., "exact_match")``)."""
    from skilllens.eval import scoring
    return {"exact_match": float(scoring.number_match(results[0], doc["final"]))}


def process_xquad(doc, results) -> dict:
    """``f1`` and ``exact_match`` against all gold answers (SQuAD normalisation per language,
    :mod:`skilllens.eval.scoring`)."""
    from skilllens.eval import scoring
    text, golds, lang = results[0], list(doc["answers"]), doc.get("lang") or "en"
    return {"f1": float(scoring.f1_score(text, golds, lang)),
            "exact_match": float(scoring.exact_match(text, golds, lang))}
