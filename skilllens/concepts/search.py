"""Automatic, documented search for concept vectors (the reference never released one).

Scorer (all deterministic):

1. *Token keys.* Every vocabulary id gets a key: its decoded text, stripped and lower-cased,
   so that ``" Poland"``, ``"Poland"`` and ``"poland"`` count as one word. Keys shorter than
   ``min_chars`` characters, without a letter, or with a replacement character get weight 0.
2. *Specificity weights* (TF-IDF over articles). The background documents are the other
   concepts' articles plus any ``background`` texts (``B`` documents). For a key ``t`` seen
   ``c(t) >= min_count`` times in the concept's article, with relative frequency ``f(t)`` there
   and ``f_d(t)`` in background document ``d``, a *soft* document frequency (a stray mention
   elsewhere counts little, an equally frequent use counts fully) gives::

       df(t) = sum_d min(1, f_d(t) / f(t))
       w(t)  = (1 + log c(t)) * log((B + 1) / (1 + df(t)))      (kept when > 0)

   so words that occur as often in every article ("the", "his", "was", "new") get ~0 and words that
   only this article uses ("warsaw", "hamlet", "batter") get the most. *Name tokens*: the keys
   of the concept's name (tokenised with and without a leading space) are raised to
   ``name_weight * max_t w(t) * idf(key) / log(B + 1)``, so "poland" or "zealand" count as much as
   the best article word while a name part the other articles use as often stays low. Weights are
   divided by their maximum (range [0, 1]). Name parts whose key is among the ``common_ids``
   (1,000) lowest token ids, i.e. the most frequent BPE tokens ("new", "of", "his"), get no
   bonus. With a single concept and no background texts
   there is no document frequency; a Zipf prior over token ids (BPE ids are ordered roughly
   by frequency) then stands in for it: ``w(t) = max(0, log p_article(t) - log p_zipf(t))``
   (smoothed with ``alpha``).
3. *Vector score.* Project every value vector onto the vocabulary (``W_U v``; with
   ``through_norm=True``, the default, ``W_U (g * v)`` with the final norm's scale ``g``, which is
   what the model's last layer does to anything written into the residual stream) and take the
   rank-discounted mean of the weights of its top-``k`` tokens::

       score = sum_{r<k} w(top_r) / log2(r + 2)  /  sum_{r<k} 1 / log2(r + 2)

   so a vector whose first tokens are the concept's words beats one whose 40th token is.
   ``coverage`` is the share of the top-``k`` tokens with a positive weight. The candidates of a
   concept are its ``n_candidates`` best-scoring vectors over all layers; :mod:`.validate` then
   tests them causally and :func:`skilllens.concepts.experiment.run_concepts` keeps the one
   whose ablation changes the concept's answers most while unrelated answers stay put.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from skilllens.core.artifacts import load_artifact, save_artifact
from skilllens.io import JsonRecord
from skilllens.errors import DataError
from skilllens.concepts.data import Concept
from skilllens.concepts.vocab import VocabProjection, decode_tokens, project_values


@dataclass
class Candidate(JsonRecord):
    """One ranked value vector for a concept."""

    concept: str
    layer: int
    index: int
    score: float
    coverage: float
    top_tokens: list[str]


def vocab_keys(tokenizer, vocab_size: int) -> list[str]:
    """Normalised key (stripped, lower-cased decoded text) of every token id."""
    return [s.strip().lower() for s in tokenizer.batch_decode([[i] for i in range(vocab_size)])]


def _key_counts(tokenizer, text: str, keys: list[str]) -> Counter:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Counter(keys[i] for i in ids if i < len(keys))


def _byte_only(counts: Counter) -> bool:
    total = sum(counts.values())
    short = sum(n for k, n in counts.items() if len(k) <= 1 or "\ufffd" in k)
    return total > 0 and short / total > 0.5


def _usable(k: str, min_chars: int) -> bool:
    return len(k) >= min_chars and "\ufffd" not in k and any(ch.isalpha() for ch in k)


def _first_ids(keys: list[str]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return first


def name_keys(tokenizer, name: str, keys: list[str]) -> set[str]:
    """Keys of the tokens of a concept's name, tokenised with and without a leading space."""
    ids = set(tokenizer(name, add_special_tokens=False)["input_ids"])
    ids |= set(tokenizer(" " + name, add_special_tokens=False)["input_ids"])
    return {keys[i] for i in ids if i < len(keys) and keys[i]}


