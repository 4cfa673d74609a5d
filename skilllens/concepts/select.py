"""Choose a small set of value vectors that carries a concept, on the *selection* questions only.

1. *Pool.* The union of the vocabulary-projection candidates (:class:`.search.ConceptSearch`)
   and the ``n_attr`` vectors with the highest attribution selectivity
   ``attr(concept) - attr(unrelated)`` (gradient x activation of the original answers' mean
   token log-prob, :meth:`.teacher.TeacherForced.attribution`; a first-order prediction of the
   log-prob drop when the vector is zeroed).
2. *Screen.* Each pool vector is ablated (the run's method) and the exact teacher-forced drops
   of the selection concept answers ``d_c`` and selection unrelated answers ``d_u`` measured;
   ``gain = d_c - lam * d_u``.
3. *Greedy set.* In order of screened gain, a vector joins the set when it raises the set's
   gain by at least ``min_gain`` and keeps ``d_u <= max_unrelated_drop``; at most ``max_vectors``.

No generation happens here and the held-out questions are never seen. :func:`random_control`
draws a layer-matched random set of the same size (the control for "removed = just damage").
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field

import torch

from ..errors import DataError
from .ablation import ConceptAblation
from .teacher import TeacherForced


@contextlib.contextmanager
def ablated(lm, vectors, method: str = "zero", sigma: float = 0.1, seed: int = 0):
    """Ablate every ``(layer, index)`` in ``vectors`` at once; all restored exactly on exit.
    Noise draws use ``seed + k`` for the k-th vector, so two vectors never get the same noise."""
    with contextlib.ExitStack() as stack:
        for k, (layer, index) in enumerate(vectors):
            stack.enter_context(ConceptAblation(layer, index, method, sigma, seed + k)
                                .fit(lm).applied(lm))
        yield lm


@dataclass
class Screened:
    """Exact teacher-forced drops (selection questions) of one vector or set."""

    layer: int
    index: int
    source: str  # "vocab", "attribution" or "vocab+attribution"
    attribution: float
    concept_drop: float
    unrelated_drop: float
    gain: float

    def to_dict(self) -> dict:
        return asdict(self)


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
                 max_unrelated_drop: float = 0.05, batch_size: int = 32):
        if max_vectors < 1:
            raise DataError("max_vectors must be at least 1")
        if n_attr < 0:
            raise DataError("n_attr must be >= 0 (0: vocabulary candidates only)")
        self.method, self.sigma, self.seed = method, float(sigma), int(seed)
        self.n_attr, self.max_vectors, self.lam = int(n_attr), int(max_vectors), float(lam)
        self.min_gain, self.max_unrelated_drop = float(min_gain), float(max_unrelated_drop)
        self.batch_size = int(batch_size)

    def _drops(self, lm, vectors, tf_c: TeacherForced, tf_u: TeacherForced) -> tuple[float, float]:
        low = min(layer for layer, _ in vectors)
        with ablated(lm, vectors, self.method, self.sigma, self.seed):
            return tf_c.drop(low), tf_u.drop(low)

    def select(self, lm, concept_qa: tuple[list[str], list[str]],
               unrelated_qa: tuple[list[str], list[str]], vocab_candidates=()) -> Selection:
        """``concept_qa`` / ``unrelated_qa``: (selection prompts, original answers)."""
        tf_c = TeacherForced(lm, *concept_qa, batch_size=self.batch_size).fit()
        tf_u = TeacherForced(lm, *unrelated_qa, batch_size=self.batch_size).fit()
        attr = torch.zeros(lm.adapter.n_layers, lm.adapter.d_ff, dtype=torch.float64)
        pool: dict[tuple[int, int], str] = {}
        for c in vocab_candidates:
            pool[(c.layer, c.index)] = "vocab"
        if self.n_attr:
            attr = tf_c.attribution() - tf_u.attribution()
            for flat in attr.flatten().topk(self.n_attr).indices.tolist():
                key = divmod(flat, attr.shape[1])
                pool[key] = "vocab+attribution" if key in pool else "attribution"
        if not pool:
            raise DataError("no candidate vectors: give vocabulary candidates or n_attr > 0")
        screened = []
        for (layer, index), src in pool.items():
            dc, du = self._drops(lm, [(layer, index)], tf_c, tf_u)
            screened.append(Screened(layer, index, src, float(attr[layer, index]), dc, du,
                                     dc - self.lam * du))
        screened.sort(key=lambda s: -s.gain)
        chosen: list[tuple[int, int]] = []
        best, steps = 0.0, []
        for s in screened:
            if len(chosen) >= self.max_vectors:
                break
            trial = chosen + [(s.layer, s.index)]
            dc, du = (s.concept_drop, s.unrelated_drop) if not chosen else \
                self._drops(lm, trial, tf_c, tf_u)
            gain = dc - self.lam * du
            ok = gain >= best + self.min_gain and du <= self.max_unrelated_drop
            steps.append({"vector": [s.layer, s.index], "concept_drop": dc,
                          "unrelated_drop": du, "gain": gain, "accepted": ok})
            if ok:
                chosen, best = trial, gain
        if not chosen:  # nothing passes: keep the best single vector, flagged in the trace
            chosen = [(screened[0].layer, screened[0].index)]
            steps.append({"vector": list(chosen[0]), "fallback": True})
        return Selection(chosen, screened, steps)


def random_control(lm, vectors, seed: int = 0) -> list[tuple[int, int]]:
    """A layer-matched random set: for each chosen ``(layer, index)`` a random other index of the
    same layer (seeded; never one of the chosen vectors, no repeats)."""
    rng = random.Random(f"control:{seed}:{sorted(vectors)}")
    taken = set(map(tuple, vectors))
    out = []
    for layer, _ in vectors:
        while True:
            j = rng.randrange(lm.adapter.d_ff)
            if (layer, j) not in taken:
                taken.add((layer, j))
                out.append((layer, j))
                break
    return out
