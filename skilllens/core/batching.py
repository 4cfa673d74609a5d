"""Tokenise prompt/answer items, cut them to the model's context, and pad them into batches.

This module holds the **one padding rule**, the **one truncation rule** and the **one context
limit** that every path building a prompt uses (collection, teacher-forced evaluation, greedy
generation, the concept verifier and KSD's last-token queries):

* Padding (:func:`pad_id`, :func:`right_padded`, :func:`left_padded`): the tokenizer's pad id,
  else its EOS id, else 0. Padding positions are always masked (``attention_mask`` 0, never
  counted), so the id never changes a result. skilllens pads its own batches explicitly and
  never reads or changes the caller's ``tokenizer.padding_side`` / ``pad_token``.
* Context (:func:`context_limit`, :func:`clamp_length`): the model config's
  ``max_position_embeddings`` / ``n_positions`` / ``n_ctx``, else the tokenizer's
  ``model_max_length`` when it is a real number; every ``max_length`` is clamped to it.
* Truncation (:func:`truncate_prompt`): a prompt longer than its budget keeps its leading
  special tokens (BOS) and its **end**. Generation gives the prompt ``limit - max_new_tokens``
  tokens (:func:`prompt_budget`); teacher forcing of a fixed answer (:func:`encode_items`)
  never cuts a prompt that fits (only the answer's tail goes), and otherwise gives the answer's
  **start** at most ``max_length // 2`` tokens and the prompt the rest. Every cut is flagged.

Tokenisation (:func:`encode_items`): ``prompt + answer`` is tokenised **once, jointly** (with
the tokenizer's special tokens, e.g. BOS), so the ids are exactly what the model sees for the
whole text; the answer span is then found from character offsets. A token that straddles the
prompt/answer boundary produces answer characters, so it belongs to the answer span (the prompt
length is the index of the first token that ends after the prompt's last character) and the
item is flagged ``merged``. When that token swallows the whole prompt (``Item("a", "Ans",
"wer")`` is the single token ``Answer`` for SmolLM2), scoring needs a split: the two sides are
tokenised apart for that item only; with ``split=False`` (statistics over all tokens) the item
is plain text. Special tokens the tokenizer appends after the text (EOS, SEP) are not part of an
answer.

Batching (:func:`plan_batches`, the one grouping used by collection, teacher-forced evaluation
and generation): items are sorted longest first and chunked, so rows of similar length share a
batch and padding stays small; results are always put back in the original order by index.
Every batch carries ``attention_mask``, prompt lengths and lengths, and
:meth:`Batch.token_mask` selects ``all`` (non-padding), ``last`` (last prompt token) or
``answer`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from skilllens.errors import DataError

TOKEN_MODES = ("all", "last", "answer")

#: a tokenizer ``model_max_length`` at or above this is transformers' "no limit" placeholder
_NO_LIMIT = 10 ** 7
#: architectures whose learned positions start after the padding index (usable = n - pad - 1)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl")


def pad_id(tokenizer) -> int:
    """The one padding rule: the tokenizer's pad id, else its EOS id, else 0. Padding positions
    are masked everywhere, so the choice never changes a result. Never mutates ``tokenizer``."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return 0