def token_weights(tokenizer, vocab_size: int, text: str, background: list[str] | None = None,
                  min_count: int = 2, min_chars: int = 3, alpha: float = 0.5,
                  keys: list[str] | None = None, name: str = "concept",
                  name_weight: float = 1.0, _counts: dict | None = None,
                  common_ids: int = 1000) -> torch.Tensor:
    """Specificity weight in [0, 1] of every token id for ``text`` against ``background``
    (TF-IDF over the documents ``[text] + background``; see the module docstring): ``[vocab]``."""
    keys = keys or vocab_keys(tokenizer, vocab_size)
    counts = _counts if _counts is not None else {}

    def count(t):
        if t not in counts:
            counts[t] = _key_counts(tokenizer, t, keys)
        return counts[t]

    fg = count(text)
    if not fg:
        raise DataError(f"{name}: the text has no tokens; give the concept's article as 'text'")
    if _byte_only(fg):
        warnings.warn(f"{name}: the tokenizer splits this text into bytes/single characters "
                      f"only; token weights fall back to single characters (min_chars=1) and the "
                      f"search is much less specific", stacklevel=2)
        min_chars = 1
    key_w = {}
    if background:
        bg_docs = [count(t) for t in background]
        bg_sizes = [max(1, sum(d.values())) for d in bg_docs]
        n_bg = len(bg_docs)
        n_fg = sum(fg.values())
        max_idf = math.log(n_bg + 1)
        idf = {}
        for k, c in fg.items():  # soft document frequency: relative frequency vs the article's
            f = c / n_fg
            soft_df = sum(min(1.0, d.get(k, 0) / size / f) for d, size in zip(bg_docs, bg_sizes))
            idf[k] = math.log((n_bg + 1) / (1 + soft_df))
        for k, c in fg.items():
            if c >= min_count and _usable(k, min_chars) and idf[k] > 0:
                key_w[k] = (1 + math.log(c)) * idf[k]
        if key_w and name_weight > 0 and name != "concept":
            top = max(key_w.values())
            first = _first_ids(keys)
            for k in name_keys(tokenizer, name, keys):
                if _usable(k, min_chars) and first[k] >= common_ids:
                    i = idf.get(k, max_idf)  # a name word the article never uses is specific
                    key_w[k] = max(key_w.get(k, 0.0), name_weight * top * i / max_idf)
    else:  # Zipf prior over ids: id order ~ BPE merge order ~ frequency
        n_keys = len(set(keys))
        n_fg = sum(fg.values())
        first = _first_ids(keys)
        z = sum(1.0 / (r + 10) for r in range(vocab_size))
        for k, c in fg.items():
            if c < min_count or not _usable(k, min_chars):
                continue
            w = math.log((c + alpha) / (n_fg + alpha * n_keys)) - math.log(1.0 / (first[k] + 10) / z)
            if w > 0:
                key_w[k] = w
    top = max(key_w.values(), default=0.0)
    if top > 0:
        key_w = {k: v / top for k, v in key_w.items()}
    return torch.tensor([key_w.get(k, 0.0) for k in keys], dtype=torch.float32)


def rank_discount(k: int) -> torch.Tensor:
    """Weights ``1/log2(r+2)`` of ranks ``r < k``, normalised to sum 1: ``[k]``."""
    d = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2)
    return d / d.sum()


