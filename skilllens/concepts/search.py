"""Automatic, documented search for concept vectors (the reference never released one).

Scorer (all deterministic):

1. *Token keys.* Every vocabulary id gets a key: its decoded text, stripped and lower-cased,
   so that ``" Poland"``, ``"Poland"`` and ``"poland"`` count as one word.
2. *Specificity weights.* For each concept, count keys in its article (foreground) and in a
   background corpus (the other concepts' articles plus any ``background`` texts). The weight
   of a key is its smoothed log-odds ratio, clipped at 0::

       w(t) = max(0, log((c_fg(t) + a) / (N_fg + a·K)) - log((c_bg(t) + a) / (N_bg + a·K)))

   for keys seen at least ``min_count`` times in the article and at least ``min_chars``
   characters long (else 0). Without any background text, a Zipf prior over token ids (BPE ids
   are ordered roughly by frequency) stands in for the background.
3. *Vector score.* Project every value vector onto the vocabulary (``W_U v``) and average the
   weights of its top-``k`` tokens: ``score = mean_{r<k} w(top_r)``. ``coverage`` is the share
   of those tokens with a positive weight. The candidates of a concept are its
   ``n_candidates`` best-scoring vectors over all layers; :mod:`.validate` then tests them
   causally.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts import load_artifact, save_artifact
from ..errors import DataError
from .data import Concept
from .vocab import VocabProjection, decode_tokens, project_values


@dataclass
class Candidate:
    """One ranked value vector for a concept."""

    concept: str
    layer: int
    index: int
    score: float
    coverage: float
    top_tokens: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


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


def token_weights(tokenizer, vocab_size: int, text: str, background: list[str] | None = None,
                  min_count: int = 2, min_chars: int = 3, alpha: float = 0.5,
                  keys: list[str] | None = None, name: str = "concept") -> torch.Tensor:
    """Specificity weight of every token id for ``text`` against ``background``: ``[vocab]``."""
    keys = keys or vocab_keys(tokenizer, vocab_size)
    fg = _key_counts(tokenizer, text, keys)
    if not fg:
        raise DataError(f"{name}: the text has no tokens; give the concept's article as 'text'")
    if _byte_only(fg):
        warnings.warn(f"{name}: the tokenizer splits this text into bytes/single characters "
                      f"only; token weights fall back to single characters (min_chars=1) and the "
                      f"search is much less specific", stacklevel=2)
        min_chars = 1
    n_keys = len(set(keys))
    n_fg = sum(fg.values())
    if background:
        bg = Counter()
        for t in background:
            bg.update(_key_counts(tokenizer, t, keys))
        n_bg = sum(bg.values())
        log_bg = {k: math.log((bg.get(k, 0) + alpha) / (n_bg + alpha * n_keys)) for k in fg}
    else:  # Zipf prior over ids: id order ~ BPE merge order ~ frequency
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        z = sum(1.0 / (r + 10) for r in range(vocab_size))
        log_bg = {k: math.log(1.0 / (first[k] + 10) / z) for k in fg}
    key_w = {}
    for k, c in fg.items():
        if c < min_count or len(k) < min_chars or "\ufffd" in k:
            continue
        w = math.log((c + alpha) / (n_fg + alpha * n_keys)) - log_bg[k]
        if w > 0:
            key_w[k] = w
    return torch.tensor([key_w.get(k, 0.0) for k in keys], dtype=torch.float32)


class ConceptSearch:
    """Rank value vectors for concepts by the specificity of their top tokens.

    >>> search = ConceptSearch(k=50, n_candidates=5).fit(lm, concepts)   # doctest: +SKIP
    >>> search.candidates_["Poland"][0].layer                            # doctest: +SKIP
    """

    def __init__(self, k: int = 50, n_candidates: int = 10, layers=None, through_norm: bool = False,
                 min_count: int = 2, min_chars: int = 3, alpha: float = 0.5):
        if k < 1 or n_candidates < 1:
            raise DataError("k and n_candidates must be at least 1")
        self.k, self.n_candidates, self.layers = k, n_candidates, layers
        self.through_norm, self.min_count, self.min_chars, self.alpha = \
            through_norm, min_count, min_chars, alpha
        self.candidates_: dict[str, list[Candidate]] = {}
        self.weights_: dict[str, torch.Tensor] = {}
        self.fingerprint_: dict | None = None

    def fit(self, lm, concepts: list[Concept], background: list[str] | None = None,
            projection: VocabProjection | None = None, progress: bool = True) -> "ConceptSearch":
        """Score every value vector for every concept; fills ``candidates_`` and ``weights_``."""
        if not concepts:
            raise DataError("no concepts to search for; pass at least one Concept")
        ad = lm.adapter
        if projection is None or projection.k < self.k:
            projection = project_values(lm, self.layers, k=self.k, through_norm=self.through_norm,
                                        progress=progress)
        vocab = ad.unembedding().shape[0]
        keys = vocab_keys(lm.tokenizer, vocab)
        top = projection.top_ids[:, :, : self.k]  # [L, d_ff, k]
        for c in concepts:
            bg = [o.text for o in concepts if o.name != c.name] + list(background or [])
            w = token_weights(lm.tokenizer, vocab, c.text, bg, self.min_count, self.min_chars,
                              self.alpha, keys, c.name)
            self.weights_[c.name] = w
            gathered = w[top]  # [L, d_ff, k]
            scores = gathered.mean(-1)
            coverage = (gathered > 0).float().mean(-1)
            best = scores.flatten().topk(min(self.n_candidates, scores.numel()))
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

    def save(self, path: str | os.PathLike) -> Path:
        names = sorted(self.candidates_)
        tensors = {f"weights.{i}": self.weights_[n] for i, n in enumerate(names)}
        meta = {"params": {"k": self.k, "n_candidates": self.n_candidates,
                           "through_norm": self.through_norm, "min_count": self.min_count,
                           "min_chars": self.min_chars, "alpha": self.alpha},
                "concepts": names,
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
        return obj
