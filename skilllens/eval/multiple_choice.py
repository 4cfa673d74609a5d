"""Multiple-choice scoring as lm-evaluation-harness does it (MMLU, MMLU-Redux).

For each question the model's log-likelihood of every choice continuation (`` A``, `` B``,
`` C``, `` D``) is computed given the prompt (``Item.prompt``: lm-eval's MMLU template,
:mod:`skilllens.data.mmlu`); the prediction is the choice of highest log-likelihood
(``acc``, lm-eval's ``acc``) or of highest log-likelihood per character of the choice string
(``acc_norm``, lm-eval's ``acc_norm``: ``argmax ll_k / len(choice_k)``; for one-letter choices it
equals ``acc``). Ties go to the first choice, as ``numpy.argmax`` does in lm-eval.
``token_accuracy`` is the teacher-forced token accuracy of the gold answer's text
(``Item.answer``, `` B. <text>``; :func:`skilllens.eval.evaluation.teacher_forced`), the number
the other skills report.

Log-likelihood of a continuation (lm-eval's ``loglikelihood``): ``sum_t log p(c_t | context,
c_<t)`` over the continuation's tokens, from one joint tokenisation of context + continuation
(:func:`skilllens.core.batching.encode_items`), log-softmax in float32; ``is_greedy`` is True when
every continuation token is the argmax.

**Abstention** (an ``abstainer`` such as a fitted KSD): an abstained question is answered by no
choice and counts as wrong in ``acc``, ``acc_norm`` and ``token_accuracy``; every mean is over
all ``n_items``, as in :func:`skilllens.eval.evaluate`.

**Chance.** With 4 choices chance is ``CHANCE = 0.25``. :func:`near_chance` flags an accuracy
within ``z = 2`` binomial standard errors of chance (``acc - 0.25 < 2 * sqrt(0.25 * 0.75 / n)``):
relative performance ``after / before`` of a model that is at chance before says nothing about
forgetting, so reports mark it.

**One pass** (:class:`ChoiceRecorder`). Teacher forcing of an item's answer text computes the
logits at the last prompt token, which is all that the log-likelihood of a one-token choice
needs: ``log p(choice | prompt)`` is one entry of that row's float32 log-softmax. An item
qualifies when every ``prompt + choice`` encodes as exactly the prompt ids of the
teacher-forced encoding plus one token; the others (and items a pass did not cover) get their
own choice passes, so the numbers are the same either way. :func:`evaluate_multiple_choice`
uses it (one pass for ``acc`` and ``token_accuracy``); so can any caller of
``evaluate(..., on_logits=rec.on_logits)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from skilllens.core.batching import Encoded, clamp_length, encode_items, iter_batches, n_batches
from skilllens.data import Item, as_skill
from skilllens.errors import DataError

LETTERS = "ABCDEFGHIJ"
CHANCE = 0.25
NEAR_CHANCE_Z = 2.0


def near_chance(acc: float, n: int, chance: float = CHANCE, z: float = NEAR_CHANCE_Z) -> bool:
    """True when ``acc`` is less than ``z`` binomial standard errors above ``chance`` on ``n``
    questions (``acc - chance < z * sqrt(chance (1 - chance) / n)``), or ``n == 0``."""
    if n <= 0 or acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return True
    return acc - chance < z * math.sqrt(chance * (1 - chance) / n)


def choice_strings(item: Item) -> tuple[list[str], int]:
    """``([" A", " B", ...], gold index)`` of a multiple-choice item (``meta["choices"]`` and
    ``meta["gold"]``, or an MMLU item's ``meta["answer"]`` letter with 4 choices)."""
    meta = item.meta
    n = len(meta["choices"]) if "choices" in meta else 4
    if "gold" in meta:
        gold = int(meta["gold"])
    elif len(str(meta.get("answer", "")).strip()) == 1 and \
            str(meta["answer"]).strip().upper() in LETTERS[:n]:
        gold = LETTERS.index(str(meta["answer"]).strip().upper())
    else:
        raise DataError(f"item {item.id!r} is not a multiple-choice item: it needs meta "
                        f"'choices' and 'gold' (MMLU-Redux, MMLU)")
    if not 0 <= gold < n or n > len(LETTERS):
        raise DataError(f"item {item.id!r}: gold index {gold} outside its {n} choices")
    return [f" {LETTERS[k]}" for k in range(n)], gold


@torch.no_grad()
def continuation_loglikelihoods(lm, pairs: list[tuple[str, str]], *, batch_size: int = 8,
                                max_length: int = 512, progress: bool = False,
                                desc: str = "loglikelihood") -> list[tuple[float, bool, int]]:
    """``(log-likelihood, is_greedy, n_tokens)`` of each ``(context, continuation)`` pair (module
    docstring); length-sorted right-padded batches, results in pair order.
    Raises DataError for an empty continuation."""
    from skilllens.eval.evaluation import _accepts_logits_to_keep, _progress

    items = [Item(f"pair/{i}", c, x) for i, (c, x) in enumerate(pairs)]
    if any(not x for _, x in pairs):
        raise DataError("a continuation is empty; nothing to score")
    model, tok = lm.model, lm.tokenizer
    encoded = encode_items(items, tok, max_length)
    # one-token continuations of the same context share one forward pass (MMLU's " A".." D")
    reps, members, by_prompt = [], [], {}
    for e in encoded:
        key = tuple(e.ids[:e.prompt_len]) if len(e.ids) - e.prompt_len == 1 else None
        if key is not None and key in by_prompt:
            members[by_prompt[key]].append(e)
            continue
        if key is not None:
            by_prompt[key] = len(reps)
        reps.append(Encoded(e.ids, e.prompt_len, len(reps), e.truncated))
        members.append([e])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    keep_arg = _accepts_logits_to_keep(model)
    out: list = [None] * len(items)
    batches = iter_batches(reps, batch_size, pad, lm.device)
    for b in _progress(batches, n_batches(len(reps), batch_size), desc, progress):
        ids = b.input_ids
        pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None]  # position t predicts t+1
        need = (pos >= b.prompt_lens[:, None] - 1) & (pos < b.lengths[:, None] - 1)  # [B, T-1]
        cols = need.any(0).nonzero().squeeze(1)                         # [K]
        if keep_arg:
            logits = model(**b.inputs, logits_to_keep=cols).logits      # [B, K, V]
        else:
            logits = model(**b.inputs).logits[:, cols]
        logp = torch.log_softmax(logits.float(), -1)
        col_of = {int(c): j for j, c in enumerate(cols.tolist())}
        for r, rep in enumerate(b.index.tolist()):
            for e in members[rep]:
                at = [col_of[t] for t in range(e.prompt_len - 1, len(e.ids) - 1)]
                target = torch.tensor(e.ids[e.prompt_len:], device=logp.device)
                rows = logp[r, at]                                      # [n, V]
                lp = rows.gather(-1, target[:, None])[:, 0]
                out[e.index] = (float(lp.double().sum()), bool((rows.argmax(-1) == target).all()),
                                len(at))
    return out