class ConceptSearch:
    """Rank value vectors for concepts by the specificity of their top tokens.

    >>> search = ConceptSearch(k=50, n_candidates=5).fit(lm, concepts)   # doctest: +SKIP
    >>> search.candidates_["Poland"][0].layer                            # doctest: +SKIP
    """

    def __init__(self, k: int = 50, n_candidates: int = 10, layers=None, through_norm: bool = True,
                 min_count: int = 2, min_chars: int = 3, alpha: float = 0.5,
                 name_weight: float = 1.0):
        if k < 1 or n_candidates < 1:
            raise DataError("k and n_candidates must be at least 1")
        self.k, self.n_candidates = k, n_candidates
        self.layers = None if layers is None else [int(l) for l in layers]
        self.through_norm, self.min_count, self.min_chars, self.alpha = \
            through_norm, min_count, min_chars, alpha
        self.name_weight = name_weight
        self.candidates_: dict[str, list[Candidate]] = {}
        self.weights_: dict[str, torch.Tensor] = {}
        self.fingerprint_: dict | None = None

    def __repr__(self) -> str:
        from skilllens.concepts.display import search_display
        return search_display(self).text

    def _repr_html_(self) -> str:
        from skilllens.concepts.display import search_display
        return search_display(self)._repr_html_()

    def fit(self, lm, concepts: list[Concept], background: list[str] | None = None,
            projection: VocabProjection | None = None, progress: bool = True) -> "ConceptSearch":
        """Score every value vector for every concept; fills ``candidates_`` and ``weights_``."""
        if not concepts:
            raise DataError("no concepts to search for; pass at least one Concept")
        ad = lm.adapter
        if projection is None or projection.k < self.k or \
                bool(projection.through_norm) != bool(self.through_norm):
            projection = project_values(lm, self.layers, k=self.k, through_norm=self.through_norm,
                                        progress=progress)
        vocab = ad.unembedding().shape[0]
        keys = vocab_keys(lm.tokenizer, vocab)
        top = projection.top_ids[:, :, : self.k]  # [L, max d_ff, k]
        pad = top[:, :, 0] < 0  # rows past a narrower layer's d_ff (per-layer FFN widths)
        top = top.clamp(min=0)
        n_real = int((~pad).sum())
        disc = rank_discount(top.shape[-1])
        cache: dict = {}
        for c in concepts:
            bg = [o.text for o in concepts if o.name != c.name] + list(background or [])
            w = token_weights(lm.tokenizer, vocab, c.text, bg, self.min_count, self.min_chars,
                              self.alpha, keys, c.name, self.name_weight, cache)
            self.weights_[c.name] = w
            gathered = w[top]  # [L, max d_ff, k]
            scores = (gathered * disc).sum(-1).masked_fill(pad, float("-inf"))
            coverage = (gathered > 0).float().mean(-1)
            best = scores.flatten().topk(min(self.n_candidates, n_real))
            cands = []
            for s, flat in zip(best.values.tolist(), best.indices.tolist()):
                li, idx = divmod(flat, scores.shape[1])
                layer = projection.layers[li]
                cands.append(Candidate(c.name, layer, idx, float(s),
                                       float(coverage[li, idx]),
                                       decode_tokens(lm.tokenizer, top[li, idx, :20].tolist())))
            self.candidates_[c.name] = cands
        self.scores_layers_ = projection.layers
        self.fingerprint_ = lm.fingerprint
        return self

    def best(self, concept: str) -> Candidate:
        if concept not in self.candidates_:
            raise DataError(f"no candidates for {concept!r}; searched: {sorted(self.candidates_)}")
        return self.candidates_[concept][0]

    def get_params(self) -> dict:
        """Constructor arguments (saved with the artifact and passed back by :meth:`load`)."""
        return {"k": self.k, "n_candidates": self.n_candidates, "layers": self.layers,
                "through_norm": self.through_norm, "min_count": self.min_count,
                "min_chars": self.min_chars, "alpha": self.alpha,
                "name_weight": self.name_weight}

    def save(self, path: str | os.PathLike) -> Path:
        names = sorted(self.candidates_)
        tensors = {f"weights.{i}": self.weights_[n] for i, n in enumerate(names)}
        layers = getattr(self, "scores_layers_", None)
        meta = {"params": self.get_params(), "concepts": names,
                "scores_layers": None if layers is None else [int(l) for l in layers],
                "candidates": {n: [c.to_dict() for c in self.candidates_[n]] for n in names}}
        return save_artifact(path, tensors, meta, kind="concept_search",
                             fingerprint=self.fingerprint_)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "ConceptSearch":
        t, meta = load_artifact(path, kind="concept_search", model=model)
        obj = cls(**meta["params"])
        for i, n in enumerate(meta["concepts"]):
            obj.weights_[n] = t[f"weights.{i}"]
            obj.candidates_[n] = [Candidate(**c) for c in meta["candidates"][n]]
        obj.fingerprint_ = meta.get("fingerprint")
        if meta.get("scores_layers") is not None:
            obj.scores_layers_ = list(meta["scores_layers"])
        return obj
