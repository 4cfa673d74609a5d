"""Pure scoring functions for generated answers (no model, no I/O).

* GSM8K: :func:`extract_final_number` (``#### x``, else "the answer is x", else the last number)
  and :func:`number_match`.
* SQuAD/XQuAD/MLQA: :func:`normalize_answer` (lower case, no punctuation, no articles, CJK
  characters split one per token), :func:`f1_score`, :func:`exact_match`, :func:`substring_match`,
  each taking the best over several gold answers.
* Code: :func:`pass_at_k` (the unbiased estimator of Chen et al. 2021) and :func:`pass_at_1`.

>>> extract_final_number("She pays 2 * $1,250 = $2,500.\\n#### 2500")
'2500'
>>> round(f1_score("the Denver Broncos", ["Denver Broncos"]), 3)
1.0
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Iterable

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
ARTICLES = {
    "en": {"a", "an", "the"},
    "es": {"un", "una", "unos", "unas", "el", "la", "los", "las"},
    "de": {"ein", "eine", "einen", "einem", "einer", "eines", "der", "die", "das", "den", "dem",
           "des"},
    "vi": {"những", "của", "các", "cái", "là"},
}


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    if not s or s in ("-", "."):
        return None
    try:
        x = float(s)
    except ValueError:
        return None
    if math.isfinite(x) and x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a chain-of-thought text, normalised (``"1,000.0"`` -> ``"1000"``);
    ``None`` when the text holds no number. Priority: ``#### x``, "the answer is x", last number."""
    if "####" in text:
        after = text.split("####", 1)[1]
        m = _NUMBER.search(after)
        if m:
            return _clean_number(m.group())
    m = _ANSWER_IS.findall(text)
    if m:
        got = _clean_number(m[-1])
        if got is not None:
            return got
    for cand in reversed(_NUMBER.findall(text)):
        got = _clean_number(cand)
        if got is not None:
            return got
    return None


def number_match(prediction: str, gold: str, tol: float = 1e-6) -> bool:
    """True when the final number of ``prediction`` equals ``gold`` (both extracted/normalised)."""
    p = extract_final_number(prediction)
    g = extract_final_number(gold) if gold is not None else None
    if p is None or g is None:
        return False
    return abs(float(p) - float(g)) <= tol * max(1.0, abs(float(g)))


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3040 <= o <= 0x30FF
            or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2A6DF)


def _tokens(text: str, lang: str = "en") -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (unicodedata.category(c).startswith("P") or c in string.punctuation)
                   else c for c in text)
    out = []
    for word in text.split():
        if any(_is_cjk(c) for c in word):   # mixed segmentation: one token per CJK character
            buf = ""
            for c in word:
                if _is_cjk(c):
                    if buf:
                        out.append(buf)
                        buf = ""
                    out.append(c)
                else:
                    buf += c
            if buf:
                out.append(buf)
        else:
            out.append(word)
    articles = ARTICLES.get(lang, ARTICLES["en"] if lang in ("", None) else set())
    return [t for t in out if t not in articles]


def normalize_answer(text: str, lang: str = "en") -> str:
    """SQuAD-style normalisation (MLQA's multilingual variant): NFKC, lower case, punctuation
    removed, the language's articles removed, whitespace collapsed, CJK split by character."""
    return " ".join(_tokens(text, lang))


def _best(fn, prediction: str, answers: Iterable[str] | str, lang: str) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("at least one gold answer is needed")
    return max(fn(prediction, a, lang) for a in answers)


def _f1(pred: str, gold: str, lang: str) -> float:
    p, g = _tokens(pred, lang), _tokens(gold, lang)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Iterable[str] | str, lang: str = "en") -> float:
    """Token-overlap F1 of the normalised prediction against the best gold answer, in [0, 1]."""
    return _best(_f1, prediction, answers, lang)


def exact_match(prediction: str, answers: Iterable[str] | str, lang: str = "en") -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    return _best(lambda p, a, lg: float(normalize_answer(p, lg) == normalize_answer(a, lg)),
                 prediction, answers, lang)


def substring_match(prediction: str, answers: Iterable[str] | str, lang: str = "en") -> float:
    """1.0 if a normalised gold answer occurs inside the normalised prediction (the reference's
    MLQA criterion), else 0.0. An empty gold answer never matches."""
    def hit(p, a, lg):
        a_n = normalize_answer(a, lg)
        return float(bool(a_n) and f" {a_n} " in f" {normalize_answer(p, lg)} ")
    return _best(hit, prediction, answers, lang)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or k < 1 or n < 1:
        raise ValueError(f"need n >= 1, 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_1(passed: Iterable[bool | int | Iterable[bool]]) -> float:
    """Mean pass@1 over problems; each entry is one result (greedy) or a list of samples."""
    vals = []
    for p in passed:
        if isinstance(p, (bool, int)):
            vals.append(float(bool(p)))
        else:
            p = [bool(x) for x in p]
            vals.append(pass_at_k(len(p), sum(p), 1))
    return sum(vals) / len(vals) if vals else float("nan")