@dataclass
class MultipleChoiceScore:
    """lm-eval-style multiple-choice scores of one skill under one model state: ``acc``,
    ``acc_norm``, ``token_accuracy`` (teacher-forced, of the gold answer text), ``chance`` and
    ``near_chance`` (:func:`near_chance` of ``acc``). Means are over all ``n_items``, abstained
    ones counted wrong."""

    skill: str
    acc: float
    acc_norm: float
    token_accuracy: float
    n_items: int
    n_abstained: int
    chance: float = CHANCE
    near_chance: bool = False
    per_item: list[dict] = field(default_factory=list)

    def to_dict(self, per_item: bool = True) -> dict:
        d = asdict(self)
        if not per_item:
            d.pop("per_item")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def score_items(lm, items: list[Item], abstained: list[bool] | None = None, *,
                batch_size: int = 8, max_length: int = 512, progress: bool = False,
                token_accuracy: bool = True, known: dict | None = None) -> list[dict]:
    """Per-item rows ``{"id", "abstained", "lls", "gold", "acc", "acc_norm", "token_accuracy"}``
    (abstained: 0 everywhere, ``lls`` None). ``known``: ``{item position: [ll per choice]}``
    already computed (:class:`ChoiceRecorder`); only the other
    items' choices are scored here."""
    from skilllens.eval.evaluation import teacher_forced

    abstained = abstained if abstained is not None else [False] * len(items)
    known = dict(known or {})
    answered = [it for it, a in zip(items, abstained) if not a]
    tf = [{"accuracy": float("nan")}] * len(answered)
    if token_accuracy and answered:  # one pass: the choices' lls come with the answer's logits
        rec = ChoiceRecorder(lm, answered, max_length, batch_size)
        tf = teacher_forced(lm, answered, batch_size=batch_size, max_length=max_length,
                            progress=False, on_logits=rec.on_logits)
        where = [p for p, a in enumerate(abstained) if not a]
        known.update({where[i]: v for i, v in rec.lls.items()})
    pairs, spans, lls = [], [], []
    for pos, (it, a) in enumerate(zip(items, abstained)):
        if a:
            continue
        conts, gold = choice_strings(it)
        if pos in known:  # stored as (ll, is_greedy, n_tokens) like the pairs scored below
            spans.append((-1 - len(lls), len(conts), gold, conts))
            lls.append(known[pos])
            continue
        spans.append((len(pairs), len(conts), gold, conts))
        pairs += [(it.prompt, c) for c in conts]
    scored = continuation_loglikelihoods(lm, pairs, batch_size=batch_size, max_length=max_length,
                                         progress=progress, desc="choices") if pairs else []
    rows, k = [], 0
    for it, a in zip(items, abstained):
        if a:
            rows.append({"id": it.id, "abstained": True, "lls": None,
                         "gold": choice_strings(it)[1], "acc": 0.0, "acc_norm": 0.0,
                         "token_accuracy": 0.0})
            continue
        start, n, gold, conts = spans[k]
        ll = list(lls[-1 - start]) if start < 0 else [scored[start + j][0] for j in range(n)]
        norm = [v / len(c.strip()) for v, c in zip(ll, conts)]   # lm-eval: len(choice)
        pred = max(range(n), key=lambda j: (ll[j], -j))
        pred_n = max(range(n), key=lambda j: (norm[j], -j))
        rows.append({"id": it.id, "abstained": False, "lls": ll, "gold": gold,
                     "acc": float(pred == gold), "acc_norm": float(pred_n == gold),
                     "token_accuracy": tf[k]["accuracy"]})
        k += 1
    return rows


