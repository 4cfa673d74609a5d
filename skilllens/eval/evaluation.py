"""Skill evaluation harness: teacher-forced and generation scores, with abstention.

Metrics (``evaluate(..., metric=...)``):

* ``token_accuracy`` (default) and ``nll``: teacher-forced. The logits at positions
  ``prompt_len - 1 .. length - 2`` predict the answer tokens. Per item: the fraction of answer
  tokens that are the argmax, and the mean per-token negative log-likelihood (nats); both are
  **averaged per item first, then over items** (long answers do not dominate). Items without an
  answer are scored on their whole text (language modelling).
* ``exact_match``: greedy generation; GSM8K-style items (``meta["final"]``) are prompted k-shot
  with chain-of-thought examples from the skill's *probe* part and scored by the final number;
  other items by SQuAD-normalised exact match.
* ``pass@1``: greedy completion of HumanEval/MBPP prompts, tests run in :mod:`skilllens.sandbox`
  (code that hangs, eats memory or tries the network fails that item; the run continues).
* ``f1`` / ``substring``: greedy short answers for SQuAD/XQuAD/MLQA items, scored against all
  gold answers (:mod:`skilllens.eval.scoring`).

Batching: :func:`skilllens.core.batching.plan_batches` (longest first) for every path; teacher-forced
batches right-padded, generation left-padded, both with the tokenizer's
:func:`~skilllens.core.batching.pad_id` (the caller's tokenizer settings are never read or
changed); results in item order. ``max_length`` is clamped to the model's context
(:func:`~skilllens.core.batching.clamp_length`); items over it are cut as
:mod:`skilllens.core.batching` says (never a prompt that fits), counted in ``n_truncated`` by
the function that cuts (for generation metrics: the prompts generation actually received).
An item whose prompt and answer share a token (``Item("a", "Ans", "wer")`` is one token
``Answer`` for SmolLM2) is scored from the split the tokenizer allows, or with its two sides
tokenised apart when one token swallows the prompt; such items are counted in
``n_merged_boundary`` and never abort the run.

**Abstention.** An ``abstainer`` (``.abstains(lm, items) -> BoolTensor[n]``) decides on the
prompts before anything runs; abstained items are neither generated nor scored teacher-forced,
and they count in every mean (``n_items`` is always the denominator):

* ``token_accuracy`` and every generation metric: an abstained item scores 0 (wrong).
* ``nll``: an abstained item costs ``abstain_nll = log(V)`` nats per token (the uniform
  distribution over the ``V`` outputs: no information about the answer). ``nll_answered`` is
  the mean over answered items only.

:func:`relative` is ``after / before``, or ``before / after`` for ``nll``: below 1 always means
"worse at the skill". Everything runs under ``torch.no_grad()``; interventions are active when
the caller wraps the call in ``with method.applied(lm): ...``.
"""
from __future__ import annotations

import inspect
import math
import re

import torch

from skilllens.core.loaded_model import eval_mode
from skilllens.core.batching import clamp_length, encode_items, iter_batches, n_batches, pad_id
from skilllens.data import Item, Skill, as_skill, load_skill, sample_skill
from skilllens.errors import DataError, SkillLensError
from skilllens.eval.generation import generate_batched
from skilllens.eval.scores import METRICS, TEACHER_FORCED, SkillScore, abstained_row, summarize

#: stop strings and default new-token budgets per kind of item
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
MBPP_STOPS = ('\n"""', "\nassert ", "\nif __name__", "\nprint(", "\n```", "\n\n\n")
GSM8K_STOPS = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")
QA_STOPS = ("\n",)
MAX_NEW_TOKENS = {"gsm8k": 256, "code": 384, "qa": 24, "other": 64}


def abstain_nll(lm) -> float:
    """NLL (nats/token) charged to an abstained item: ``log(V)``, the uniform distribution over
    the model's output vocabulary ``V``."""
    emb = lm.model.get_output_embeddings()
    v = emb.weight.shape[0] if emb is not None else lm.model.config.vocab_size
    return math.log(v)


def _loaded(lm):
    from skilllens.core.loaded_model import LoadedModel
    from skilllens.core.models import load_model
    lm = lm if isinstance(lm, LoadedModel) else load_model(lm)
    if not lm.model.can_generate() or getattr(lm.model.config, "is_encoder_decoder", False):
        raise SkillLensError(f"{lm.name} is not a causal language model; evaluation needs one "
                             f"(e.g. smollm2-135m or tiny-llama)")
    return lm


def _abstentions(abstainer, lm, items: list[Item]) -> list[bool]:
    if abstainer is None:
        return [False] * len(items)
    got = torch.as_tensor(abstainer.abstains(lm, items))
    if got.dtype != torch.bool or got.shape != (len(items),):
        raise SkillLensError(f"abstainer.abstains must return a BoolTensor of shape "
                             f"[{len(items)}]; got {got.dtype} {tuple(got.shape)}")
    return got.tolist()


