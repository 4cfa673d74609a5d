"""``TopK``: the ``k`` largest activations of every neuron with where they occurred (item index
and token position), in one streaming pass and bounded memory (``3 * k * d`` numbers).

Exactly mergeable: the top ``k`` of a union is the top ``k`` of the two top-``k`` lists, so
batches, shards and ranks combine in any order (ties broken by the lower item index, then the
lower position, so the result does not depend on the order of the updates).

>>> import torch
>>> from skilllens.stats.topk import TopK
>>> t = TopK(d=2, k=2)
>>> _ = t.update(torch.tensor([[[1., 5.], [3., 0.]]]), items=torch.tensor([7]))
>>> t.values.tolist(), t.items.tolist(), t.positions.tolist()
([[3.0, 5.0], [1.0, 0.0]], [[7, 7], [7, 7]], [[1, 0], [0, 1]])
"""
from __future__ import annotations

import torch

from skilllens.errors import SkillLensError

_NO_ITEM = -1


class TopK:
    """Per neuron, the ``k`` largest values seen (``values [k, d]`` float32, descending; empty
    slots hold ``-inf`` and item ``-1``), their ``items [k, d]`` and ``positions [k, d]``
    (int64). ``largest=False`` keeps the ``k`` smallest instead (stored negated internally)."""

    def __init__(self, d: int, k: int = 16, largest: bool = True, device=None):
        if int(k) < 1 or int(d) < 1:
            raise SkillLensError(f"TopK needs k >= 1 and d >= 1, got k={k}, d={d}")
        self.d, self.k, self.largest = int(d), int(k), bool(largest)
        self._v = torch.full((self.k, self.d), -torch.inf, device=device)
        self.items = torch.full((self.k, self.d), _NO_ITEM, dtype=torch.long, device=device)
        self.positions = torch.full((self.k, self.d), _NO_ITEM, dtype=torch.long, device=device)

    @property
    def values(self) -> torch.Tensor:
        return self._v if self.largest else -self._v

    @property
    def filled(self) -> torch.Tensor:
        """``[k, d]`` bool: which slots hold a value."""
        return self.items >= 0

    def _combine(self, v: torch.Tensor, it: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep the top ``k`` per column of ``cat(self, candidates)`` (``[n, d]`` each)."""
        v = torch.cat([self._v, v])
        it = torch.cat([self.items, it])
        pos = torch.cat([self.positions, pos])
        # order: value desc, then item asc, then position asc (a deterministic tie break)
        key_tie = (it.clamp(min=0) * (int(pos.max()) + 2) + pos.clamp(min=0)).double()
        order = torch.argsort(key_tie, dim=0, stable=True)           # ties: lower item first
        v, it, pos = v.gather(0, order), it.gather(0, order), pos.gather(0, order)
        idx = torch.argsort(v, dim=0, descending=True, stable=True)[: self.k]
        self._v, self.items, self.positions = v.gather(0, idx), it.gather(0, idx), \
            pos.gather(0, idx)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None,
               items: torch.Tensor | None = None) -> "TopK":
        """Add a block ``x [B, T, d]`` (rows where ``mask [B, T]`` is True); ``items [B]`` is
        the item index of each row (default ``0..B-1``), positions are ``0..T-1``."""
        if x.ndim != 3 or x.shape[-1] != self.d:
            raise SkillLensError(f"TopK.update takes [batch, tokens, {self.d}] activations, got "
                                 f"{tuple(x.shape)}")
        B, T, _ = x.shape
        dev = self._v.device
        x = x.detach().to(dev, torch.float32)
        items = torch.arange(B) if items is None else items
        it = items.to(dev, torch.long)[:, None].expand(B, T)
        pos = torch.arange(T, device=dev)[None].expand(B, T)
        if mask is not None:
            m = mask.to(dev).bool()
            x, it, pos = x[m], it[m], pos[m]
        else:
            x, it, pos = x.reshape(-1, self.d), it.reshape(-1), pos.reshape(-1)
        x = torch.where(torch.isfinite(x), x, -torch.inf if self.largest else torch.inf)
        v = x if self.largest else -x
        if v.shape[0] > self.k:  # pre-select per column: the block's own top k
            top = torch.topk(v, self.k, dim=0)
            v, sel = top.values, top.indices
            it, pos = it[sel], pos[sel]
        else:
            it, pos = it[:, None].expand(-1, self.d), pos[:, None].expand(-1, self.d)
        keep = torch.isfinite(v)
        it = torch.where(keep, it, _NO_ITEM)
        self._combine(v, it, torch.where(keep, pos, _NO_ITEM))
        return self

    def merge(self, other: "TopK") -> "TopK":
        """Exact merge with another ``TopK`` of the same ``d``, ``k`` and direction."""
        if (other.d, other.k, other.largest) != (self.d, self.k, self.largest):
            raise SkillLensError("cannot merge TopK statistics of different d, k or direction")
        self._combine(other._v.to(self._v.device), other.items.to(self._v.device),
                      other.positions.to(self._v.device))
        return self

    def neuron(self, j: int) -> list[tuple[float, int, int]]:
        """``[(value, item, position)]`` of neuron ``j``, best first (filled slots only)."""
        f = self.filled[:, j]
        return [(float(v), int(i), int(p)) for v, i, p in
                zip(self.values[f, j], self.items[f, j], self.positions[f, j])]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.cpu(), "items": self.items.cpu(),
                "positions": self.positions.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "TopK":
        v = state["values"].float()
        self._v = v if self.largest else -v
        self.items, self.positions = state["items"].long(), state["positions"].long()
        self.k, self.d = v.shape
        return self
