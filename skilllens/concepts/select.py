"""Choose a small set of value vectors that carries a concept, on the *selection* questions only.

1. *Pool.* The union of the vocabulary-projection candidates (:class:`.search.ConceptSearch`)
   and the ``n_attr`` vectors with the highest attribution selectivity
   ``attr(concept) - attr(unrelated)`` (gradient x activation of the original answers' mean
   token log-prob, :meth:`.teacher.TeacherForced.attribution`; a first-order prediction of the
   log-prob drop when the vector is zeroed).
2. *Screen.* Each pool vector is ablated (the run's method) and, by teacher forcing on the
   selection questions, the *greedy agreement* ``g`` (share of each original answer that greedy
   decoding would keep, :meth:`.teacher.TeacherForced.scores`) and the log-prob drop ``d`` are
   measured for the concept (``c``) and unrelated (``u``) answers;
   ``gain = (1 - g_c) - lam * (1 - g_u) + 0.1 * (d_c - d_u)`` (agreement first, log-prob as a
   tie-break: the mean log-prob alone misses near-ties that flip greedy answers).
3. *Greedy set.* In order of screened gain, a vector joins the set when the set's gain (all its
   vectors ablated together) rises by at least ``min_gain`` and ``g_u >= min_unrelated_agreement``;
   at most ``max_vectors``, stopping after ``patience`` rejections in a row. A vector whose own
   ``g_u`` is below ``min_unrelated_agreement`` is rejected without a pass (and does not count
   towards ``patience``: generic early-layer vectors would otherwise end the search). If none is accepted
   the set is empty (reported as "no vector found").

Teacher forcing scores the first ``max_answer_tokens`` (32) tokens of each original answer and
at most ``n_unrelated_tf`` (12) of the selection unrelated questions (CPU time); the set size is
then checked by regenerating all selection answers (:func:`.experiment.choose_size`).

No generation happens here and the held-out questions are never seen. :func:`random_control`
draws a layer-matched random set of the same size (the control for "removed = just damage").
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field

import torch

from skilllens.io import JsonRecord
from skilllens.errors import DataError
from skilllens.concepts.ablation import ConceptAblation
from skilllens.concepts.teacher import TeacherForced
from skilllens.concepts.vocab import check_index


@contextlib.contextmanager
def ablated(lm, vectors, method: str = "zero", sigma: float = 0.1, seed: int = 0):
    """Ablate every ``(layer, index)`` in ``vectors`` at once; all restored exactly on exit.
    Noise draws use ``seed + k`` for the k-th vector, so two vectors never get the same noise."""
    with contextlib.ExitStack() as stack:
        for k, (layer, index) in enumerate(vectors):
            stack.enter_context(ConceptAblation(layer, index, method, sigma, seed + k)
                                .fit(lm, fingerprint=False).applied(lm))
        yield lm


@dataclass
class Screened(JsonRecord):
    """Exact teacher-forced drops (selection questions) of one vector or set."""

    layer: int
    index: int
    source: str  # "vocab", "attribution" or "vocab+attribution"
    attribution: float  # attr(concept) - attr(unrelated)
    concept_drop: float
    unrelated_drop: float
    concept_agreement: float
    unrelated_agreement: float
    gain: float


@dataclass
class Selection:
    """The chosen set (in the order it was built) and the screening / greedy trace."""

    vectors: list[tuple[int, int]]
    screened: list[Screened]
    steps: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"vectors": [list(v) for v in self.vectors],
                "screened": [s.to_dict() for s in self.screened], "steps": self.steps}


class SetSelector:
    """Pool -> screen -> greedy set on teacher-forced selection scores (see module docstring)."""

    def __init__(self, method: str = "zero", sigma: float = 0.1, seed: int = 0, n_attr: int = 12,
                 max_vectors: int = 8, lam: float = 1.0, min_gain: float = 0.005,
                 min_unrelated_agreement: float = 0.9, batch_size: int = 32, patience: int = 4,
                 max_answer_tokens: int = 32, n_unrelated_tf: int = 12, min_layer: int = 0):
        if max_vectors < 1:
            raise DataError("max_vectors must be at least 1")
        if n_attr < 0:
            raise DataError("n_attr must be >= 0 (0: vocabulary candidates only)")
        self.method, self.sigma, self.seed = method, float(sigma), int(seed)
        self.n_attr, self.max_vectors, self.lam = int(n_attr), int(max_vectors), float(lam)
        self.min_gain, self.min_unrelated_agreement = float(min_gain), float(min_unrelated_agreement)
        self.batch_size, self.patience = int(batch_size), int(patience)
        self.max_answer_tokens, self.n_unrelated_tf = int(max_answer_tokens), int(n_unrelated_tf)
        self.min_layer = int(min_layer)  # vectors of earlier layers never enter the pool

    def _change(self, lm, vectors, tf_c: TeacherForced, tf_u: TeacherForced) -> dict:
        """Drops and agreements of the concept and unrelated answers, ``vectors`` ablated."""
        low = min(layer for layer, _ in vectors)
        with ablated(lm, vectors, self.method, self.sigma, self.seed):
            (dc, gc), (du, gu) = tf_c.change(low), tf_u.change(low)
        gain = (1 - gc) - self.lam * (1 - gu) + 0.1 * (dc - du)
        return {"concept_drop": dc, "unrelated_drop": du, "concept_agreement": gc,
                "unrelated_agreement": gu, "gain": gain}

    def select(self, lm, concept_qa: tuple[list[str], list[str]],
               unrelated_qa: tuple[list[str], list[str]], vocab_candidates=()) -> Selection:
        """``concept_qa`` / ``unrelated_qa``: (selection prompts, original answers)."""
        kw = dict(batch_size=self.batch_size, max_answer_tokens=self.max_answer_tokens)
        tf_c = TeacherForced(lm, *concept_qa, **kw).fit()
        u_p, u_a = unrelated_qa
        tf_u = TeacherForced(lm, u_p[: self.n_unrelated_tf], u_a[: self.n_unrelated_tf], **kw).fit()
        attr = tf_c.attribution() - tf_u.attribution()
        if self.min_layer >= attr.shape[0]:
            raise DataError(f"min_layer={self.min_layer} excludes every layer ({attr.shape[0]})")
        attr[: self.min_layer] = float("nan")  # NaN: below min_layer, or past a layer's d_ff
        pool: dict[tuple[int, int], str] = {}
        for c in vocab_candidates:
            if c.layer >= self.min_layer:
                pool[check_index(lm, c.layer, c.index)] = "vocab"
        if self.n_attr:
            real = (~torch.isnan(attr)).nonzero()  # [n, 2] (layer, index), row-major
            vals = attr[real[:, 0], real[:, 1]]
            for i in vals.topk(min(self.n_attr, vals.numel())).indices.tolist():
                key = (int(real[i, 0]), int(real[i, 1]))
                pool[key] = "vocab+attribution" if key in pool else "attribution"
        if not pool:
            raise DataError("no candidate vectors: give vocabulary candidates or n_attr > 0")
        screened = []
        for (layer, index), src in pool.items():
            ch = self._change(lm, [(layer, index)], tf_c, tf_u)
            screened.append(Screened(layer, index, src, float(attr[layer, index]), **ch))
        screened.sort(key=lambda s: -s.gain)
        chosen: list[tuple[int, int]] = []
        best, steps, misses = 0.0, [], 0
        for s in screened:
            if len(chosen) >= self.max_vectors or misses >= self.patience:
                break
            trial = chosen + [(s.layer, s.index)]
            if s.unrelated_agreement < self.min_unrelated_agreement:
                # alone it already changes the unrelated answers: never joins (no pass needed)
                steps.append({"vector": [s.layer, s.index], "accepted": False,
                              "reason": "own unrelated agreement below the limit"})
                continue  # not a miss: patience counts only vectors that were tried in the set
            ch = asdict(s) if not chosen else self._change(lm, trial, tf_c, tf_u)
            ok = ch["gain"] >= best + self.min_gain and \
                ch["unrelated_agreement"] >= self.min_unrelated_agreement
            steps.append({"vector": [s.layer, s.index], **{k: ch[k] for k in (
                "concept_drop", "unrelated_drop", "concept_agreement", "unrelated_agreement",
                "gain")}, "accepted": ok})
            if ok:
                chosen, best, misses = trial, ch["gain"], 0
            else:
                misses += 1
        # nothing passes: an empty set ("no vector found"), not the best of the rejected ones
        return Selection(chosen, screened, steps)


def selection_model(lm, dtype: str = "float32"):
    """The model the selector scores on: ``lm`` itself for its own dtype, else a copy in
    ``dtype`` (e.g. ``bfloat16``: ~3x faster teacher-forced passes on CPUs with bf16 units).
    Only the *choice* uses it; every reported answer is generated by ``lm``."""
    from skilllens.core.moe import adapter_for
    from skilllens.core.models import LoadedModel, copy_model

    want = getattr(torch, dtype, None)
    if not isinstance(want, torch.dtype) or not want.is_floating_point:
        raise DataError(f"unknown select dtype {dtype!r}; use float32 or bfloat16")
    if next(lm.model.parameters()).dtype == want:
        return lm
    m = copy_model(lm.model).to(want).eval()
    return LoadedModel(m, lm.tokenizer, adapter_for(m, lm.adapter.arch),
                       f"{getattr(lm, 'name', 'model')}-{dtype}")


def random_control(lm, vectors, seed: int = 0) -> list[tuple[int, int]]:
    """A layer-matched random set: for each chosen ``(layer, index)`` a random other index of the
    same layer (seeded; never one of the chosen vectors, no repeats)."""
    rng = random.Random(f"control:{seed}:{sorted(vectors)}")
    taken = set(map(tuple, vectors))
    out = []
    for layer, _ in vectors:
        while True:
            j = rng.randrange(lm.adapter.d_ff_at(layer))  # the layer's own width
            if (layer, j) not in taken:
                taken.add((layer, j))
                out.append((layer, j))
                break
    return out