def context_limit(model=None, tokenizer=None) -> int | None:
    """The most positions ``model`` can take: its config's ``max_position_embeddings`` /
    ``n_positions`` / ``n_ctx`` (RoBERTa-style learned positions minus their padding offset),
    else ``tokenizer.model_max_length`` when it is a real limit; ``None`` when nothing says."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS:
                v -= (getattr(cfg, "pad_token_id", None) or 1) + 1
            return v
    m = getattr(tokenizer, "model_max_length", None)
    if isinstance(m, int) and 0 < m < _NO_LIMIT:
        return m
    return None


def clamp_length(max_length: int | None, model=None, tokenizer=None) -> int | None:
    """``max_length`` clamped to :func:`context_limit` (the limit alone when ``max_length`` is
    ``None``)."""
    ctx = context_limit(model, tokenizer)
    if max_length is None:
        return ctx
    return min(int(max_length), ctx) if ctx else int(max_length)


def prompt_budget(model, tokenizer, max_new_tokens: int, max_length: int | None = None,
                  default: int = 4096) -> int:
    """Tokens a generation prompt may keep: ``clamp_length(max_length) - max_new_tokens``
    (``default`` positions when neither the model nor ``max_length`` gives a limit).

    Raises ``DataError`` when no prompt token would fit."""
    limit = clamp_length(max_length, model, tokenizer) or default
    if limit - max_new_tokens < 1:
        raise DataError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                        f"{limit} positions; use fewer new tokens or a longer max_length")
    return limit - max_new_tokens


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def leading_specials(ids: Sequence[int], specials: set[int]) -> int:
    """Number of special tokens (BOS, CLS) at the start of ``ids``."""
    n = 0
    while n < len(ids) and ids[n] in specials:
        n += 1
    return n


def truncate_prompt(ids: Sequence[int], budget: int, n_lead: int = 0) -> list[int]:
    """The one truncation rule: ``ids`` if they fit in ``budget`` tokens, else their first
    ``n_lead`` special tokens (BOS; at most ``budget - 1``) and their end."""
    if budget < 1:
        raise DataError("a prompt needs a budget of at least 1 token")
    if len(ids) <= budget:
        return list(ids)
    lead = min(n_lead, budget - 1)
    return list(ids[:lead]) + list(ids[len(ids) - (budget - lead):])


def fit_pair(ids: list[int], p: int, n_lead: int, max_length: int) -> tuple[list[int], int]:
    """Cut a teacher-forced sequence (prompt ``ids[:p]`` then answer) to ``max_length``: a
    prompt that fits keeps everything and the answer loses its tail; otherwise the answer keeps
    its start (at most ``max_length // 2``) and the prompt is cut by :func:`truncate_prompt`.
    Returns the ids and the new prompt length."""
    if len(ids) <= max_length:
        return ids, p
    if p < max_length:
        return ids[:max_length], p
    a_keep = min(len(ids) - p, max_length // 2)
    prompt = truncate_prompt(ids[:p], max_length - a_keep, n_lead)
    return prompt + ids[p:p + a_keep], len(prompt)


@dataclass
class Encoded:
    """One tokenised item: ``ids`` (prompt then answer), ``prompt_len``, the item ``index``,
    whether ``max_length`` cut it, and whether a token spans the prompt/answer join
    (``merged``, see the module docstring)."""

    ids: list[int]
    prompt_len: int
    index: int
    truncated: bool = False
    merged: bool = False


def _answer_start(prompt: str, text: str, ids: list[int], offsets, tokenizer,
                  specials: set[int]) -> tuple[int, bool]:
    """Index of the first answer token in the joint tokenisation ``ids`` of ``text`` and
    whether that token also carries prompt characters."""
    cut = len(prompt)
    if offsets is not None:
        for k, (tid, (s, e)) in enumerate(zip(ids, offsets)):
            if e > cut and not (tid in specials and s == e):
                return k, s < cut
        return len(ids), False
    # slow tokenizer (no offsets): the longest common prefix with the prompt's own tokenisation.
    # Equal ids at equal positions cover equal text, so these tokens are prompt-only; at worst a
    # prompt-only token just before the boundary is counted in the answer span.
    alone = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    while alone and alone[-1] in specials and len(alone) > leading_specials(alone, specials):
        alone.pop()
    k = 0
    while k < min(len(alone), len(ids)) and alone[k] == ids[k]:
        k += 1
    return k, k < len(alone)


def _apart(it, tokenizer, specials: set[int]) -> tuple[list[int], int]:
    """Prompt (with special tokens) and answer tokenised separately: ``(ids, prompt_len)``."""
    p_ids = list(tokenizer(it.prompt, add_special_tokens=True)["input_ids"])
    while p_ids and p_ids[-1] in specials and len(p_ids) > leading_specials(p_ids, specials):
        p_ids.pop()
    if not p_ids:
        raise DataError(f"item {it.id!r}: its prompt {it.prompt[:40]!r} gives no tokens with "
                        f"this tokenizer; give it a prompt with text")
    return p_ids + list(tokenizer(it.answer, add_special_tokens=False)["input_ids"]), len(p_ids)


def _not_one_string(seq, what: str) -> None:
    """A bare string is never a sequence of one-character prompts (issue 21)."""
    if isinstance(seq, (str, bytes)):
        raise DataError(f"{what} must be a list, got one string {seq[:40]!r}; wrap it as [text]")


def encode_items(items, tokenizer, max_length: int = 512, *, split: bool = True) -> list[Encoded]:
    """Tokenise each item's ``prompt + answer`` jointly (see the module docstring for the answer
    span, merged boundary tokens and what truncation keeps). ``split=False``: the prompt/answer
    split is not needed (statistics over all tokens), so an item whose boundary cannot be placed
    is plain text. Returns one :class:`Encoded` per item, in item order.

    Raises ``DataError`` for ``max_length < 2`` or an answer item with an empty prompt."""
    if max_length < 2:
        raise DataError("max_length must be at least 2")
    _not_one_string(items, "items")
    items = list(items)
    if not items:
        return []
    specials = _special_ids(tokenizer)
    texts = [it.prompt + (it.answer or "") for it in items]
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=fast)
    all_ids = enc["input_ids"]
    all_offsets = enc["offset_mapping"] if fast else [None] * len(items)
    out = []
    for i, (it, text, ids, offs) in enumerate(zip(items, texts, all_ids, all_offsets)):
        ids, merged = list(ids), False
        if it.answer:
            p, merged = _answer_start(it.prompt, text, ids, offs, tokenizer, specials)
            end = len(ids)
            while end > p and ids[end - 1] in specials:   # no EOS/SEP inside the answer span
                end -= 1
            ids = ids[:end]
            if p <= 0 and not split:                      # plain text: no split needed
                p = len(ids)
            elif p <= 0 and it.prompt:                    # one token swallowed the prompt
                ids, p = _apart(it, tokenizer, specials)
                merged = True
        else:
            p = len(ids)
        if p <= 0:
            raise DataError(f"item {it.id!r} has an empty prompt; give it a prompt (the answer "
                            f"is scored given the prompt)")
        truncated = len(ids) > max_length
        ids, p = fit_pair(ids, p, leading_specials(ids, specials), max_length)
        out.append(Encoded(ids, p, i, truncated, merged))
    return out


def encode_prompts(tokenizer, prompts: Sequence[str],
                   budget: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt (with special tokens) for generation, cut to ``budget`` tokens by
    :func:`truncate_prompt` (BOS and the prompt's end); and whether each was cut."""
    _not_one_string(prompts, "prompts")
    specials = _special_ids(tokenizer)
    out, cut = [], []
    for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        cut.append(len(ids) > budget)
        out.append(truncate_prompt(ids, budget, leading_specials(ids, specials)))
    return out, cut