def summarize_choices(name: str, rows: list[dict]) -> MultipleChoiceScore:
    """:class:`MultipleChoiceScore` of per-item rows (means over all rows)."""
    n = len(rows)
    if n == 0:
        raise DataError(f"skill {name!r} has no items to score")
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    acc = mean("acc")
    return MultipleChoiceScore(name, acc, mean("acc_norm"), mean("token_accuracy"), n,
                               sum(r["abstained"] for r in rows),
                               near_chance=near_chance(acc, n), per_item=rows)


def with_abstention(score: MultipleChoiceScore, mask: list[bool]) -> MultipleChoiceScore:
    """``score`` with the items of ``mask`` abstained (scored 0), for a detector that changes no
    activations (KSD): the same numbers as rescoring with ``abstainer=``."""
    if len(mask) != score.n_items:
        raise DataError(f"abstention mask has {len(mask)} entries for {score.n_items} items")
    rows = [{**r, "abstained": True, "lls": None, "acc": 0.0, "acc_norm": 0.0,
             "token_accuracy": 0.0} if a else dict(r) for r, a in zip(score.per_item, mask)]
    return summarize_choices(score.skill, rows)


def evaluate_multiple_choice(lm, skill, *, abstainer=None, batch_size: int = 8,
                             max_length: int = 512, progress: bool = True, data_dir=None,
                             token_accuracy: bool = True) -> MultipleChoiceScore:
    """Score ``lm`` on the multiple-choice ``skill`` (``Skill``, items, or a spec string: then
    its *eval* part, e.g. ``"mmlu-redux"``). Interventions are active when the caller wraps the
    call in ``with method.applied(lm): ...``; abstained items count as wrong.
    Raises DataError for items without choices."""
    from skilllens.eval.evaluation import _abstentions, _loaded

    lm = _loaded(lm)
    skill = as_skill(skill, data_dir, part="eval")
    items = list(skill.items)
    for it in items:
        choice_strings(it)
    abstained = _abstentions(abstainer, lm, items)
    rows = score_items(lm, items, abstained, batch_size=batch_size, max_length=max_length,
                       progress=progress, token_accuracy=token_accuracy)
    return summarize_choices(skill.name, rows)


class ChoiceRecorder:
    """Collects choice log-likelihoods of ``items`` during ``evaluate(..., on_logits=...)``
    (no abstainer: batch indices must be positions in ``items``)."""

    def __init__(self, lm, items, max_length: int = 512, batch_size: int = 8):
        self.lm, self.items = lm, list(items)
        self.max_length, self.batch_size = max_length, batch_size
        used = clamp_length(max_length, lm.model, lm.tokenizer)
        tf = encode_items(self.items, lm.tokenizer, used)
        conts = [choice_strings(it)[0] for it in self.items]
        pairs = encode_items([Item(f"c{i}/{k}", it.prompt, c) for i, it in enumerate(self.items)
                              for k, c in enumerate(conts[i])], lm.tokenizer, used)
        self._cands: dict[int, list[int]] = {}
        start = 0
        for i, e in enumerate(tf):
            encs, start = pairs[start:start + len(conts[i])], start + len(conts[i])
            prompt = e.ids[:e.prompt_len]
            if e.prompt_len >= len(e.ids):
                continue  # nothing teacher-forced after the prompt: no logits there
            if all(c.ids[:-1] == prompt and c.prompt_len == len(prompt) for c in encs):
                self._cands[i] = [c.ids[-1] for c in encs]
        self.lls: dict[int, list[float]] = {}

    def on_logits(self, batch, cols: torch.Tensor, logits: torch.Tensor) -> None:
        """:func:`~skilllens.eval.evaluation.teacher_forced`'s ``on_logits`` callback."""
        col_of = {int(c): j for j, c in enumerate(cols.tolist())}
        for r, i in enumerate(batch.index.tolist()):
            cand = self._cands.get(i)
            j = col_of.get(int(batch.prompt_lens[r]) - 1)
            if cand is None or j is None:
                continue
            lp = torch.log_softmax(logits[r, j].float(), -1)
            self.lls[i] = [float(lp[t].double()) for t in cand]

    @property
    def n_read(self) -> int:
        """Items whose choices were read from the teacher-forced pass."""
        return len(self.lls)

    def score(self, name: str, abstained: list[bool] | None = None) -> MultipleChoiceScore:
        """The items' :class:`MultipleChoiceScore` (``token_accuracy`` NaN: the evaluation has
        it); items not read are scored by their own choice passes."""
        rows = score_items(self.lm, self.items, abstained, batch_size=self.batch_size,
                           max_length=self.max_length, token_accuracy=False, known=self.lls)
        return summarize_choices(name, rows)
