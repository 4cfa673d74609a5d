"""Tokenise prompt/answer items and yield length-sorted, right-padded batches.

Padding is never counted: every batch carries ``attention_mask``, prompt lengths and lengths,
and :meth:`Batch.token_mask` selects ``all`` (non-padding), ``last`` (last prompt token) or
``answer`` tokens. Sorting by length keeps padding waste small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import DataError

TOKEN_MODES = ("all", "last", "answer")


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int
    index: int


def encode_items(items, tokenizer, max_length: int = 512) -> list[Encoded]:
    """Tokenise each item as prompt ids + answer ids (the answer without special tokens).

    Too-long items keep at most ``max_length // 2`` answer tokens and lose prompt tokens from
    the left, so the answer is always present.
    """
    if max_length < 2:
        raise DataError("max_length must be at least 2")
    items = list(items)
    prompts = tokenizer([it.prompt for it in items], add_special_tokens=True)["input_ids"]
    answers = [it.answer for it in items]
    with_answer = [i for i, a in enumerate(answers) if a]
    ans_ids = [[] for _ in items]
    if with_answer:
        enc = tokenizer([answers[i] for i in with_answer], add_special_tokens=False)["input_ids"]
        for i, ids in zip(with_answer, enc):
            ans_ids[i] = ids
    out = []
    for i, (p, a) in enumerate(zip(prompts, ans_ids)):
        if len(p) + len(a) > max_length:
            a = a[: max_length // 2] if len(a) > max_length // 2 else a
            p = p[len(p) - (max_length - len(a)):]
        if not p:
            raise DataError(f"item {items[i].id!r} has an empty prompt after tokenisation")
        out.append(Encoded(list(p) + list(a), len(p), i))
    return out


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
    """Yield batches of ``batch_size`` items, longest first when ``sort`` (deterministic)."""
    if batch_size < 1:
        raise DataError("batch_size must be at least 1")
    order = sorted(encoded, key=lambda e: (-len(e.ids), e.index)) if sort else list(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            att[r, : len(e.ids)] = 1
        yield Batch(ids.to(device), att.to(device),
                    torch.tensor([e.prompt_len for e in chunk], device=device),
                    torch.tensor([len(e.ids) for e in chunk], device=device),
                    torch.tensor([e.index for e in chunk], device=device))


def n_batches(n_items: int, batch_size: int) -> int:
    return (n_items + batch_size - 1) // batch_size
