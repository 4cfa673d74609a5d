"""Causal validation: does editing a vector change the concept's answers and not the others?

A :class:`BehaviourSuite` holds prompt sets for one concept (``concept_qa``, ``unrelated_qa``,
optionally ``completions`` and robustness probes). With ``held_out`` (default 0.5) the concept
and unrelated questions are split (:mod:`.split`): ``concept_qa`` / ``unrelated_qa`` hold the
*held-out* questions (the headline numbers) and ``concept_qa@sel`` / ``unrelated_qa@sel`` the
*selection* questions on which vectors are chosen; probes use the held-out questions only. ``fit(lm)`` records the *unedited* model's
greedy answers and their teacher-forced log-probabilities; afterwards, inside any edit's
``applied(lm)`` block, :meth:`BehaviourSuite.score` regenerates and scores BLEU / ROUGE-L
against the originals, and :meth:`BehaviourSuite.logprob_drop` measures how much less likely
the original answers became (cheap: one forward pass, used to screen candidates).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from skilllens.errors import DataError
from skilllens.concepts.data import Concept
from skilllens.concepts.generation import QA_STOP, Answers, answer_logprob, generate, qa_prompts
from skilllens.concepts.fastscore import score_edits
from skilllens.concepts.metrics import BehaviourScores, text_scores
from skilllens.concepts.split import Split, split_indices
from skilllens.concepts.teacher import TeacherForced

SEL = "@sel"


class AnswerCache:
    """Original-model answers (text and generated ids) keyed by (prompt, max_new_tokens, stop,
    dtype): shared across concepts, filled only from unedited models (the caller's
    responsibility; see BehaviourSuite.fit). Fill it for many prompts at once
    (:meth:`prefetch`) so that the generation batches are full."""

    def __init__(self):
        self.store: dict[tuple, tuple[str, list[int]]] = {}

    def _key(self, lm, max_new_tokens, stop):
        dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        return (max_new_tokens, tuple(stop), dtype)

    def prefetch(self, lm, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: bool = False, stop: tuple = QA_STOP) -> int:
        """Generate the answers of the prompts not cached yet; returns how many were generated."""
        key = self._key(lm, max_new_tokens, stop)
        missing = [p for p in dict.fromkeys(prompts) if (p,) + key not in self.store]
        if missing:
            ans = generate(lm, missing, max_new_tokens, batch_size, progress, stop)
            for p, a, i in zip(missing, ans.texts, ans.ids):
                self.store[(p,) + key] = (a, i)
        return len(missing)

    def get_or_generate(self, lm, prompts: list[str], max_new_tokens: int, batch_size: int,
                        progress: bool = False, stop: tuple = QA_STOP,
                        with_ids: bool = False):
        self.prefetch(lm, prompts, max_new_tokens, batch_size, progress, stop)
        key = self._key(lm, max_new_tokens, stop)
        got = [self.store[(p,) + key] for p in prompts]
        texts = [t for t, _ in got]
        return (texts, [list(i) for _, i in got]) if with_ids else texts


def probe_prompts(concept: Concept, probe: str, context_chars: int = 2000,
                  indices: list[int] | None = None) -> list[str]:
    """Robustness probe prompts for the concept's questions (only ``indices`` when given):
    ``in_context`` (the article's first ``context_chars`` characters before the question),
    ``role_play``, or ``translated:LANG``."""
    qs = concept.questions if indices is None else [concept.questions[i] for i in indices]
    if probe == "in_context":
        ctx = concept.text[:context_chars].strip()
        return [f"{ctx}\n\n{p}" for p in qa_prompts(qs)]
    if probe == "role_play":
        intro = (f"You are a world expert on {concept.name} and you answer every question about "
                 f"{concept.name} accurately and in detail.\n")
        return [intro + p for p in qa_prompts(qs)]
    if probe.startswith("translated:"):
        lang = probe.split(":", 1)[1]
        tq = concept.translated_questions.get(lang)
        if not tq:
            raise DataError(f"concept {concept.name!r} has no questions translated to {lang!r}; "
                            f"add translated_questions: {{{lang}: [...]}} to the concept file")
        if indices is not None and len(tq) == len(concept.questions):
            tq = [tq[i] for i in indices]
        return qa_prompts(tq)
    raise DataError(f"unknown probe {probe!r}; use in_context, role_play or translated:LANG")


class BehaviourSuite:
    """Prompt sets for one concept and the unedited model's answers to them."""

    def __init__(self, concept: Concept, max_new_tokens: int = 100, n_unrelated: int | None = None,
                 n_questions: int | None = None, n_completions: int = 0, probes: tuple = (),
                 batch_size: int = 64, seed: int = 0, held_out: float | None = 0.5,
                 stop: tuple = QA_STOP):
        self.concept = concept
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.stop = tuple(stop)
        unrel = list(concept.unrelated_questions)
        if n_unrelated is not None and n_unrelated < len(unrel):
            unrel = random.Random(seed).sample(unrel, int(n_unrelated))
        qs = concept.questions[:n_questions] if n_questions else list(concept.questions)
        self.split_: dict[str, Split] = {}
        self.prompts: dict[str, list[str]] = {}
        q_idx = list(range(len(qs)))
        if held_out is None:
            self.prompts.update(concept_qa=qa_prompts(qs), unrelated_qa=qa_prompts(unrel))
        else:
            for name, items in (("concept_qa", qs), ("unrelated_qa", unrel)):
                sp = split_indices(len(items), held_out, seed, f"{concept.name}:{name}")
                self.split_[name] = sp
                self.prompts[name] = qa_prompts([items[i] for i in sp.held_out])
                self.prompts[name + SEL] = qa_prompts([items[i] for i in sp.selection])
            q_idx = self.split_["concept_qa"].held_out
        self.unrelated_questions = unrel
        if n_completions:
            comps = concept.completions[:n_completions]
            if comps:
                self.prompts["completions"] = [c["prefix"] for c in comps]
        for p in probes:
            self.prompts[p] = probe_prompts(concept, p, indices=q_idx)
        self.original_: dict[str, list[str]] = {}
        self.original_logprob_: dict[str, torch.Tensor] = {}
        self.original_ids_: dict[str, list[list[int]]] = {}
        self.verifiers_: dict[str, TeacherForced] = {}
        self.dtype_: str | None = None

    def sel(self, name: str) -> str:
        """The selection counterpart of prompt set ``name`` (``name`` itself without a split)."""
        return name + SEL if name + SEL in self.prompts else name

    @property
    def held_out_sets(self) -> list[str]:
        """Prompt sets scored for the headline (every set but the selection ones)."""
        return [k for k in self.prompts if not k.endswith(SEL)]

    def split_record(self, seed: int, held_out: float | None) -> dict:
        """The split as recorded in ``results.json``: indices into the concept's questions and
        into the (possibly sub-sampled) unrelated questions, plus the seed and fraction."""
        return {"seed": seed, "held_out_fraction": held_out,
                **{k: v.to_dict() for k, v in self.split_.items()},
                "unrelated_questions": self.unrelated_questions}

    def fit(self, lm, cache: AnswerCache | None = None, progress: bool = False,
            verify: bool = True, tf_batch: int = 8) -> "BehaviourSuite":
        """Record the unedited model's answers (call outside any ``applied`` block) and, with
        ``verify``, a teacher-forced verifier per prompt set for :meth:`score_edits`
        (``original_logprob_`` then comes from it: the mean log-prob per token of the original
        generated ids; without ``verify``, of the re-tokenised answer text)."""
        cache = cache or AnswerCache()
        cache.prefetch(lm, [p for ps in self.prompts.values() for p in ps], self.max_new_tokens,
                       self.batch_size, progress, self.stop)
        for name, prompts in self.prompts.items():
            self.original_[name], self.original_ids_[name] = cache.get_or_generate(
                lm, prompts, self.max_new_tokens, self.batch_size, progress, self.stop, True)
        for name in self.prompts:
            if verify:
                self.verifiers_[name] = TeacherForced(
                    lm, self.prompts[name], None, tf_batch, answer_ids=self.original_ids_[name],
                    max_new_tokens=self.max_new_tokens).fit()
            if name.split("@")[0] in ("concept_qa", "unrelated_qa"):
                self.original_logprob_[name] = self.verifiers_[name].base_ if verify else \
                    answer_logprob(lm, self.prompts[name], self.original_[name])
        self.dtype_ = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        return self

    def score_edits(self, lm, jobs, batch_size: int | None = None) -> list["BehaviourScores"]:
        """Score several edits at once (:func:`.fastscore.score_edits`: teacher-forced
        verification, then generation only where an answer changes)."""
        return score_edits(lm, self, jobs, batch_size)

    def _check(self, lm):
        if self.dtype_ is None:
            raise DataError("BehaviourSuite is not fitted; call .fit(lm) on the unedited model")
        dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        if dtype != self.dtype_:
            raise DataError(f"original answers were generated in {self.dtype_} but the model now "
                            f"runs in {dtype}; compare answers produced in the same dtype")

    def logprob_drop(self, lm, sets=("concept_qa", "unrelated_qa")) -> dict[str, float]:
        """Mean drop of the original answers' per-token log-probability, per prompt set."""
        self._check(lm)
        out = {}
        for name in sets:
            now = self.verifiers_[name].logprob(0) if name in self.verifiers_ else \
                answer_logprob(lm, self.prompts[name], self.original_[name])
            ok = ~torch.isnan(now) & ~torch.isnan(self.original_logprob_[name])
            out[name] = float((self.original_logprob_[name][ok] - now[ok]).mean()) if ok.any() else 0.0
        return out

    def score(self, lm, sets=None, with_logprob: bool = True) -> BehaviourScores:
        """Regenerate (greedy) under the model's current state and score against the originals."""
        self._check(lm)
        sets = list(sets or self.held_out_sets)
        text, answers = {}, {}
        for name in sets:
            ans: Answers = generate(lm, self.prompts[name], self.max_new_tokens, self.batch_size,
                                    stop=self.stop)
            answers[name] = ans.texts
            text[name] = text_scores(ans.texts, self.original_[name])
        drops = self.logprob_drop(lm, [s for s in sets if s.split("@")[0] in ("concept_qa",
                                                                                "unrelated_qa")]) \
            if with_logprob else {}
        return BehaviourScores(text, drops, answers)


@dataclass
class ScreenResult:
    """Teacher-forced screening of one candidate: ``selectivity = concept drop - unrelated drop``
    (``unrelated_drop`` is None when only the concept set was screened; selectivity is then the
    concept drop alone)."""

    layer: int
    index: int
    concept_drop: float
    unrelated_drop: float | None = None

    @property
    def selectivity(self) -> float:
        return self.concept_drop - (self.unrelated_drop or 0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "selectivity": self.selectivity}


def screen_candidates(lm, suite: BehaviourSuite, candidates, method: str = "zero",
                      sigma: float = 0.1, seed: int = 0, progress: bool = False,
                      sets=("concept_qa", "unrelated_qa")) -> list[ScreenResult]:
    """Ablate each candidate in turn and measure log-prob drops on the *selection* questions
    (all questions when the suite has no split); sorted by selectivity.

    ``sets=("concept_qa",)`` screens on the concept's questions only (5x cheaper with 10 concept
    and 50 unrelated questions); unrelated answers are then checked by generation afterwards."""
    from skilllens.concepts.ablation import ConceptAblation

    sets = tuple(sets)
    if "concept_qa" not in sets:
        raise DataError("screening needs the concept_qa set")
    out = []
    for c in tqdm(candidates, desc=f"screen {suite.concept.name}", disable=not progress, leave=False):
        abl = ConceptAblation(c.layer, c.index, method, sigma, seed).fit(lm)
        with abl.applied(lm):
            d = suite.logprob_drop(lm, [suite.sel(x) for x in sets])
        out.append(ScreenResult(c.layer, c.index, d[suite.sel("concept_qa")],
                                d.get(suite.sel("unrelated_qa"))))
    return sorted(out, key=lambda r: -r.selectivity)
