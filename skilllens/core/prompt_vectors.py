"""Last-prompt-token vectors read from a pass over whole items (``collect(store_tokens="last")``).

A prompt-only forward pass (KSD's queries: :meth:`KeySpaceDetector.query_vectors`) and a pass
over ``prompt + answer`` compute the same activations at every prompt position, because
attention is causal and padding is on the right, provided the whole item's first ids are the
prompt's own ids. This module decides, per item, whether they are: the ids
:func:`~skilllens.core.batching.encode_items` gives the prompt alone (its truncation rule
included) must equal the first ``prompt_len`` ids of the joint encoding. Items where they differ
(a token straddling the prompt/answer join, a prompt cut differently, a tokenizer that splits
the prompt's end differently when text follows) get a prompt-only pass of their own, so the
stored vectors are always the prompt-only ones.
"""
from __future__ import annotations

import torch

from skilllens.core.batching import TOKEN_MODES, encode_items
from skilllens.data import Item
from skilllens.errors import DataError


def _check_store_tokens(tokens: str, store_tokens: str | None) -> str:
    """``store_tokens`` resolved (``None``: ``tokens``); raises DataError for a combination
    :func:`~skilllens.core.collect.collect` does not support."""
    store_tokens = tokens if store_tokens is None else store_tokens
    if store_tokens not in TOKEN_MODES:
        raise DataError(f"unknown store_tokens {store_tokens!r}; use one of {TOKEN_MODES}")
    if store_tokens != tokens and not (tokens == "all" and store_tokens == "last"):
        raise DataError(f"store_tokens={store_tokens!r} with tokens={tokens!r} is not supported;"
                        f" store the same tokens, or tokens='all' with store_tokens='last'")
    return store_tokens


def prompt_items(items) -> list[Item]:
    """The prompts alone (``Item(id, prompt)``): what a last-prompt-token query pass sees."""
    return [Item(it.id, it.prompt) for it in items]


def mismatched_prompts(encoded, items, tokenizer, max_length: int) -> list[int]:
    """Item indices (of ``encoded``, a joint encoding of ``items``) whose first ``prompt_len``
    ids are not the prompt's own encoding (same ``max_length``)."""
    alone = encode_items(prompt_items(items), tokenizer, max_length)
    return [e.index for e in encoded if e.ids[:e.prompt_len] != alone[e.index].ids]


def store_mask(batch, store_tokens: str, prompt_pass: list[int]) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose vectors are stored for this batch (items in
    ``prompt_pass`` store nothing here: their prompt-only pass does)."""
    mask = batch.token_mask(store_tokens)
    if prompt_pass:
        skip = torch.tensor(prompt_pass, device=batch.index.device)
        mask = mask & ~torch.isin(batch.index, skip)[:, None]
    return mask


def add_prompt_vectors(run, indices: list[int], items, buffers: dict, item_rows: list) -> None:
    """Append to ``buffers``/``item_rows`` the vectors of ``items[indices]`` not there yet (a
    resumed checkpoint may hold them), from ``run(items, keys)``: ``{key: [n, d]}`` in item
    order from a prompt-only pass (:func:`~skilllens.core.collect.last_prompt_vectors`)."""
    have = set(torch.cat(item_rows).tolist()) if item_rows else set()
    todo = [i for i in indices if i not in have]
    if not todo or not buffers:
        return
    keys = sorted(buffers)
    got = run([items[i] for i in todo], keys)
    for k in keys:
        buffers[k].append(got[k])
    item_rows.append(torch.tensor(todo))
