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
  gold answers (:mod:`skilllens.scoring`).

Batching: :func:`skilllens.batching.plan_batches` (longest first) for every path; teacher-forced
batches right-padded, generation left-padded; results in item order. Items over ``max_length``
are cut as :mod:`skilllens.batching` says (never a prompt that fits), counted in ``n_truncated``.

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
from dataclasses import asdict, dataclass, field

import torch

from .batching import (encode_items, encode_prompts, iter_batches, left_padded, n_batches,
                       plan_batches)
from .data import Item, Skill, as_skill, load_skill, sample_skill
from .errors import DataError, SkillLensError

METRICS = ("token_accuracy", "nll", "exact_match", "pass@1", "f1", "substring")
TEACHER_FORCED = ("token_accuracy", "nll")
LOWER_IS_BETTER = ("nll",)
#: stop strings and default new-token budgets per kind of item
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
MBPP_STOPS = ('\n"""', "\nassert ", "\nif __name__", "\nprint(", "\n```", "\n\n\n")
GSM8K_STOPS = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")
QA_STOPS = ("\n",)
MAX_NEW_TOKENS = {"gsm8k": 256, "code": 384, "qa": 24, "other": 64}


@dataclass
class SkillScore:
    """One skill under one model state. ``score`` is the headline of ``metric`` (for ``nll``: mean
    NLL, lower is better: ``higher_is_better`` says which); ``accuracy`` is token accuracy
    (teacher-forced) or the mean item score (generation); ``nll`` is NaN for generation metrics.
    All means are over all ``n_items``, abstained ones included (module docstring):
    ``abstain_nll`` is the NLL charged per abstained item, ``nll_answered`` the mean NLL of the
    answered items only. ``n_truncated`` items were cut to ``max_length``."""

    skill: str
    metric: str
    score: float
    accuracy: float
    nll: float
    n_items: int
    n_abstained: int
    per_item: list[dict] = field(default_factory=list)
    n_truncated: int = 0
    higher_is_better: bool = True
    abstain_nll: float = float("nan")
    nll_answered: float = float("nan")

    def to_dict(self, per_item: bool = True) -> dict:
        """JSON-ready dict (NaN -> None); ``per_item=False`` drops the item list."""
        d = asdict(self)
        if not per_item:
            d.pop("per_item")
        return _nan_to_none(d)


