"""The one generation loop of skilllens: batched, left-padded, KV-cached greedy decoding.

:func:`greedy_generate` (model, tokenizer, prompts -> strings) serves evaluation, Key Space
Detection and the concept-vector experiments alike:

* prompts are tokenised once (:func:`~skilllens.core.batching.encode_prompts`: a prompt longer
  than ``max_length - max_new_tokens`` keeps BOS and its end) and grouped by
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

import torch

from skilllens.core.batching import encode_prompts, left_padded, plan_batches
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


def context_length(model, default: int = 4096) -> int:
    """The model's context length (``max_position_embeddings`` / ``n_positions``)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
               or default)


def _prefill_kwargs(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def _greedy_batch(model, tok, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  stops: tuple[str, ...], eos: set[int]) -> list[str]:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    rows = list(range(ids.shape[0]))  # live row -> batch index
    new: list[list[int]] = [[] for _ in rows]
    eos_t = torch.tensor(sorted(eos), device=dev) if eos else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, **_prefill_kwargs(model))
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)  # [live]
        done = torch.isin(nxt, eos_t).tolist() if eos_t is not None else [False] * len(rows)
        toks = nxt.tolist()
        keep = []
        for r, i in enumerate(rows):
            if done[r]:
                continue
            new[i].append(toks[r])
            if stops and cut_at_stops(text := tok.decode(new[i], skip_special_tokens=True),
                                      stops) != text:
                continue
            keep.append(r)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=dev)
            cache.batch_select_indices(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            rows = [rows[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
    return [cut_at_stops(tok.decode(n, skip_special_tokens=True), stops) for n in new]


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                    stops=(), batch_size: int = 8, max_length: int | None = None,
                    progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts``, one string each (cut before the first stop string,
    leading whitespace kept). ``max_length`` (default: the model's context) bounds prompt +
    new tokens; longer prompts keep BOS and their end."""
    from tqdm.auto import tqdm

    if not prompts:
        raise DataError("no prompts to generate from")
    if max_new_tokens < 1:
        raise DataError("max_new_tokens must be at least 1")
    ctx = context_length(model)
    limit = min(ctx, max_length) if max_length else ctx
    if limit - max_new_tokens < 1:
        raise DataError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                        f"{limit} positions; use fewer new tokens or a longer max_length")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(sorted(eos_ids(model, tokenizer))), 0)
    stops = tuple(s for s in stops if s)
    eos = eos_ids(model, tokenizer)
    enc, _ = encode_prompts(tokenizer, prompts, limit - max_new_tokens)
    texts = [""] * len(prompts)
    chunks = plan_batches([len(e) for e in enc], batch_size)
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        ids, att = left_padded(enc, chunk, pad)
        for i, t in zip(chunk, _greedy_batch(model, tokenizer, ids, att, max_new_tokens, stops,
                                             eos)):
            texts[i] = t
    return texts


def generate_texts(lm, prompts: list[str], *, max_new_tokens: int = 64, stops=(),
                   batch_size: int = 8, max_length: int = 2048, progress: bool = True,
                   desc: str = "generate") -> list[str]:
    """:func:`greedy_generate` on a loaded model (``lm.model``, ``lm.tokenizer``)."""
    return greedy_generate(lm.model, lm.tokenizer, prompts, max_new_tokens, stops, batch_size,
                           max_length, progress, desc)
