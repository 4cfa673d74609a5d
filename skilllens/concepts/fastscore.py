"""Score many edits of one concept at once: verify by teacher forcing, generate only what changed.

Greedy generation is deterministic, so an edited model reproduces an original answer's first
``k`` tokens exactly when, teacher-forced on the original generated tokens, its argmax equals
the answer token at each of those ``k`` positions. :func:`score_edits` therefore

1. runs one teacher-forced pass per edit and prompt set over *prompt + original generated ids*
   (:meth:`.teacher.TeacherForced.matched`; blocks below the edit's lowest layer are replayed
   from the unedited model's recorded outputs, so a layer-29 edit runs one block);
2. keeps the original answer where every token (including the EOS / stop token that ended it)
   is reproduced, and otherwise *continues* greedy generation from the matched prefix;
3. generates the continuations of all edits in one batch when every edit is a set of zeroed
   value vectors: row ``r`` gets its own edit through :class:`RowMasks` (the input of the down
   projection multiplied by a 0/1 mask, which is bit-for-bit the same as zeroing the weight
   column); other edits (noise, project, Needle, GA, NPO) are applied one at a time.

Verification and generation see the same prompt ids: both cut long prompts with
:func:`skilllens.core.batching.generation_prompts` (BOS and the prompt's end, ``context -
max_new_tokens`` tokens; the verifier is built with the suite's ``max_new_tokens``).

The answers equal those of regenerating every prompt under each edit (tested against the plain
path on a tiny random model) up to floating point: a teacher-forced pass and a KV-cache decode
sum in different orders, so an exact near-tie of two logits could resolve differently (as it can
between two batch compositions of plain generation). Where the *unedited* model's own
teacher-forced argmax leaves its generated tokens, verification stops there and generation takes
over. The log-prob drops come from the same teacher-forced pass (mean log-prob per token of the
original generated ids, stop token included).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from skilllens.core.hooks import Hook, hooks_applied
from skilllens.errors import DataError
from skilllens.concepts.generation import greedy_generate
from skilllens.concepts.metrics import BehaviourScores, text_scores
from skilllens.concepts.vocab import check_index


class RowMasks:
    """Per-row zero ablations inside one batched forward: ``row_vectors[i]`` lists the
    ``(layer, index)`` value vectors zeroed for input row ``i``. The generator calls
    :meth:`set_rows` with the live rows' input indices. Each layer's mask is ``[rows,
    d_ff_at(layer)]`` (a per-layer FFN width); raises ``SiteError`` naming the layer for an
    index past it."""

    def __init__(self, lm, row_vectors: list[list[tuple[int, int]]]):
        ad = lm.adapter
        self.lm, self.live = lm, None
        dev, dtype = lm.device, next(lm.model.parameters()).dtype
        self.masks: dict[int, torch.Tensor] = {}
        for r, vs in enumerate(row_vectors):
            for layer, index in vs:
                layer, index = check_index(lm, layer, index)
                if layer not in self.masks:
                    self.masks[layer] = torch.ones(len(row_vectors), ad.d_ff_at(layer),
                                                   dtype=dtype, device=dev)
                self.masks[layer][r, index] = 0
        self.rows = len(row_vectors)

    def set_rows(self, idx: list[int]) -> None:
        self.live = torch.tensor(idx, dtype=torch.long, device=self.lm.device)

    @contextlib.contextmanager
    def applied(self):
        """The masks as edits of the ``key`` site (the down projection's input) of each layer,
        through the library's one hook mechanism (:func:`skilllens.core.hooks.hooks_applied`)."""
        def edit(layer):
            def fn(x):
                if self.live is None:
                    raise DataError("RowMasks: set_rows was not called before the forward pass")
                m = self.masks[layer][self.live]
                return x * m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
            return fn

        try:
            with hooks_applied(self.lm, [Hook("key", layer, edit(layer)) for layer in self.masks]):
                yield self
        finally:
            self.live = None


@dataclass
class EditJob:
    """One edit to score: ``apply()`` returns a context manager writing it into the model;
    ``min_layer`` is the lowest layer it changes; ``zeroed`` lists the zeroed value vectors when
    the edit is exactly that (then it can share a batch with other such edits)."""

    apply: Callable[[], contextlib.AbstractContextManager]
    min_layer: int
    sets: list[str]
    zeroed: list[tuple[int, int]] | None = None


def score_edits(lm, suite, jobs: list[EditJob], batch_size: int | None = None) -> list:
    """:class:`.validate.BehaviourScores` of every job (text scores against the originals, the
    answers, and teacher-forced log-prob drops of the concept / unrelated sets)."""

    suite._check(lm)
    for j in jobs:
        missing = [s for s in j.sets if s not in suite.verifiers_]
        if missing:
            raise DataError(f"prompt set(s) {missing} have no verifier; fit the suite with them")
    answers = [{s: list(suite.original_[s]) for s in j.sets} for j in jobs]
    drops: list[dict] = [{} for _ in jobs]
    todo: list[tuple[int, str, int, list[int]]] = []  # (job, set, row, verified prefix ids)
    for jn, job in enumerate(jobs):
        with job.apply():
            for name in job.sets:
                tf = suite.verifiers_[name]
                lp, k = tf.matched(job.min_layer)
                ok = ~torch.isnan(lp) & ~torch.isnan(tf.base_)
                if name.split("@")[0] in ("concept_qa", "unrelated_qa"):
                    drops[jn][name] = float((tf.base_[ok] - lp[ok]).mean()) if ok.any() else 0.0
                for i, ids in enumerate(suite.original_ids_[name]):
                    if int(k[i]) < len(ids):
                        todo.append((jn, name, i, list(ids[:int(k[i])])))
    bs = batch_size or suite.batch_size

    def gen(items, row_edit=None):
        if not items:
            return []
        return greedy_generate(lm.model, lm.tokenizer, [suite.prompts[n][i] for _, n, i, _ in items],
                               suite.max_new_tokens, suite.stop, bs,
                               prefixes=[p for *_, p in items], row_edit=row_edit)

    if todo and all(j.zeroed is not None for j in jobs):
        rm = RowMasks(lm, [jobs[jn].zeroed for jn, *_ in todo])
        with rm.applied():
            texts = gen(todo, rm)
        for (jn, name, i, _), t in zip(todo, texts):
            answers[jn][name][i] = t
    else:
        for jn, job in enumerate(jobs):
            items = [x for x in todo if x[0] == jn]
            if items:
                with job.apply():
                    texts = gen(items)
                for (_, name, i, _), t in zip(items, texts):
                    answers[jn][name][i] = t
    out = []
    for jn, job in enumerate(jobs):
        text = {s: text_scores(answers[jn][s], suite.original_[s]) for s in job.sets}
        out.append(BehaviourScores(text, drops[jn], answers[jn]))
    return out
