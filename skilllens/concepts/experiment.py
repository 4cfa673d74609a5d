"""The whole concept-vector pipeline for a list of concepts: search -> screen -> edit -> score.

:func:`run_concepts` returns a plain dict (``{"concepts": [...], "settings": {...}}``) that
:func:`skilllens.concepts.report.write_report` turns into ``results.json``, figures and
``report.md``. Each concept entry holds the best vector (layer, index, top tokens), the
screening numbers, BLEU / ROUGE-L of concept and unrelated QA (and completions / probes when
asked), intrinsic metrics, and optionally a ``comparison`` of other methods on the same vector.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..errors import DataError
from .ablation import METHODS as ABLATIONS, ConceptAblation
from .data import Concept
from .metrics import intrinsic_scores
from .needle import Needle
from .search import ConceptSearch
from .unlearn import FineTuneUnlearner
from .validate import AnswerCache, BehaviourSuite, screen_candidates
from .vocab import top_tokens

ALL_METHODS = ABLATIONS + ("needle", "ga", "npo")


@dataclass
class ExperimentSettings:
    """Knobs of :func:`run_concepts` (defaults follow the paper where CPU allows)."""

    method: str = "noise"
    sigma: float = 0.1
    seed: int = 0
    k_search: int = 50
    n_candidates: int = 5
    screen_method: str = "zero"
    max_new_tokens: int = 100
    n_questions: int | None = None
    n_unrelated: int | None = None
    n_completions: int = 0
    probes: tuple = ()
    batch_size: int = 16
    compare: tuple = ()
    unlearn_steps: int = 5
    unlearn_lr: float = 1e-5
    needle_lr: float = 1e-2
    seq_len: int = 128
    max_chunks: int = 8
    scope: str = "ffn_out"

    def check(self) -> "ExperimentSettings":
        for m in (self.method,) + tuple(self.compare):
            if m not in ALL_METHODS:
                raise DataError(f"unknown method {m!r}; choose one of {', '.join(ALL_METHODS)}")
        if self.screen_method not in ABLATIONS:
            raise DataError(f"screen_method must be one of {', '.join(ABLATIONS)}")
        if not self.sigma > 0:
            raise DataError(f"sigma must be > 0 (got {self.sigma}); e.g. --sigma 0.1")
        if self.max_new_tokens < 1 or self.n_candidates < 1:
            raise DataError("max_new_tokens and n_candidates must be at least 1")
        return self


def make_edit(method: str, layer: int, index: int, s: ExperimentSettings):
    """An unfitted editor object for ``method`` on vector ``(layer, index)``."""
    if method in ABLATIONS:
        return ConceptAblation(layer, index, method, s.sigma, s.seed)
    if method == "needle":
        return Needle(layer, index, s.sigma, s.unlearn_steps, s.needle_lr, 0.01, s.seq_len,
                      s.max_chunks, seed=s.seed)
    return FineTuneUnlearner(method, s.scope, s.unlearn_steps, s.unlearn_lr, seq_len=s.seq_len,
                             max_chunks=s.max_chunks, seed=s.seed)


def evaluate_edit(lm, concept: Concept, suite: BehaviourSuite, method: str, layer: int,
                  index: int, s: ExperimentSettings, progress: bool = False) -> dict:
    """Fit ``method``, apply it, score behaviour and the intrinsic change of the vector."""
    t0 = time.perf_counter()
    edit = make_edit(method, layer, index, s)
    edit = edit.fit(lm) if method in ABLATIONS else edit.fit(lm, concept, progress=progress)
    with edit.applied(lm):
        beh = suite.score(lm)
        edited = lm.adapter.value_vectors(layer)[index].detach().clone()
    original = lm.adapter.value_vectors(layer)[index].detach().clone()
    intr = intrinsic_scores(lm, original, edited, concept.text).to_dict()
    out = {"method": method, **{k: v.to_dict() for k, v in beh.text.items()},
           "logprob_drop": beh.logprob_drop, "intrinsic": intr,
           "seconds": round(time.perf_counter() - t0, 2)}
    for name in ("concept_qa", "unrelated_qa"):
        if name in out:
            out[name]["logprob_before"] = float(suite.original_logprob_[name].nanmean())
            out[name]["logprob_after"] = out[name]["logprob_before"] - beh.logprob_drop.get(name, 0.0)
    if getattr(edit, "losses_", None):
        out["losses"] = [round(x, 4) for x in edit.losses_]
    out["sample_answers"] = {k: list(zip(suite.original_[k][:3], v[:3]))
                             for k, v in beh.answers.items()}
    return out


def run_concepts(lm, concepts: list[Concept], settings: ExperimentSettings | None = None,
                 search: ConceptSearch | None = None, progress: bool = True) -> dict:
    """Search, screen, edit and score every concept; returns the ``results.json`` dict."""
    s = (settings or ExperimentSettings()).check()
    if not concepts:
        raise DataError("no concepts given")
    t0 = time.perf_counter()
    if search is None:
        search = ConceptSearch(k=s.k_search, n_candidates=s.n_candidates).fit(lm, concepts,
                                                                               progress=progress)
    cache = AnswerCache()
    rows = []
    for c in tqdm(concepts, desc="concepts", disable=not progress):
        tc = time.perf_counter()
        suite = BehaviourSuite(c, s.max_new_tokens, s.n_unrelated, s.n_questions, s.n_completions,
                               s.probes, s.batch_size, s.seed).fit(lm, cache)
        cands = search.candidates_[c.name][: s.n_candidates]
        screened = screen_candidates(lm, suite, cands, s.screen_method, s.sigma, s.seed)
        best = screened[0]
        cand = next(x for x in cands if (x.layer, x.index) == (best.layer, best.index))
        main = evaluate_edit(lm, c, suite, s.method, best.layer, best.index, s)
        row = {"concept": c.name, "layer": best.layer, "index": best.index,
               "top_tokens": top_tokens(lm, best.layer, best.index, 20),
               "search_score": cand.score, "search_coverage": cand.coverage,
               "search_rank": cands.index(cand),
               "screening": [r.to_dict() for r in screened],
               "candidates": [{"layer": x.layer, "index": x.index, "score": x.score}
                              for x in search.candidates_[c.name]],
               "reference": c.reference, **{k: v for k, v in main.items() if k != "method"},
               "method": s.method, "sigma": s.sigma,
               "original_answers": {k: v[:3] for k, v in suite.original_.items()}}
        if s.compare:
            row["comparison"] = {m: evaluate_edit(lm, c, suite, m, best.layer, best.index, s)
                                 for m in s.compare}
        row["seconds"] = round(time.perf_counter() - tc, 1)
        rows.append(row)
    meta = {"model": getattr(lm, "name", "model"), "fingerprint": lm.fingerprint.get("id"),
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "seconds": round(time.perf_counter() - t0, 1)}
    return {"concepts": rows, "settings": {**asdict(s), "probes": list(s.probes),
                                           "compare": list(s.compare)}, "meta": meta}


def target_reached(row: dict, max_concept_bleu: float = 0.6, min_unrelated_bleu: float = 0.9) -> bool:
    """The issue's target for one concept: concept-QA BLEU <= 0.6 and unrelated >= 0.9."""
    return row["concept_qa"]["bleu"] <= max_concept_bleu and \
        row["unrelated_qa"]["bleu"] >= min_unrelated_bleu
