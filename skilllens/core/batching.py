"""Tokenise prompt/answer items and yield length-sorted, padded batches.

Tokenisation (:func:`encode_items`): ``prompt + answer`` is tokenised **once, jointly** (with
the tokenizer's special tokens, e.g. BOS), so the ids are exactly what the model sees for the
whole text; the answer span is then found from character offsets. A token that straddles the
prompt/answer boundary produces answer characters, so it belongs to the answer span (the prompt
length is the index of the first token that ends after the prompt's last character). Special
tokens the tokenizer appends after the text (EOS, SEP) are not part of an answer.

Truncation to ``max_length`` tokens: a prompt that fits (``prompt_len < max_length``) is never
cut; only the answer's tail is dropped. A prompt that does not fit keeps its leading special
tokens (BOS) and its **end**, and the answer keeps its **start** (at most ``max_length // 2``
tokens). Items without an answer keep their end. Every cut item is flagged ``truncated``.

Batching (:func:`plan_batches`, the one grouping used by collection, teacher-forced evaluation
and generation): items are sorted longest first and chunked, so rows of similar length share a
batch and padding stays small; results are always put back in the original order by index.
Padding is never counted: every batch carries ``attention_mask``, prompt lengths and lengths,
and :meth:`Batch.token_mask` selects ``all`` (non-padding), ``last`` (last prompt token) or
``answer`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from skilllens.errors import DataError

TOKEN_MODES = ("all", "last", "answer")


@dataclass
class Encoded:
    """One tokenised item: ``ids`` (prompt then answer), ``prompt_len``, the item ``index`` and
    whether ``max_length`` cut it."""

    ids: list[int]
    prompt_len: int
    index: int
    truncated: bool = False


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def _answer_start(prompt: str, text: str, ids: list[int], offsets, tokenizer,
                  specials: set[int]) -> int:
    """Index of the first answer token in the joint tokenisation ``ids`` of ``text``."""
    cut = len(prompt)
    if offsets is not None:
        for k, (tid, (s, e)) in enumerate(zip(ids, offsets)):
            if e > cut and not (tid in specials and s == e):
                return k
        return len(ids)
    # slow tokenizer (no offsets): the longest common prefix with the prompt's own tokenisation.
    # Equal ids at equal positions cover equal text, so these tokens are prompt-only; at worst a
    # prompt-only token just before the boundary is counted in the answer span.
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    k = 0
    while k < min(len(alone), len(ids)) and alone[k] == ids[k]:
        k += 1
    return k


def _truncate(ids: list[int], p: int, n_lead: int, max_length: int) -> tuple[list[int], int]:
    """Cut ``ids`` (prompt length ``p``, ``n_lead`` leading special tokens) to ``max_length``."""
    a = len(ids) - p
    if p < max_length:                       # the prompt fits: only the answer's tail goes
        return ids[:max_length], p
    a_keep = min(a, max_length // 2)
    p_keep = max_length - a_keep
    lead = ids[:n_lead] if n_lead < p_keep else []
    tail = p_keep - len(lead)
    prompt = lead + ids[p - tail:p]
    return prompt + ids[p:p + a_keep], len(prompt)


def _not_one_string(seq, what: str) -> None:
    """A bare string is never a sequence of one-character prompts (issue 21)."""
    if isinstance(seq, (str, bytes)):
        raise DataError(f"{what} must be a list, got one string {seq[:40]!r}; wrap it as [text]")


def encode_items(items, tokenizer, max_length: int = 512) -> list[Encoded]:
    """Tokenise each item's ``prompt + answer`` jointly (see the module docstring for the answer
    span and what truncation keeps). Returns one :class:`Encoded` per item, in item order."""
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
        ids = list(ids)
        n_lead = 0
        while n_lead < len(ids) and ids[n_lead] in specials:
            n_lead += 1
        if it.answer:
            p = _answer_start(it.prompt, text, ids, offs, tokenizer, specials)
            end = len(ids)
            while end > p and ids[end - 1] in specials:   # no EOS/SEP inside the answer span
                end -= 1
            ids = ids[:end]
        else:
            p = len(ids)
        truncated = len(ids) > max_length
        if truncated:
            ids, p = _truncate(ids, p, n_lead, max_length)
        if p <= 0:
            raise DataError(f"item {it.id!r} has an empty prompt after tokenisation; give it a "
                            f"prompt (the answer is scored given the prompt)")
        out.append(Encoded(ids, p, i, truncated))
    return out


def encode_prompts(tokenizer, prompts: Sequence[str],
                   budget: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt (with special tokens) for generation, cut to ``budget`` tokens
    keeping the leading special tokens (BOS) and the prompt's end; and whether each was cut."""
    _not_one_string(prompts, "prompts")
    specials = _special_ids(tokenizer)
    out, cut = [], []
    for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        cut.append(len(ids) > budget)
        if cut[-1]:
            lead = 0
            while lead < budget - 1 and ids[lead] in specials:
                lead += 1
            ids = ids[:lead] + ids[len(ids) - (budget - lead):]
        out.append(ids)
    return out, cut


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


def iter_batches(encoded: list[Encoded], batch_size: int, pad_id: int, device=None,
                 sort: bool = True) -> Iterator[Batch]:
    """Right-padded batches of ``batch_size`` items grouped by :func:`plan_batches` (longest
    first when ``sort``; deterministic). ``Batch.index`` maps rows back to items."""
    for chunk in plan_batches([len(e.ids) for e in encoded], batch_size, sort):
        rows = [encoded[j] for j in chunk]
        T = max(len(e.ids) for e in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for r, e in enumerate(rows):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            att[r, : len(e.ids)] = 1
        yield Batch(ids.to(device), att.to(device),
                    torch.tensor([e.prompt_len for e in rows], device=device),
                    torch.tensor([len(e.ids) for e in rows], device=device),
                    torch.tensor([e.index for e in rows], device=device))


def left_padded(seqs: Sequence[Sequence[int]], chunk: Sequence[int],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` ``[len(chunk), T]`` of ``seqs[i] for i in chunk``,
    padded on the left (for generation: every row's next token is at column ``T``)."""
    T = max(len(seqs[i]) for i in chunk)
    ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(chunk), T), dtype=torch.long)
    for r, i in enumerate(chunk):
        if len(seqs[i]):
            ids[r, T - len(seqs[i]):] = torch.tensor(list(seqs[i]))
            att[r, T - len(seqs[i]):] = 1
    return ids, att


def n_batches(n_items: int, batch_size: int) -> int:
    return (n_items + batch_size - 1) // batch_size
