"""The numerics of grafting: global top-k masks, the soft graft and the in-place workspace that
holds it (one working copy, one ``addcmul`` per tensor per step, no per-step parameter copies)."""
from __future__ import annotations

import torch

from skilllens.errors import SkillLensError


class GraftError(SkillLensError):
    """Bad grafting input: mismatched models, sparsity out of range, nothing eligible."""


def check_same_shapes(pre: torch.nn.Module, ft: torch.nn.Module) -> None:
    """Raise naming the first parameter whose name or shape differs between the two models."""
    a, b = dict(pre.named_parameters()), dict(ft.named_parameters())
    for n, p in a.items():
        if n not in b:
            raise GraftError(f"the fine-tuned model has no parameter {n!r}; pre-trained and "
                             f"fine-tuned models must share one architecture")
        if p.shape != b[n].shape:
            raise GraftError(f"parameter {n!r} has shape {tuple(p.shape)} in the pre-trained and "
                             f"{tuple(b[n].shape)} in the fine-tuned model; graft between a "
                             f"model and its own fine-tuned copy")
    extra = [n for n in b if n not in a]
    if extra:
        raise GraftError(f"the fine-tuned model has an extra parameter {extra[0]!r}; pre-trained "
                         f"and fine-tuned models must share one architecture")


def global_topk_masks(values: dict[str, torch.Tensor], k: int,
                      max_candidates: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Boolean masks of the ``k`` globally largest entries of non-negative ``values``.

    The k-th largest value comes from ``kthvalue`` over the per-tensor top-k candidates (or a
    bisection on counts when those would exceed ``max_candidates``); ties at the threshold are
    filled in name order so exactly ``k`` entries are chosen, except that zeros are never
    chosen (grafting an unchanged entry is a no-op)."""
    total = sum(v.numel() for v in values.values())
    k = max(0, min(int(k), total))
    if k == 0:
        return {n: torch.zeros_like(v, dtype=torch.bool) for n, v in values.items()}
    if sum(min(k, v.numel()) for v in values.values()) <= max(max_candidates, 4 * k):
        cands = torch.cat([v.reshape(-1).topk(min(k, v.numel()), sorted=False).values
                           for v in values.values()])
        thr = cands.kthvalue(cands.numel() - k + 1).values
    else:
        lo = torch.zeros((), dtype=torch.float64)
        hi = max(v.max() for v in values.values()).double().cpu()
        for _ in range(64):  # invariant: count(> hi) < k <= count(>= lo)
            mid = (lo + hi) / 2
            cnt = sum(int((v > mid.to(v.device, v.dtype)).sum()) for v in values.values())
            lo, hi = (mid, hi) if cnt >= k else (lo, mid)
        ge = [v[v >= lo.to(v.device, v.dtype)].reshape(-1) for v in values.values()]
        n_ge = sum(g.numel() for g in ge)
        thr = torch.cat(ge).topk(k).values[-1] if n_ge <= max(max_candidates, 4 * k) \
            else lo.to(next(iter(values.values())).dtype)
    masks = {n: v > thr.to(v.device, v.dtype) for n, v in values.items()}
    left = k - sum(int(m.sum()) for m in masks.values())
    if left > 0 and float(thr) > 0:
        for n, v in values.items():
            ties = (v == thr.to(v.device, v.dtype)).reshape(-1).nonzero()[:left, 0]
            masks[n].view(-1)[ties] = True
            left -= ties.numel()
            if left <= 0:
                break
    return masks


def soft_mask(score: torch.Tensor, base: torch.Tensor, bias: float) -> torch.Tensor:
    """The soft mask ``g = base * (1 - sig(S - b)) + (1 - base) * sig(S - b)``."""
    sig = torch.sigmoid(score - bias)
    return torch.where(base, 1 - sig, sig)


def soft_graft(score: torch.Tensor, pre: torch.Tensor, diff: torch.Tensor, base: torch.Tensor,
               bias: float) -> torch.Tensor:
    """Differentiable (w.r.t. ``score``) soft graft ``pre + soft_mask(score) * diff`` (the
    definition; :class:`GraftWorkspace` computes the same values and gradients in place)."""
    return torch.addcmul(pre, soft_mask(score, base, bias), diff)


class GraftWorkspace:
    """The soft graft, written in place into one working copy of the changed tensors.

    ``apply_soft()``: ``work = pre + sig(S - b) * diff`` (one ``addcmul`` per tensor), then the
    base-patch entries (sparse flat indices) ``pre + (1 - sig) * diff``; ``score_grads(dL/dwork)``
    gives ``dL/dS`` in the sigmoid buffers; ``apply_hard(hard)``: ``pre + hard * diff``. Same
    arithmetic as :func:`soft_graft`; only ``work`` gets gradients, no per-step copies.
    """

    def __init__(self, pre: dict, diff: dict, base: dict, bias: float):
        self.pre, self.diff, self.bias = pre, diff, float(bias)
        self.base_idx = {n: m.reshape(-1).nonzero().squeeze(1) for n, m in base.items()}
        self.scores = {n: torch.zeros_like(d) for n, d in diff.items()}
        self.work = {n: torch.empty_like(d).requires_grad_() for n, d in diff.items()}
        self.sig = {n: torch.empty_like(d) for n, d in diff.items()}

    @torch.no_grad()
    def apply_soft(self) -> dict:
        for n, w in self.work.items():
            sig = torch.sub(self.scores[n], self.bias, out=self.sig[n]).sigmoid_()
            torch.addcmul(self.pre[n], sig, self.diff[n], out=w)
            i = self.base_idx[n]
            w.view(-1)[i] = torch.addcmul(self.pre[n].reshape(-1)[i], 1 - sig.view(-1)[i],
                                          self.diff[n].reshape(-1)[i])
        return self.work

    @torch.no_grad()
    def apply_hard(self, hard: dict) -> dict:
        for n, w in self.work.items():
            w.copy_(self.pre[n])
            i = hard[n].reshape(-1).nonzero().squeeze(1)
            w.view(-1)[i] = self.pre[n].reshape(-1)[i] + self.diff[n].reshape(-1)[i]
        return self.work

    @torch.no_grad()
    def score_grads(self, grads, l1: float = 0.0) -> list[torch.Tensor]:
        """``dL/dS`` per tensor (in the sigmoid buffers; call after ``apply_soft``); ``l1``
        adds the gradient of ``l1 * sum(g)``."""
        out = []
        for (n, sig), g in zip(self.sig.items(), grads):
            sig.mul_(1 - sig)
            sf = sig.view(-1)
            sf[self.base_idx[n]] = -sf[self.base_idx[n]]
            if l1:
                sig.mul_(torch.addcmul(torch.full_like(g, l1), self.diff[n], g))
            else:
                sig.mul_(self.diff[n]).mul_(g)
            out.append(sig)
        return out

    def soft_mask_sum(self) -> torch.Tensor:
        """``sum(g)`` over all tensors (after ``apply_soft``)."""
        return sum(s.sum(dtype=torch.float64) + (1 - 2 * s.view(-1)[self.base_idx[n]].double())
                   .sum() for n, s in self.sig.items())