def _nan_to_none(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_nan_to_none(v) for v in o]
    return o


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` means a better model (False for ``nll``)."""
    if metric not in METRICS:
        raise SkillLensError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric not in LOWER_IS_BETTER


def relative(after: float, before: float, metric: str = "token_accuracy") -> float:
    """Relative performance, direction-aware so that ``< 1`` always means worse at the skill:
    ``after / before`` for higher-is-better metrics (0 when ``before == 0``), ``before / after``
    for ``nll`` (1 when both are 0, inf when only ``after`` is). NaN when either is NaN/None."""
    if after is None or before is None or math.isnan(after) or math.isnan(before):
        return float("nan")
    after, before = float(after), float(before)
    if higher_is_better(metric):
        return 0.0 if before == 0 else after / before
    if after == 0:
        return 1.0 if before == 0 else float("inf")
    return before / after


def abstain_nll(lm) -> float:
    """NLL (nats/token) charged to an abstained item: ``log(V)``, the uniform distribution over
    the model's output vocabulary ``V``."""
    emb = lm.model.get_output_embeddings()
    v = emb.weight.shape[0] if emb is not None else lm.model.config.vocab_size
    return math.log(v)


def _loaded(lm):
    from .models import LoadedModel, load_model
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
                   progress: bool = True, desc: str = "teacher-forced") -> list[dict]:
    """Per item ``{"accuracy", "nll", "n_tokens", "truncated"}`` of the gold answer given the
    prompt (length-sorted right-padded batches; rows returned in item order)."""
    model, tok = lm.model, lm.tokenizer
    encoded = encode_items(items, tok, max_length)
    for e in encoded:
        if len(e.ids) < 2:
            raise DataError(f"item {items[e.index].id!r} has fewer than 2 tokens; nothing to "
                            f"score teacher-forced")
    keep_arg = _accepts_logits_to_keep(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[dict] = [{} for _ in items]
    batches = iter_batches(encoded, batch_size, pad, lm.device)
    for b in _progress(batches, n_batches(len(encoded), batch_size), desc, progress):
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
        sel, target = need[:, cols], ids[:, cols + 1]                       # [B, K]
        tok_nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
        correct = (logits.argmax(-1) == target) & sel
        n = sel.sum(1)
        nll = (tok_nll * sel).sum(1) / n
        acc = correct.sum(1) / n
        for r, idx in enumerate(b.index.tolist()):
            out[idx] = {"accuracy": float(acc[r]), "nll": float(nll[r]), "n_tokens": int(n[r]),
                        "truncated": encoded[idx].truncated}
    return out


def _accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can return logits at selected positions only (saves memory)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class _StopOnStrings:
    """Stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stops):
        self.tok, self.t0, self.stops, self.done = tokenizer, prompt_len, tuple(stops), None

    def __call__(self, input_ids, scores=None, **kwargs):
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            for r in range(input_ids.shape[0]):
                if not self.done[r]:
                    text = self.tok.decode(input_ids[r, self.t0:], skip_special_tokens=True)
                    self.done[r] = any(s in text.lstrip() for s in self.stops)
        return self.done.clone()


def cut_at_stops(text: str, stops) -> str:
    """``text`` up to the first stop string found after its leading whitespace (a leading
    newline does not end an answer; indentation is kept)."""
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    cut = min([body.find(s) for s in stops if s in body] or [len(body)])
    return text[:lead + cut]


@torch.no_grad()
def generate_texts(lm, prompts: list[str], *, max_new_tokens: int = 64, stops=(),
                   batch_size: int = 8, max_length: int = 2048, progress: bool = True,
                   desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (batched by :func:`~skilllens.batching.plan_batches`:
    longest first, left-padded; returned in prompt order), cut at the first stop string. Prompts
    longer than ``max_length - max_new_tokens`` keep BOS and their end
    (:func:`~skilllens.batching.encode_prompts`)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    model, tok = lm.model, lm.tokenizer
    if max_new_tokens < 1:
        raise SkillLensError("max_new_tokens must be at least 1")
    enc, _ = encode_prompts(tok, prompts, max(1, max_length - max_new_tokens))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos, bos_token_id=tok.bos_token_id)
    texts = [""] * len(enc)
    chunks = plan_batches([len(e) for e in enc], batch_size)
    crit_cls = type("StopOnStrings", (_StopOnStrings, StoppingCriteria), {})
    for chunk in _progress(chunks, len(chunks), desc, progress):
        ids, att = left_padded(enc, chunk, pad)
        T = ids.shape[1]
        crit = crit_cls(tok, T, stops)
        gen = model.generate(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device),
                             generation_config=cfg, stopping_criteria=StoppingCriteriaList([crit]))
        for r, i in enumerate(chunk):
            texts[i] = cut_at_stops(tok.decode(gen[r, T:], skip_special_tokens=True), stops)
    return texts


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
    pool = as_skill(shots)
    ids, prompts = {it.id for it in skill}, {it.prompt for it in skill}
    if any(s.id in ids or s.prompt in prompts for s in pool):
        raise DataError("few-shot examples overlap the evaluated items; take shots from the "
                        "probe part (load_skill(..., part='probe'))")
    return sample_skill(pool, n_shots, seed).items


def _score_generation(lm, skill: Skill, items: list[Item], metric: str, *, batch_size,
                      max_length, max_new_tokens, progress, shots, n_shots, data_dir, seed,
                      sandbox_timeout) -> list[dict]:
    from . import scoring
    from .sandbox import check_item

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
    texts = generate_texts(lm, prompts, max_new_tokens=new_tokens, stops=stops,
                           batch_size=batch_size, progress=progress, desc=f"generate {skill.name}",
                           max_length=length)
    cut = encode_prompts(lm.tokenizer, prompts, max(1, length - new_tokens))[1]
    rows = []
    for it, text, c in zip(items, texts, cut):
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
             data_dir=None, sandbox_timeout: float = 10.0) -> SkillScore:
    """Score ``lm`` (spec or ``LoadedModel``) on ``skill`` (``Skill``, items, or a spec string:
    then its *eval* part). Generation metrics use ``max_new_tokens`` (default per item kind:
    GSM8K 256, code 384, QA 24), and for GSM8K ``n_shots`` examples (``shots``, default: the
    probe part of ``gsm8k`` in ``data_dir``; drawn with ``seed``).

    Abstained items (``abstainer``) count in every mean: score 0 for accuracy-type metrics and
    ``log(V)`` nats (uniform distribution) for ``nll``; ``n_truncated`` counts items cut to
    ``max_length``; compare two scores with :func:`relative` (``< 1``: worse)."""
    if metric not in METRICS:
        raise SkillLensError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if batch_size < 1:
        raise SkillLensError("batch_size must be at least 1")
    lm = _loaded(lm)
    skill = as_skill(skill, data_dir, part="eval")
    items = list(skill.items)
    abstained = _abstentions(abstainer, lm, items)
    answered = [it for it, a in zip(items, abstained) if not a]
    with torch.no_grad():
        if not answered:
            rows = []
        elif metric in TEACHER_FORCED:
            rows = teacher_forced(lm, answered, batch_size=batch_size, max_length=max_length,
                                  progress=progress, desc=f"eval {skill.name}")
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


def abstained_row(metric: str, penalty: float) -> dict:
    """Per-item row of an abstained item: score/accuracy 0, NLL ``penalty`` (module docstring)."""
    if metric in TEACHER_FORCED:
        return {"score": penalty if metric == "nll" else 0.0, "accuracy": 0.0, "nll": penalty,
                "n_tokens": 0, "truncated": False}
    return {"score": 0.0, "truncated": False}


def summarize(name: str, metric: str, per_item: list[dict], penalty: float) -> SkillScore:
    """The :class:`SkillScore` of per-item rows (``abstained``, ``score``, teacher-forced also
    ``accuracy``/``nll``); every mean is over all rows (evaluate and the audit share it)."""
    n = len(per_item)
    if n == 0:
        raise DataError(f"skill {name!r} has no items to score")
    answered = [r for r in per_item if not r["abstained"]]
    n_trunc = sum(bool(r.get("truncated")) for r in per_item)
    nll = nll_answered = float("nan")
    if metric in TEACHER_FORCED:
        accuracy = sum(r["accuracy"] for r in per_item) / n
        nll = sum(r["nll"] for r in per_item) / n
        if answered:
            nll_answered = sum(r["nll"] for r in answered) / len(answered)
        score = accuracy if metric == "token_accuracy" else nll
    else:
        score = accuracy = sum(r["score"] for r in per_item) / n
    return SkillScore(name, metric, score, accuracy, nll, n, n - len(answered), per_item,
                      n_truncated=n_trunc, higher_is_better=higher_is_better(metric),
                      abstain_nll=penalty, nll_answered=nll_answered)
