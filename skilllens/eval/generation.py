"""The one generation loop of skilllens: batched, left-padded, KV-cached greedy decoding.

:func:`greedy_generate` (model, tokenizer, prompts -> strings) serves evaluation, Key Space
Detection and the concept-vector experiments alike:

* prompts are tokenised once by :func:`~skilllens.core.batching.generation_prompts` (the one
  truncation rule: a prompt longer than ``min(max_length, context) - max_new_tokens`` keeps BOS
  and its end; :attr:`Generation.truncated` says which were cut), padded on the left with the
  tokenizer's :func:`~skilllens.core.batching.pad_id` and grouped by
  :func:`~skilllens.core.batching.plan_batches` (longest first), results in prompt order;
* one prefill per batch (logits of the last position only where the model allows it), then one
  token per step through a KV cache;
* a row stops at an EOS token or once its new text holds a ``stop`` string after its leading
  whitespace (:func:`cut_at_stops`); finished rows leave the batch (their cache rows are
  dropped) and a batch ends when every row has finished or after ``max_new_tokens`` tokens.

Greedy decoding: the result equals ``model.generate(do_sample=False)`` cut at the stop strings
(a test checks this on a random model).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from skilllens.core.loaded_model import check_in_memory, eval_mode
from skilllens.core.batching import (context_limit, generation_prompts, left_padded, pad_id,
                                     plan_batches)
from skilllens.errors import DataError


def cut_at_stops(text: str, stops) -> str:
    """``text`` up to the first stop string found after its leading whitespace (a leading
    newline does not end an answer; indentation is kept)."""
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    cut = min([body.find(s) for s in stops if s and s in body] or [len(body)])
    return text[:lead + cut]


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id the model's generation config, config or tokenizer names."""
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None),
                tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
    return ids


def context_length(model, default: int = 4096, tokenizer=None) -> int:
    """The model's context length (:func:`skilllens.core.batching.context_limit`), ``default``
    when neither the config nor the tokenizer gives one."""
    return context_limit(model, tokenizer) or default


def _prefill_kwargs(model) -> dict:
    """Logits of the last position only on the prefill, where the model allows it (the prompt's
    other positions would cost one vocabulary projection each)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _cache_kwarg(model) -> str:
    """The name ``model.forward`` takes the KV cache under: ``cache`` (transformers >= 5.2x,
    where ``past_key_values`` is deprecated) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else \
        "past_key_values"