def _progress(it, total, desc, progress):
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def teacher_forced(lm, items: list[Item], *, batch_size: int = 8, max_length: int = 512,
                   progress: bool = True, desc: str = "teacher-forced",
                   on_batch=None, on_logits=None) -> list[dict]:
    """Per item ``{"accuracy", "nll", "n_tokens", "truncated", "merged_boundary"}`` of the gold
    answer given the prompt (length-sorted right-padded batches; rows returned in item order).
    ``max_length`` is clamped to the model's context. ``on_batch(batch)`` is called with each
    :class:`~skilllens.core.batching.Batch` before its forward pass (``batch.index``: indices
    into ``items``), e.g. by a :class:`~skilllens.core.prompt_recorder.PromptVectorRecorder`;
    ``on_logits(batch, cols, logits)`` after it with the logits ``[B, K, V]`` at positions
    ``cols`` ``[K]`` (every position from the last prompt token on), e.g. by a
    :class:`~skilllens.eval.multiple_choice.ChoiceRecorder`."""
    model, tok = lm.model, lm.tokenizer
    encoded = encode_items(items, tok, clamp_length(max_length, model, tok))
    for e in encoded:
        if len(e.ids) < 2:
            raise DataError(f"item {items[e.index].id!r} has fewer than 2 tokens; nothing to "
                            f"score teacher-forced")
    keep_arg = _accepts_logits_to_keep(model)
    out: list[dict] = [{} for _ in items]
    batches = iter_batches(encoded, batch_size, pad_id(tok), lm.device)
    for b in _progress(batches, n_batches(len(encoded), batch_size), desc, progress):
        if on_batch is not None:
            on_batch(b)
        ids = b.input_ids
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        start = torch.where(b.lengths > b.prompt_lens, b.prompt_lens - 1, 0)[:, None]
        need = (pos >= start) & (pos <= b.lengths[:, None] - 2)            # [B, T]
        cols = need.any(0).nonzero().squeeze(1)                             # [K]
        if keep_arg:
            logits = model(**b.inputs, logits_to_keep=cols).logits          # [B, K, V]
        else:
            logits = model(**b.inputs).logits[:, cols]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if on_logits is not None:
            on_logits(b, cols, logits)
        sel, target = need[:, cols], ids[:, cols + 1]                       # [B, K]
        tok_nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
        correct = (logits.argmax(-1) == target) & sel
        n = sel.sum(1)
        nll = (tok_nll * sel).sum(1) / n
        acc = correct.sum(1) / n
        for r, idx in enumerate(b.index.tolist()):
            out[idx] = {"accuracy": float(acc[r]), "nll": float(nll[r]), "n_tokens": int(n[r]),
                        "truncated": encoded[idx].truncated,
                        "merged_boundary": encoded[idx].merged}
    return out


def _accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can return logits at selected positions only (saves memory)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations ``<<48/2=24>>``."""
    return re.sub(r"<<[^<>]*>>", "", text)


def fewshot_prefix(shots: list[Item]) -> str:
    """k-shot chain-of-thought prefix: each shot's prompt and worked answer, blank-line separated."""
    return "".join(f"{s.prompt}{strip_calculator(s.answer).rstrip()}\n\n" for s in shots)


def _kind(item: Item, family: str) -> str:
    if "final" in item.meta or family == "gsm8k":
        return "gsm8k"
    if "test_list" in item.meta or "entry_point" in item.meta:
        return "code"
    if "answers" in item.meta:
        return "qa"
    return "other"


def _shots_for(skill: Skill, shots, n_shots: int, data_dir, seed: int) -> list[Item]:
    if n_shots <= 0:
        return []
    if shots is None:
        if skill.family != "gsm8k":
            return []
        shots = load_skill("gsm8k", data_dir, part="probe")
    pool = as_skill(shots, part="probe")
    ids, prompts = {it.id for it in skill}, {it.prompt for it in skill}
    if any(s.id in ids or s.prompt in prompts for s in pool):
        raise DataError("few-shot examples overlap the evaluated items; take shots from the "
                        "probe part (load_skill(..., part='probe'))")
    return sample_skill(pool, n_shots, seed).items


