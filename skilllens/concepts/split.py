"""Seeded selection / held-out split of a concept's questions (and unrelated questions).

Vectors are *chosen* on the selection part; the headline BLEU / ROUGE-L are measured on the
held-out part, which the choice never sees. The split depends only on ``seed``, the concept's
name, the set's name and the number of questions, so it is reproducible and recorded in
``results.json`` (indices into the concept's question lists).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from skilllens.io import JsonRecord
from skilllens.errors import DataError


@dataclass
class Split(JsonRecord):
    """Indices of the selection and held-out questions of one prompt set."""

    selection: list[int]
    held_out: list[int]


def split_indices(n: int, held_out: float = 0.5, seed: int = 0, key: str = "") -> Split:
    """Shuffle ``range(n)`` with ``Random(f"{seed}:{key}")`` and hold out ``round(held_out*n)``
    (at least 1 each side); both lists are returned sorted."""
    if not 0.0 < held_out < 1.0:
        raise DataError(f"held_out must be in (0, 1) (got {held_out}); e.g. --held-out 0.5")
    if n < 2:
        raise DataError(f"{key or 'a prompt set'} has {n} question(s): a selection / held-out "
                        f"split needs at least 2; add questions")
    idx = list(range(n))
    random.Random(f"{seed}:{key}").shuffle(idx)
    k = min(n - 1, max(1, round(held_out * n)))
    return Split(sorted(idx[k:]), sorted(idx[:k]))