def generation_prompts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       max_length: int | None = None
                       ) -> tuple[list[list[int]], list[bool], int]:
    """The prompt ids greedy generation feeds the model (and the concept verifier scores):
    :func:`encode_prompts` with the :func:`prompt_budget` of ``model``. Returns the ids, whether
    each was cut, and the budget. Every path that generates, or checks a generation, calls this
    one function."""
    budget = prompt_budget(model, tokenizer, max_new_tokens, max_length)
    return (*encode_prompts(tokenizer, prompts, budget), budget)


def plan_batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Chunks of item indices, longest first (ties by index) when ``sort``: the grouping every
    batched path uses, so padding waste stays small (see :func:`padding_stats`)."""
    if batch_size < 1:
        raise DataError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort \
        else list(range(len(lengths)))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def padding_stats(lengths: Sequence[int], batch_size: int, sort: bool = True) -> dict:
    """Real tokens vs computed positions (``rows x longest row`` per batch) of
    :func:`plan_batches`: ``{"real", "computed", "padded", "padding_fraction"}``."""
    real = int(sum(lengths))
    computed = sum(len(c) * max(lengths[i] for i in c)
                   for c in plan_batches(lengths, batch_size, sort))
    return {"real": real, "computed": int(computed), "padded": int(computed - real),
            "padding_fraction": (computed - real) / computed if computed else 0.0}


@dataclass
class Batch:
    """A right-padded batch: ``input_ids``/``attention_mask`` ``[B, T]``; per-row ``prompt_lens``,
    ``lengths`` and ``index`` (the item index in the original list)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor

    @property
    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_computed(self) -> int:
        """Positions the model computes for this batch (real + padding), ``B * T``."""
        return int(self.input_ids.numel())

    def token_mask(self, tokens: str = "all") -> torch.Tensor:
        """``[B, T]`` bool: which positions to count."""
        if tokens not in TOKEN_MODES:
            raise DataError(f"unknown token selection {tokens!r}; use one of {TOKEN_MODES}")
        T = self.input_ids.shape[1]
        pos = torch.arange(T, device=self.input_ids.device)[None]
        if tokens == "all":
            return self.attention_mask.bool()
        if tokens == "last":
            return pos == (self.prompt_lens[:, None] - 1)
        return (pos >= self.prompt_lens[:, None]) & (pos < self.lengths[:, None])


