"""Intrinsic (vector) and behavioural (answer) metrics for concept-vector edits.

Behavioural scores are in [0, 1]: the mean over pairs of sentence BLEU (sacrebleu, divided by
100) and ROUGE-L F1 (rouge-score) of edited answers against the original model's answers,
tokenized by the answers' script (:mod:`skilllens.concepts.tokenize`; recorded in the result).
Two identical strings (also two empty ones) score 1. Every pair is scored (the reference
scored only the last 10 of 50 unrelated answers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skilllens.concepts.tokenize import TOKENIZE, UnicodeTokenizer, detect_script
from skilllens.io import JsonRecord
from skilllens.errors import DataError


@dataclass
class TextScores(JsonRecord):
    """Mean BLEU and ROUGE-L over ``n`` pairs, with the tokenization they were computed with
    (``script`` of the answers; sacrebleu tokenizer ``bleu_tokenize``; ROUGE-L tokenizer
    ``rouge_tokenize``: see :mod:`skilllens.concepts.tokenize`)."""

    bleu: float
    rougeL: float
    n: int
    script: str = "latin"
    bleu_tokenize: str = "13a"
    rouge_tokenize: str = "words"


def _pairs(preds: list[str], refs: list[str]):
    if len(preds) != len(refs):
        raise DataError(f"{len(preds)} predictions but {len(refs)} references; score answers to "
                        f"the same questions")
    if not refs:
        raise DataError("no answers to score")
    return list(zip(preds, refs))


def _tokenize(preds, refs, which: int, tokenize: str | None) -> str:
    if tokenize is not None:
        return tokenize
    return TOKENIZE[detect_script(list(preds) + list(refs))][which]


def bleu_scores(preds: list[str], refs: list[str], tokenize: str | None = None) -> list[float]:
    """Sentence BLEU in [0, 1] per pair (sacrebleu, exponential smoothing, Papineni et al. 2002).

    ``tokenize``: a sacrebleu tokenizer name; None picks it from the answers' script
    (:data:`skilllens.concepts.tokenize.TOKENIZE`: ``13a`` for Latin, ``zh`` for Chinese ...)."""
    from sacrebleu.metrics import BLEU

    pairs = _pairs(preds, refs)
    metric = BLEU(effective_order=True, tokenize=_tokenize(preds, refs, 0, tokenize))
    return [1.0 if p.strip() == r.strip() else metric.sentence_score(p, [r]).score / 100.0
            for p, r in pairs]


def rouge_l_scores(preds: list[str], refs: list[str], tokenize: str | None = None) -> list[float]:
    """ROUGE-L F1 in [0, 1] per pair (rouge-score; Lin 2004) with a Unicode-aware tokenizer.

    ``tokenize``: ``words`` or ``chars`` (:class:`UnicodeTokenizer`); None picks it from the
    answers' script. On ASCII text ``words`` equals rouge-score's default tokenizer."""
    from rouge_score import rouge_scorer

    pairs = _pairs(preds, refs)
    tok = UnicodeTokenizer(_tokenize(preds, refs, 1, tokenize))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tok)
    return [1.0 if p.strip() == r.strip() else scorer.score(r, p)["rougeL"].fmeasure
            for p, r in pairs]


def text_scores(preds: list[str], refs: list[str]) -> TextScores:
    """Mean BLEU and ROUGE-L of ``preds`` against ``refs`` (all pairs), tokenized by the script
    of the answers (one choice for the whole set, recorded in the result)."""
    _pairs(preds, refs)
    script = detect_script(list(preds) + list(refs))
    bt, rt = TOKENIZE[script]
    b, r = bleu_scores(preds, refs, bt), rouge_l_scores(preds, refs, rt)
    return TextScores(sum(b) / len(b), sum(r) / len(r), len(b), script, bt, rt)


@dataclass
class IntrinsicScores(JsonRecord):
    """How much an edit moved a concept vector (original ``v`` -> edited ``v'``)."""

    cosine: float
    l2: float
    jaccard_top: float
    article_share_before: float
    article_share_after: float
    k: int


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in float64; 0 when either vector is zero."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def jaccard(a, b) -> float:
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def article_keys(tokenizer, text: str) -> set[str]:
    """Normalised (stripped, lower-cased) keys of the tokens of ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {k for k in (tokenizer.decode([i]).strip().lower() for i in set(ids)) if k}


def article_share(tokenizer, ids, keys: set[str]) -> float:
    """Share of token ``ids`` whose key occurs in the article's ``keys``."""
    ids = [int(i) for i in ids]
    if not ids:
        return 0.0
    return sum(tokenizer.decode([i]).strip().lower() in keys for i in ids) / len(ids)


def intrinsic_scores(lm, original: torch.Tensor, edited: torch.Tensor, article: str,
                     k: int = 200, through_norm: bool = False) -> IntrinsicScores:
    """Cosine, L2, Jaccard of the top-``k`` token sets and article share before/after."""
    from skilllens.concepts.vocab import top_token_ids

    ids_a = top_token_ids(lm, 0, 0, k, through_norm, vector=original).tolist()
    ids_b = top_token_ids(lm, 0, 0, k, through_norm, vector=edited).tolist()
    keys = article_keys(lm.tokenizer, article)
    return IntrinsicScores(cosine(original, edited),
                           float((original.double() - edited.double()).norm()),
                           jaccard(ids_a, ids_b), article_share(lm.tokenizer, ids_a, keys),
                           article_share(lm.tokenizer, ids_b, keys), k)


@dataclass
class BehaviourScores:
    """Scores of one edit on one concept: per prompt set, text scores and log-prob drops."""

    text: dict[str, TextScores]
    logprob_drop: dict[str, float] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self, with_answers: bool = False) -> dict:
        d = {"text": {k: v.to_dict() for k, v in self.text.items()},
             "logprob_drop": dict(self.logprob_drop)}
        if with_answers:
            d["answers"] = self.answers
        return d
