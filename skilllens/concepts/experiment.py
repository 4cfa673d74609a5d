"""The whole concept-vector pipeline for a list of concepts: search -> screen -> validate ->
edit -> score.

Selection protocol (per concept): the search's ``n_candidates`` vectors are screened by the
teacher-forced log-prob drop of the original model's greedy concept answers under a
``screen_method`` ablation (cheap: one forward pass); the ``n_validate`` best are validated by
regenerating the answers (greedy, prompt ``"Question: {q}\n Answer:"``, ``max_new_tokens``):
the chosen vector is the one with the lowest concept-QA BLEU among those whose unrelated-QA
BLEU (all unrelated questions unless ``n_unrelated``) stays >= ``min_unrelated_bleu`` (0.9).
Every validated candidate's numbers are kept in ``row["validation"]``.

:func:`run_concepts` returns a plain dict (``{"concepts": [...], "settings": {...}}``) that
:func:`skilllens.concepts.report.write_report` turns into ``results.json``, figures and
``report.md``. Each concept entry holds the best vector (layer, index, top tokens), the
screening numbers, BLEU / ROUGE-L of concept and unrelated QA (and completions / probes when
asked), intrinsic metrics, and optionally a ``comparison`` of other methods on the same vector.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from ..errors import DataError
from .ablation import METHODS as ABLATIONS, ConceptAblation
from .data import Concept
from .metrics import intrinsic_scores
from .needle import Needle
from .search import ConceptSearch
from .unlearn import FineTuneUnlearner
from .validate import AnswerCache, BehaviourScores, BehaviourSuite, screen_candidates
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
    screen_unrelated: bool = False
    n_validate: int = 3
    min_unrelated_bleu: float = 0.9
    multi: int = 0
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
        if self.max_new_tokens < 1 or self.n_candidates < 1 or self.n_validate < 1:
            raise DataError("max_new_tokens, n_candidates and n_validate must be at least 1")
        if self.multi < 0 or self.multi == 1:
            raise DataError("multi must be 0 (off) or at least 2 vectors")
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
                  index: int, s: ExperimentSettings, progress: bool = False,
                  known: dict | None = None) -> dict:
    """Fit ``method``, apply it, score behaviour and the intrinsic change of the vector.

    ``known`` maps prompt-set names to ``(TextScores, answers)`` already measured for this very
    edit (greedy decoding is deterministic), so those sets are not generated again."""
    t0 = time.perf_counter()
    known = known or {}
    edit = make_edit(method, layer, index, s)
    edit = edit.fit(lm) if method in ABLATIONS else edit.fit(lm, concept, progress=progress)
    with edit.applied(lm):
        todo = [k for k in suite.prompts if k not in known]
        beh = suite.score(lm, todo) if todo else BehaviourScores({}, suite.logprob_drop(lm), {})
        for k, (sc, ans) in known.items():
            beh.text[k], beh.answers[k] = sc, ans
        beh.text = {k: beh.text[k] for k in suite.prompts}
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


def validate_candidates(lm, suite: BehaviourSuite, screened, cands, method: str,
                        s: ExperimentSettings) -> list[dict]:
    """Causal validation by generation of the screened candidates; marks the chosen one.

    Each candidate is ablated with ``method`` and the concept's answers are regenerated
    (BLEU / ROUGE-L against the original answers). Candidates are then checked in order of
    increasing concept BLEU: the unrelated answers are regenerated, and the first candidate
    whose unrelated BLEU is ``>= s.min_unrelated_bleu`` is chosen, i.e. the largest concept
    change among those that leave unrelated answers alone (later ones are not generated:
    ``unrelated_qa`` is None). When none passes, the one with the best unrelated BLEU is chosen.
    """
    by_id = {(x.layer, x.index): (r, x) for r, x in enumerate(cands)}
    out = []
    for sc in screened:
        rank, cand = by_id[(sc.layer, sc.index)]
        abl = ConceptAblation(sc.layer, sc.index, method, s.sigma, s.seed).fit(lm)
        with abl.applied(lm):
            beh = suite.score(lm, ["concept_qa"], with_logprob=False)
        out.append({"layer": sc.layer, "index": sc.index, "search_rank": rank,
                    "top_tokens": cand.top_tokens[:8], "concept_drop": sc.concept_drop,
                    "unrelated_drop": sc.unrelated_drop,
                    "concept_qa": beh.text["concept_qa"].to_dict(), "unrelated_qa": None,
                    "chosen": False,
                    "_known": {"concept_qa": (beh.text["concept_qa"], beh.answers["concept_qa"])}})
    checked = []
    for v in sorted(out, key=lambda v: (v["concept_qa"]["bleu"], -v["concept_drop"])):
        abl = ConceptAblation(v["layer"], v["index"], method, s.sigma, s.seed).fit(lm)
        with abl.applied(lm):
            beh = suite.score(lm, ["unrelated_qa"], with_logprob=False)
        v["unrelated_qa"] = beh.text["unrelated_qa"].to_dict()
        v["_known"]["unrelated_qa"] = (beh.text["unrelated_qa"], beh.answers["unrelated_qa"])
        checked.append(v)
        if v["unrelated_qa"]["bleu"] >= s.min_unrelated_bleu:
            v["chosen"] = True
            break
    else:
        max(checked, key=lambda v: v["unrelated_qa"]["bleu"])["chosen"] = True
    return out


def evaluate_multi(lm, suite: BehaviourSuite, vectors: list[tuple[int, int]], method: str,
                   s: ExperimentSettings) -> dict:
    """Ablate several vectors at once (a small model may spread a concept over a few)."""
    import contextlib

    with contextlib.ExitStack() as stack:
        for layer, index in vectors:
            stack.enter_context(ConceptAblation(layer, index, method, s.sigma, s.seed)
                                .fit(lm).applied(lm))
        beh = suite.score(lm, ["concept_qa", "unrelated_qa"], with_logprob=False)
    return {"vectors": [list(v) for v in vectors], "method": method,
            **{k: v.to_dict() for k, v in beh.text.items()}}


def run_concepts(lm, concepts: list[Concept], settings: ExperimentSettings | None = None,
                 search: ConceptSearch | None = None, progress: bool = True,
                 vectors: dict | None = None) -> dict:
    """Search, screen, validate, edit and score every concept; returns the ``results.json`` dict.

    Per concept: the search's ``n_candidates`` are screened by the teacher-forced log-prob drop
    of the concept's original answers under ``screen_method`` ablation (plus the unrelated drop
    when ``screen_unrelated``); the ``n_validate`` best are validated by generation
    (:func:`validate_candidates`), which picks the vector; ``method`` is then scored on it.
    ``vectors`` ({concept: (layer, index)}) skips screening and validation for those concepts."""
    s = (settings or ExperimentSettings()).check()
    if not concepts:
        raise DataError("no concepts given")
    t0 = time.perf_counter()
    if search is None:
        search = ConceptSearch(k=s.k_search, n_candidates=s.n_candidates).fit(lm, concepts,
                                                                               progress=progress)
    cache = AnswerCache()
    rows = []
    vmethod = s.method if s.method in ABLATIONS else s.screen_method
    for c in tqdm(concepts, desc="concepts", disable=not progress):
        tc = time.perf_counter()
        suite = BehaviourSuite(c, s.max_new_tokens, s.n_unrelated, s.n_questions, s.n_completions,
                               s.probes, s.batch_size, s.seed).fit(lm, cache)
        cands = search.candidates_[c.name][: s.n_candidates]
        if vectors and c.name in vectors:  # a vector chosen before (e.g. by a validation run)
            layer, index = vectors[c.name]
            screened, validation, known = [], [], {}
        else:
            sets = ("concept_qa", "unrelated_qa") if s.screen_unrelated else ("concept_qa",)
            screened = screen_candidates(lm, suite, cands, s.screen_method, s.sigma, s.seed,
                                         sets=sets)
            validation = validate_candidates(lm, suite, screened[: s.n_validate], cands, vmethod, s)
            chosen = next(v for v in validation if v["chosen"])
            layer, index = chosen["layer"], chosen["index"]
            known = chosen.pop("_known") if vmethod == s.method else {}
            for v in validation:
                v.pop("_known", None)
        cand = next((x for x in cands if (x.layer, x.index) == (layer, index)), None)
        main = evaluate_edit(lm, c, suite, s.method, layer, index, s, known=known)
        row = {"concept": c.name, "layer": layer, "index": index,
               "top_tokens": top_tokens(lm, layer, index, 20, through_norm=search.through_norm),
               "search_score": cand.score if cand else None,
               "search_coverage": cand.coverage if cand else None,
               "search_rank": cands.index(cand) if cand else None,
               "screening": [r.to_dict() for r in screened],
               "validation": validation,
               "candidates": [{"layer": x.layer, "index": x.index, "score": x.score,
                               "top_tokens": x.top_tokens[:10]}
                              for x in search.candidates_[c.name]],
               "reference": c.reference, **{k: v for k, v in main.items() if k != "method"},
               "method": s.method, "sigma": s.sigma,
               "original_answers": {k: v[:3] for k, v in suite.original_.items()}}
        if s.multi and validation:
            vecs = [(v["layer"], v["index"]) for v in validation][: s.multi]
            row["multi"] = evaluate_multi(lm, suite, vecs, vmethod, s)
        if s.compare:
            row["comparison"] = {m: evaluate_edit(lm, c, suite, m, layer, index, s)
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