@torch.no_grad()
def _greedy_batch(model, tok, seqs: list[list[int]], rows_global: list[int], pad: int,
                  max_new_tokens: int, stops: tuple[str, ...], eos: set[int],
                  prefixes: list[list[int]], row_edit=None) -> list[list[int]]:
    """Generated ids of each ``seqs[i] + prefixes[i]`` (left-padded into one batch; the prefix
    counts towards ``max_new_tokens`` and the stop rule), an ending EOS kept last."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    full = [s + p for s, p in zip(seqs, prefixes)]
    ids, mask = left_padded(full, range(len(full)), pad)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    rows = list(range(len(seqs)))  # live row -> batch index
    new: list[list[int]] = [list(p) for p in prefixes]
    eos_t = torch.tensor(sorted(eos), device=dev) if eos else None
    if row_edit is not None:
        row_edit.set_rows([rows_global[i] for i in rows])
    kv = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kv: cache},
                use_cache=True, **_prefill_kwargs(model))
    while True:
        nxt = out.logits[:, -1].argmax(-1)  # [live]
        done = torch.isin(nxt, eos_t).tolist() if eos_t is not None else [False] * len(rows)
        keep = []
        for r, (i, t) in enumerate(zip(rows, nxt.tolist())):
            new[i].append(t)
            if done[r] or len(new[i]) >= max_new_tokens:
                continue
            if stops and cut_at_stops(text := tok.decode(new[i], skip_special_tokens=True),
                                      stops) != text:
                continue
            keep.append(r)
        if not keep:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=dev)
            cache.batch_select_indices(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            rows = [rows[r] for r in keep]
            if row_edit is not None:
                row_edit.set_rows([rows_global[i] for i in rows])
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    **{kv: cache}, use_cache=True)
    return new


def ids_to_text(tok, ids: list[int], eos: set[int], stops=()) -> str:
    """The text of generated ``ids``: an ending EOS dropped, cut before the first stop string."""
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return cut_at_stops(tok.decode(ids, skip_special_tokens=True), stops)


@dataclass
class Generation:
    """What :func:`generate_batched` returns, per prompt: ``texts``, generated ``ids`` (prefix
    included, an ending EOS kept) and whether the prompt was ``truncated`` (to ``budget``)."""

    texts: list[str]
    ids: list[list[int]]
    truncated: list[bool]
    budget: int

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)


def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                     stops=(), batch_size: int = 8, max_length: int | None = None,
                     progress: bool = False, desc: str = "generate", *,
                     prefixes: list[list[int]] | None = None, row_edit=None) -> Generation:
    """:func:`greedy_generate` returning a :class:`Generation` (texts, ids and which prompts
    were cut: the count comes from the function that cuts)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise DataError("no prompts to generate from")
    if max_new_tokens < 1:
        raise DataError("max_new_tokens must be at least 1")
    check_in_memory(model)  # offloaded (meta) weights: one clear error before any work
    enc, cut, budget = generation_prompts(model, tokenizer, prompts, max_new_tokens, max_length)
    prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in prompts]
    if len(prefixes) != len(prompts) or any(len(p) >= max_new_tokens for p in prefixes):
        raise DataError("give one prefix per prompt, each shorter than max_new_tokens")
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    stops = tuple(s for s in stops if s)
    out: list[list[int]] = [[] for _ in prompts]
    chunks = plan_batches([len(e) + len(p) for e, p in zip(enc, prefixes)], batch_size)
    with eval_mode(model):  # no dropout; the caller's training flags come back afterwards
        for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
            got = _greedy_batch(model, tokenizer, [enc[i] for i in chunk], chunk, pad,
                                max_new_tokens, stops, eos, [prefixes[i] for i in chunk],
                                row_edit)
            for i, g in zip(chunk, got):
                out[i] = g
    texts = [ids_to_text(tokenizer, g, eos, stops) for g in out]
    return Generation(texts, out, cut, budget)


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                    stops=(), batch_size: int = 8, max_length: int | None = None,
                    progress: bool = False, desc: str = "generate", *,
                    prefixes: list[list[int]] | None = None, row_edit=None,
                    return_ids: bool = False):
    """Greedy continuations of ``prompts``, one string each (cut before the first stop string,
    leading whitespace kept). ``max_length`` (default and upper bound: the model's context)
    bounds prompt + new tokens; longer prompts keep BOS and their end
    (:func:`~skilllens.core.batching.generation_prompts`).

    ``prefixes[i]``: token ids already generated for prompt ``i`` (e.g. the part of an earlier
    answer an edited model is known to reproduce); generation continues after them and they
    count towards ``max_new_tokens`` and the stop rule. ``row_edit``: an object whose
    ``set_rows(prompt_indices)`` is called before every forward whose live rows changed, so
    each row can carry its own intervention (``concepts.fastscore.RowMasks``).
    ``return_ids``: return ``(texts, ids)``, ``ids[i]`` the generated ids (prefix included,
    an ending EOS kept). Raises ``DataError`` for no prompts or no room for a prompt."""
    g = generate_batched(model, tokenizer, prompts, max_new_tokens, stops, batch_size,
                         max_length, progress, desc, prefixes=prefixes, row_edit=row_edit)
    return (g.texts, g.ids) if return_ids else g.texts


def generate_texts(lm, prompts: list[str], *, max_new_tokens: int = 64, stops=(),
                   batch_size: int = 8, max_length: int = 2048, progress: bool = True,
                   desc: str = "generate") -> list[str]:
    """:func:`greedy_generate` on a loaded model (``lm.model``, ``lm.tokenizer``)."""
    return greedy_generate(lm.model, lm.tokenizer, prompts, max_new_tokens, stops, batch_size,
                           max_length, progress, desc)