def _padded(seqs, chunk, pad, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = max((len(seqs[i]) for i in chunk), default=0)
    ids = torch.full((len(chunk), T), 0 if pad is None else int(pad), dtype=torch.long)
    att = torch.zeros((len(chunk), T), dtype=torch.long)
    for r, i in enumerate(chunk):
        n = len(seqs[i])
        if n:
            cols = slice(T - n, T) if left else slice(0, n)
            ids[r, cols] = torch.tensor(list(seqs[i]), dtype=torch.long)
            att[r, cols] = 1
    return ids, att


def right_padded(seqs: Sequence[Sequence[int]], chunk: Sequence[int],
                 pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` ``[len(chunk), T]`` of ``seqs[i] for i in chunk``,
    padded on the right with ``pad_id`` (:func:`pad_id` of the tokenizer; masked)."""
    return _padded(seqs, chunk, pad_id, left=False)


def left_padded(seqs: Sequence[Sequence[int]], chunk: Sequence[int],
                pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` ``[len(chunk), T]`` of ``seqs[i] for i in chunk``,
    padded on the left (for generation: every row's next token is at column ``T``)."""
    return _padded(seqs, chunk, pad_id, left=True)


def iter_batches(encoded: list[Encoded], batch_size: int, pad_id: int | None, device=None,
                 sort: bool = True) -> Iterator[Batch]:
    """Right-padded batches of ``batch_size`` items grouped by :func:`plan_batches` (longest
    first when ``sort``; deterministic). ``pad_id``: the tokenizer's :func:`pad_id` (``None``
    pads with 0; padding is masked). ``Batch.index`` maps rows back to items."""
    seqs = [e.ids for e in encoded]
    for chunk in plan_batches([len(s) for s in seqs], batch_size, sort):
        ids, att = right_padded(seqs, chunk, pad_id)
        rows = [encoded[j] for j in chunk]
        yield Batch(ids.to(device), att.to(device),
                    torch.tensor([e.prompt_len for e in rows], device=device),
                    torch.tensor([len(e.ids) for e in rows], device=device),
                    torch.tensor([e.index for e in rows], device=device))


def n_batches(n_items: int, batch_size: int) -> int:
    return (n_items + batch_size - 1) // batch_size
