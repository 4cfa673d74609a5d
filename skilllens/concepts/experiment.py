"""The whole concept-vector pipeline for a list of concepts, with an honest split:
search -> choose a vector set on the *selection* questions -> score on the *held-out* ones.

Per concept (``held_out`` = 0.5 by default; the split is seeded and recorded in ``results.json``):

1. The unedited model's greedy answers to every question of every concept are generated once,
   all prompts together (greedy, prompt ``"Question: {q}\\n Answer:"``, stop at the answer's
   end); each prompt set gets a teacher-forced verifier (:mod:`.fastscore`).
2. :class:`.select.SetSelector` builds a pool (vocabulary-projection candidates + attribution
   candidates, layers >= ``min_layer``), screens it by teacher-forced greedy agreement and log-prob
   drops and greedily builds a set of at most ``max_vectors`` vectors, all on the selection
   questions; if no candidate passes, the concept gets "no vector found".
3. Size check by generation, also on the selection questions: the selection answers are
   regenerated with the greedy set and with its last ``1..max_backtrack`` vectors dropped (one
   batch); the largest size whose unrelated BLEU is >= ``min_unrelated_bleu`` is kept. If none is,
   the concept gets "no vector found" (``found: false``, ``reason``, the unedited model's
   scores). These are the ``selection`` numbers.
4. Headline: ``method`` on the chosen set, BLEU / ROUGE-L of the *held-out* concept and unrelated
   answers (``concept_qa``, ``unrelated_qa``); the selection numbers sit beside them
   (``selection``). Control: a layer-matched random set of the same size, same method, held-out
   answers (``control``), scored in the same batch. ``compare`` methods (Needle, GA, NPO) are
   scored on the same set.

Every edited answer equals regenerating the prompt under the edit: :func:`.fastscore.score_edits`
regenerates only answers whose original tokens the edited model no longer reproduces.

:func:`run_concepts` returns a plain dict (``{"concepts": [...], "settings": {...}, "meta": ...}``)
that :func:`skilllens.concepts.report.write_report` writes as ``results.json``, figures, report.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from skilllens.errors import DataError, SiteError
from skilllens.concepts.ablation import METHODS as ABLATIONS
from skilllens.concepts.data import Concept
from skilllens.concepts.fastscore import EditJob
from skilllens.concepts.metrics import intrinsic_scores, text_scores
from skilllens.concepts.needle import Needle
from skilllens.concepts.search import ConceptSearch
from skilllens.concepts.select import SetSelector, ablated, random_control, selection_model
from skilllens.concepts.unlearn import FineTuneUnlearner
from skilllens.concepts.validate import AnswerCache, BehaviourScores, BehaviourSuite
from skilllens.concepts.vocab import top_tokens

ALL_METHODS = ABLATIONS + ("needle", "ga", "npo")


@dataclass
class ExperimentSettings:
    """Knobs of :func:`run_concepts` (defaults: the CLI's default run)."""

    # the edit that is scored, and the split
    method: str = "zero"
    sigma: float = 0.1
    seed: int = 0
    held_out: float = 0.5
    # candidate pool (vocabulary projection + attribution), layers >= min_layer
    k_search: int = 50
    n_candidates: int = 5
    n_attr: int = 12
    min_layer: int = 1

    # greedy set on the selection half
    max_vectors: int = 8
    lam: float = 1.0
    min_gain: float = 0.005
    min_unrelated_agreement: float = 0.9
    select_dtype: str = "float32"

    # size check by regeneration; random control
    max_backtrack: int = 2
    min_unrelated_bleu: float = 0.9
    control: bool = True
    # prompts and generation
    max_new_tokens: int = 100
    n_questions: int | None = None
    n_unrelated: int | None = None
    n_completions: int = 0
    probes: tuple = ()
    batch_size: int = 64

    # behavioural comparison (Needle, GA, NPO)
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
        if not self.sigma > 0:
            raise DataError(f"sigma must be > 0 (got {self.sigma}); e.g. --sigma 0.1")
        if not 0 < self.held_out < 1:
            raise DataError(f"held_out must be in (0, 1) (got {self.held_out}); e.g. --held-out 0.5")
        if self.max_new_tokens < 1 or self.n_candidates < 0 or self.max_vectors < 1:
            raise DataError("max_new_tokens and max_vectors must be at least 1, candidates >= 0")
        if self.min_layer < 0:
            raise DataError(f"min_layer must be >= 0 (got {self.min_layer})")
        if self.n_candidates == 0 and self.n_attr == 0:
            raise DataError("no candidate source: set --candidates or --attr-candidates above 0")
        return self

    @property
    def ablation(self) -> str:
        """The ablation used to choose vectors (``method`` itself, or zero for Needle/GA/NPO)."""
        return self.method if self.method in ABLATIONS else "zero"


def _edit(lm, concept: Concept, method: str, vectors, s: ExperimentSettings, progress: bool):
    """Fit ``method`` on ``vectors`` where needed; returns an :class:`.fastscore.EditJob`
    (no sets yet) whose ``apply()`` writes the edit, and the fitting losses."""
    if method in ABLATIONS:
        job = EditJob(lambda: ablated(lm, vectors, method, s.sigma, s.seed),
                      min(a for a, _ in vectors), [],
                      list(vectors) if method == "zero" else None)
        return job, []
    if method == "needle":  # one Needle per vector, each fitted on the clean model
        edits = [Needle(layer, index, s.sigma, s.unlearn_steps, s.needle_lr, 0.01, s.seq_len,
                        s.max_chunks, seed=s.seed + k).fit(lm, concept, progress=progress)
                 for k, (layer, index) in enumerate(vectors)]
        low = min(a for a, _ in vectors)
    else:
        edits = [FineTuneUnlearner(method, s.scope, s.unlearn_steps, s.unlearn_lr,
                                   seq_len=s.seq_len, max_chunks=s.max_chunks,
                                   seed=s.seed).fit(lm, concept, progress=progress)]
        low = 0  # fine-tuning may change every layer

    @contextlib.contextmanager
    def apply():
        with contextlib.ExitStack() as stack:
            for e in edits:
                stack.enter_context(e.applied(lm))
            yield lm

    return EditJob(apply, low, []), [x for e in edits for x in getattr(e, "losses_", [])]


def _mean_intrinsic(items: list[dict]) -> dict:
    return {k: (items[0][k] if k == "k" else sum(d[k] for d in items) / len(items))
            for k in items[0]}


def evaluate_edit(lm, concept: Concept, suite: BehaviourSuite, method: str, vectors,
                  s: ExperimentSettings, progress: bool = False, extra: list | None = None) -> dict:
    """Fit ``method`` on ``vectors``, apply it, score the held-out sets and the intrinsic change
    of every vector (``intrinsic`` = the mean over vectors, ``intrinsic_per_vector``).
    ``extra``: more :class:`.fastscore.EditJob` scored in the same batch (their
    :class:`.validate.BehaviourScores` are appended to the list)."""
    t0 = time.perf_counter()
    vectors = [tuple(v) for v in vectors]
    job, losses = _edit(lm, concept, method, vectors, s, progress)
    job.sets = list(suite.held_out_sets)
    with job.apply():
        edited = [lm.adapter.value_vectors(a)[b].detach().clone() for a, b in vectors]
    scored = suite.score_edits(lm, [job] + list(extra or []))
    beh: BehaviourScores = scored[0]
    if extra is not None:
        extra[:] = scored[1:]
    per = [intrinsic_scores(lm, lm.adapter.value_vectors(a)[b].detach().clone(), e,
                            concept.text).to_dict() for (a, b), e in zip(vectors, edited)]
    out = {"method": method, **{k: v.to_dict() for k, v in beh.text.items()},
           "logprob_drop": beh.logprob_drop, "intrinsic": _mean_intrinsic(per),
           "intrinsic_per_vector": per, "seconds": round(time.perf_counter() - t0, 2)}
    for name in ("concept_qa", "unrelated_qa"):
        if name in out:
            out[name]["logprob_before"] = float(suite.original_logprob_[name].nanmean())
            out[name]["logprob_after"] = out[name]["logprob_before"] - beh.logprob_drop.get(name, 0.0)
    if losses:
        out["losses"] = [round(x, 4) for x in losses]
    out["sample_answers"] = {k: list(zip(suite.original_[k][:3], v[:3]))
                             for k, v in beh.answers.items()}
    return out


def choose_size(lm, suite: BehaviourSuite, vectors, s: ExperimentSettings) -> tuple[list, list]:
    """Regenerate the *selection* answers with the greedy set ablated and with its last-added
    ``1..max_backtrack`` vectors dropped (all sizes in one batch); the largest size whose
    selection unrelated BLEU is >= ``min_unrelated_bleu`` is chosen. If none is, nothing is
    chosen (an empty list: "no vector found"; keeping a set that breaks unrelated answers would
    report damage as removal). Returns the chosen vectors and one trace entry per tried size."""
    sets = [suite.sel("concept_qa"), suite.sel("unrelated_qa")]
    sizes = list(range(len(vectors), max(0, len(vectors) - s.max_backtrack - 1), -1))
    jobs = []
    for k in sizes:
        job, _ = _edit(lm, suite.concept, s.ablation, list(vectors[:k]), s, False)
        job.sets = sets
        jobs.append(job)
    trace = [{"size": k, "concept_qa": b.text[sets[0]].to_dict(),
              "unrelated_qa": b.text[sets[1]].to_dict(), "chosen": False}
             for k, b in zip(sizes, suite.score_edits(lm, jobs))]
    ok = [t for t in trace if t["unrelated_qa"]["bleu"] >= s.min_unrelated_bleu]
    if not ok:
        return [], trace
    ok[0]["chosen"] = True
    return list(vectors[:ok[0]["size"]]), trace


def _not_found(suite: BehaviourSuite, trace: list, s: ExperimentSettings) -> dict:
    """Row fields when no set passes the size check: the unedited model's held-out scores
    (BLEU 1: nothing removed), ``found: false`` and the reason."""
    same = {k: text_scores(suite.original_[k], suite.original_[k]).to_dict()
            for k in suite.held_out_sets}
    if not trace:
        why = (f"no candidate passes the greedy rule on the selection questions (gain >= "
               f"min_gain {s.min_gain} with unrelated greedy agreement >= "
               f"{s.min_unrelated_agreement})")
    else:
        best = max(t["unrelated_qa"]["bleu"] for t in trace)
        why = (f"no vector set keeps the selection unrelated answers (best selection unrelated "
               f"BLEU {best:.3f} over sizes {[t['size'] for t in trace]} < min_unrelated_bleu "
               f"{s.min_unrelated_bleu})")
    return {"found": False, "reason": why + "; held-out scores are those of the unedited model",
            **same}


def _concept_row(lm, c: Concept, suite, search, s: ExperimentSettings, fixed, progress,
                 sel_lm=None) -> dict:
    cands = search.candidates_[c.name][: s.n_candidates] if search is not None else []
    cands = [x for x in cands if x.layer >= s.min_layer]
    selection, trace, clock = None, [], {}
    t = time.perf_counter()
    if fixed is not None:  # vectors chosen before (e.g. by a validation run)
        vectors = [tuple(v) for v in fixed]
    else:
        sel = SetSelector(s.ablation, s.sigma, s.seed, s.n_attr, s.max_vectors, s.lam, s.min_gain,
                          s.min_unrelated_agreement, min(s.batch_size, 32), min_layer=s.min_layer)
        c_sel, u_sel = suite.sel("concept_qa"), suite.sel("unrelated_qa")
        selection = sel.select(sel_lm or lm, (suite.prompts[c_sel], suite.original_[c_sel]),
                               (suite.prompts[u_sel], suite.original_[u_sel]), cands)
        clock["select"] = time.perf_counter() - t
        vectors, trace = choose_size(lm, suite, selection.vectors, s) if selection.vectors \
            else ([], [])
        clock["size_check"] = time.perf_counter() - t - clock["select"]
    through = search.through_norm if search is not None else True
    row = {"concept": c.name, "found": bool(vectors), "vectors": [list(v) for v in vectors],
           "layer": vectors[0][0] if vectors else None, "index": vectors[0][1] if vectors else None,
           "top_tokens": top_tokens(lm, vectors[0][0], vectors[0][1], 20, through_norm=through)
           if vectors else [],
           "vector_tokens": [top_tokens(lm, a, b, 8, through_norm=through) for a, b in vectors],
           "split": suite.split_record(s.seed, s.held_out)}
    t = time.perf_counter()
    ctrl_job, ctrl_vecs = [], []
    if vectors and s.control:
        ctrl_vecs = random_control(lm, vectors, s.seed)
        job, _ = _edit(lm, c, s.method if s.method in ABLATIONS else s.ablation, ctrl_vecs, s, False)
        job.sets = ["concept_qa", "unrelated_qa"]
        ctrl_job = [job]
    if vectors:
        main = evaluate_edit(lm, c, suite, s.method, vectors, s, progress, extra=ctrl_job)
        row.update({k: v for k, v in main.items() if k != "method"})
    else:
        row.update(_not_found(suite, trace, s))
    clock["held_out"] = time.perf_counter() - t
    row.update({"method": s.method, "sigma": s.sigma, "reference": c.reference,
                "candidates": [{"layer": x.layer, "index": x.index, "score": x.score,
                                "top_tokens": x.top_tokens[:10]} for x in cands],
                "original_answers": {k: v[:3] for k, v in suite.original_.items()}})
    chosen = next((t for t in trace if t["chosen"]), None)
    if chosen is not None:
        row["selection"] = {"concept_qa": chosen["concept_qa"], "unrelated_qa": chosen["unrelated_qa"]}
    if trace:
        row["size_choice"] = trace
    if selection is not None:
        row["screening"] = [x.to_dict() for x in selection.screened]
        row["greedy"] = selection.steps
        row["greedy_vectors"] = [list(v) for v in selection.vectors]
    if ctrl_job:
        beh = ctrl_job[0]
        row["control"] = {"vectors": [list(v) for v in ctrl_vecs],
                          **{k: v.to_dict() for k, v in beh.text.items()}}
        row["control_margin"] = row["control"]["concept_qa"]["bleu"] - row["concept_qa"]["bleu"]
    if s.compare and vectors:
        t = time.perf_counter()
        row["comparison"] = {m: evaluate_edit(lm, c, suite, m, vectors, s) for m in s.compare}
        clock["compare"] = time.perf_counter() - t
    row["timing"] = {k: round(v, 1) for k, v in clock.items()}
    return row


def run_concepts(lm, concepts: list[Concept], settings: ExperimentSettings | None = None,
                 search: ConceptSearch | None = None, progress: bool = True,
                 vectors: dict | None = None) -> dict:
    """Choose vectors on the selection questions and score every concept on the held-out ones;
    returns the ``results.json`` dict. ``vectors`` ({concept: [(layer, index), ...]} or a single
    ``(layer, index)``) skips the choice for those concepts."""
    s = (settings or ExperimentSettings()).check()
    if not concepts:
        raise DataError("no concepts given")
    if getattr(lm.adapter, "moe_layers", None):
        raise SiteError("the concept experiment (batched ablation scoring, attribution) does "
                        "not support mixture-of-experts models yet; ConceptSearch and "
                        "ConceptAblation (noise/zero) work on expert value vectors directly")
    t0 = time.perf_counter()
    if search is None and s.n_candidates:
        search = ConceptSearch(k=s.k_search, n_candidates=s.n_candidates).fit(lm, concepts,
                                                                               progress=progress)
    search_s = time.perf_counter() - t0
    sel_lm = selection_model(lm, s.select_dtype) if vectors is None or \
        any(c.name not in vectors for c in concepts) else None
    t1 = time.perf_counter()
    suites = [BehaviourSuite(c, s.max_new_tokens, s.n_unrelated, s.n_questions, s.n_completions,
                             s.probes, s.batch_size, s.seed, s.held_out) for c in concepts]
    cache = AnswerCache()  # every original answer at once: full generation batches
    n_prompts = cache.prefetch(lm, [p for su in suites for ps in su.prompts.values() for p in ps],
                               s.max_new_tokens, s.batch_size, progress, suites[0].stop)
    orig_s = time.perf_counter() - t1
    rows = []
    for c, suite in tqdm(list(zip(concepts, suites)), desc="concepts", disable=not progress):
        tc = time.perf_counter()
        suite.fit(lm, cache)
        t_fit = time.perf_counter() - tc
        fixed = (vectors or {}).get(c.name)
        if fixed is not None and isinstance(fixed[0], int):
            fixed = [fixed]
        row = _concept_row(lm, c, suite, search, s, fixed, progress, sel_lm)
        row["timing"] = {"verifier": round(t_fit, 1), **row["timing"]}
        row["seconds"] = round(time.perf_counter() - tc, 1)
        rows.append(row)
    meta = {"model": getattr(lm, "name", "model"), "fingerprint": lm.fingerprint.get("id"),
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "search_seconds": round(search_s, 1), "originals_seconds": round(orig_s, 1),
            "original_prompts": n_prompts, "seconds": round(time.perf_counter() - t0, 1)}
    return {"concepts": rows, "settings": {**asdict(s), "probes": list(s.probes),
                                           "compare": list(s.compare)}, "meta": meta}


def target_reached(row: dict, max_concept_bleu: float = 0.6, min_unrelated_bleu: float = 0.9,
                   min_margin: float = 0.3) -> bool:
    """The issue's target for one concept, on held-out answers: concept-QA BLEU <= 0.6,
    unrelated >= 0.9 and (when a control was run) control concept BLEU - concept BLEU >= 0.3."""
    if not row.get("found", True):
        return False
    ok = row["concept_qa"]["bleu"] <= max_concept_bleu and \
        row["unrelated_qa"]["bleu"] >= min_unrelated_bleu
    if "control" in row:
        ok = ok and row["control"]["concept_qa"]["bleu"] - row["concept_qa"]["bleu"] >= min_margin
    return ok
