"""Shared pieces of the article-based unlearning methods: chunking and per-sequence losses."""
from __future__ import annotations

import torch

from skilllens.errors import DataError


def article_chunks(tokenizer, text: str, seq_len: int = 128, max_chunks: int | None = 8) -> torch.Tensor:
    """The article's tokens cut into ``[n_chunks, seq_len]`` consecutive windows (in order)."""
    if seq_len < 2:
        raise DataError("seq_len must be at least 2")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        if len(ids) < 2:
            raise DataError("the article is too short to train on; give a longer 'text'")
        return torch.tensor([ids])
    chunks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return chunks[:max_chunks] if max_chunks else chunks


def sequence_logprob(model, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities per sequence ``[B]`` (with grad if enabled)."""
    logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp.sum(-1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation: ``-(2/beta) mean log sigmoid(-beta (logp - ref))``."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logp - ref_logp)).mean()


def ga_loss(logp: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Gradient ascent on the language-modelling loss: minimise the mean token log-probability."""
    return logp.sum() / n_tokens