def _score_generation(lm, skill: Skill, items: list[Item], metric: str, *, batch_size,
                      max_length, max_new_tokens, progress, shots, n_shots, data_dir, seed,
                      sandbox_timeout) -> list[dict]:
    from skilllens.eval import scoring
    from skilllens.sandbox.runner import check_item

    kinds = {_kind(it, skill.family) for it in items}
    if metric == "pass@1" and kinds != {"code"}:
        raise DataError(f"pass@1 needs code items with tests (HumanEval, MBPP); {skill.name!r} "
                        f"is not one: use token_accuracy, exact_match, f1 or substring")
    if metric in ("f1", "substring") and kinds != {"qa"}:
        raise DataError(f"{metric} needs question answering items with gold answers (XQuAD, "
                        f"MLQA, SQuAD); for {skill.name!r} use exact_match or token_accuracy")
    kind = kinds.pop() if len(kinds) == 1 else "other"
    prefix = fewshot_prefix(_shots_for(skill, shots, n_shots, data_dir, seed)) \
        if kind == "gsm8k" else ""
    mbpp = any("test_list" in it.meta for it in items)
    stops = {"gsm8k": GSM8K_STOPS, "code": MBPP_STOPS if mbpp else CODE_STOPS,
             "qa": QA_STOPS}.get(kind, ("\n\n",))
    prompts = [prefix + it.prompt for it in items]
    new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]
    length = max(max_length, 2048) if prefix else max_length
    gen = generate_batched(lm.model, lm.tokenizer, prompts, max_new_tokens=new_tokens,
                           stops=stops, batch_size=batch_size, max_length=length,
                           progress=progress, desc=f"generate {skill.name}")
    rows = []
    for it, text, c in zip(items, gen.texts, gen.truncated):
        row = {"prediction": text[:1000], "truncated": c}
        if metric == "pass@1":
            res = check_item(it, text, timeout=sandbox_timeout)
            row.update(score=float(res.passed), reason=res.reason)
        elif kind == "gsm8k":
            gold = it.meta.get("final", it.answer)
            row.update(score=float(scoring.number_match(text, gold)), gold=gold,
                       extracted=scoring.extract_final_number(text))
        else:
            golds = it.meta.get("answers") or [it.answer]
            lang = it.meta.get("lang") or "en"
            fn = {"f1": scoring.f1_score, "substring": scoring.substring_match}.get(
                metric, scoring.exact_match)
            row.update(score=float(fn(text, golds, lang)), gold=golds[0])
        rows.append(row)
    return rows


def evaluate(lm, skill, metric: str = "token_accuracy", *, batch_size: int = 8,
             max_length: int = 512, abstainer=None, max_new_tokens: int | None = None,
             progress: bool = True, shots=None, n_shots: int = 8, seed: int = 0,
             data_dir=None, sandbox_timeout: float = 10.0, on_batch=None,
             on_logits=None) -> SkillScore:
    """Score ``lm`` (spec or ``LoadedModel``) on ``skill`` (``Skill``, items, or a spec string:
    then its *eval* part). Generation metrics use ``max_new_tokens`` (default per item kind:
    GSM8K 256, code 384, QA 24), and for GSM8K ``n_shots`` examples (``shots``, default: the
    probe part of ``gsm8k`` in ``data_dir``; drawn with ``seed``).

    Abstained items (``abstainer``) count in every mean: score 0 for accuracy-type metrics and
    ``log(V)`` nats (uniform distribution) for ``nll``; ``max_length`` is clamped to the model's
    context and ``n_truncated`` counts items cut to it (generation: prompts cut to
    ``max_length - max_new_tokens``); ``n_merged_boundary`` counts items whose prompt and
    answer share a token (module docstring); compare two scores with :func:`relative` (``< 1``: worse).
    ``on_batch``, ``on_logits``: passed to :func:`teacher_forced` (teacher-forced metrics;
    batch indices are into the items not abstained)."""
    if metric not in METRICS:
        raise SkillLensError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if batch_size < 1:
        raise SkillLensError("batch_size must be at least 1")
    lm = _loaded(lm)
    skill = as_skill(skill, data_dir, part="eval")
    items = list(skill.items)
    abstained = _abstentions(abstainer, lm, items)
    answered = [it for it, a in zip(items, abstained) if not a]
    with torch.no_grad(), eval_mode(lm.model):  # no dropout; the caller's flags come back
        if not answered:
            rows = []
        elif metric in TEACHER_FORCED:
            rows = teacher_forced(lm, answered, batch_size=batch_size, max_length=max_length,
                                  progress=progress, desc=f"eval {skill.name}",
                                  on_batch=on_batch, on_logits=on_logits)
            for r in rows:
                r["score"] = r["accuracy"] if metric == "token_accuracy" else r["nll"]
        else:
            rows = _score_generation(lm, skill, answered, metric, batch_size=batch_size,
                                     max_length=max_length,
                                     max_new_tokens=max_new_tokens, progress=progress,
                                     shots=shots, n_shots=n_shots, data_dir=data_dir, seed=seed,
                                     sandbox_timeout=sandbox_timeout)
    penalty = abstain_nll(lm) if metric in TEACHER_FORCED else float("nan")
    it_rows = iter(rows)
    per_item = []
    for it, a in zip(items, abstained):
        row = abstained_row(metric, penalty) if a else next(it_rows)
        per_item.append({"id": it.id, "abstained": bool(a), **row})
    return summarize(skill.name, metric, per_item, penalty)


