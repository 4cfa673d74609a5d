"""The two data types every method consumes: :class:`Item` (prompt + answer) and :class:`Skill`.

>>> from skilllens.data import Skill, Item
>>> Skill("demo", [Item("a", "1+1=", "2")]).items[0].text
'1+1=2'
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Item:
    """One example: the model reads ``prompt`` and should continue with ``answer``."""

    id: str
    prompt: str
    answer: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass
class Skill:
    """A named list of items; ``group`` of an item keeps related items on one side of a split,
    ``part`` (``"probe"``/``"eval"``) pins an item to an upstream split. ``source`` says where
    the items came from (see the module docstring). ``part`` says which part of the source
    these items are (``"all"``, ``"probe"`` or ``"eval"``) and ``counts`` how many items the
    source and its parts hold (``{"all": 12, "probe": 9, "eval": 3}``; empty when unknown), so
    that every output can say which items it used (:meth:`describe`)."""

    name: str
    items: list[Item]
    source: str = ""
    family: str = "text"
    part: str = "all"
    counts: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def head(self, n: int | None) -> "Skill":
        return self if n is None else replace(self, items=self.items[: int(n)])

    def describe(self) -> str:
        """Which items of the source these are, e.g. ``"probe part: 9 of 12 items; eval: 3"``,
        ``"all 12 items"`` or ``"10 of 12 items"`` (a ``head``/sample of all)."""
        n, total = len(self), self.counts.get("all")
        if self.part == "all":
            return f"all {n} items" if total in (None, n) else f"{n} of {total} items"
        other = "eval" if self.part == "probe" else "probe"
        size = self.counts.get(self.part, n)
        text = f"{self.part} part: {n} of {total if total is not None else n} items"
        if n != size:
            text = f"{self.part} part: {n} sampled of its {size} (of {total} items)"
        return text + (f"; {other}: {self.counts[other]}" if other in self.counts else "")

    def digest(self) -> str:
        """sha256 over ids and texts (goes into artifact metadata)."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.id.encode())
            h.update(b"\0")
            h.update(it.text.encode())
            h.update(b"\1")
        return h.hexdigest()[:16]
