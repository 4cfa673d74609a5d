"""What only mixture-of-experts models allow: which experts a skill routes to, and forgetting by
routing away from them at test time.

*Routing statistics* are the ``routing`` site of :func:`skilllens.core.collect.collect`: per layer
and expert, ``frac_pos`` is the share of a skill's tokens routed to the expert and ``mean`` its
mean routing weight (0 where not chosen).

:class:`ExpertDeactivator` attributes experts to the forget skill by the ratio of routing shares
``share_forget / (share_retain + eps)`` (the expert-attribution step of SEUF, Zhuang et al.,
ACL 2025, which then fine-tunes the attributed expert with a router anchor) and deactivates the
top ``n_experts`` per layer at inference without training, as in SteerMoE (Fayyaz et al.,
ICLR 2026): tokens the router sends to a deactivated expert go to the best-scoring other expert
(``mode="reroute"``: the next expert by the router's own ranking not already chosen, same
weight; for DeepSeek-V3 and GLM-4.5 that ranking includes the score-correction bias and the
group limits) or lose that expert's contribution (``mode="drop"``: weight 0). It is a
forward-only edit of the top-k choices through :class:`~skilllens.core.moe_hooks.RouterHook`, restored on exit.

>>> import skilllens
>>> from skilllens.unlearning.experts import ExpertDeactivator
>>> lm = skilllens.load_model("tiny-mixtral")
>>> ed = ExpertDeactivator(n_experts=1).fit(lm, ["2+2=4", "3*3=9"], ["the cat", "a dog"],
...                                         progress=False)
>>> ed.n_selected <= 2  # at most one expert per MoE layer
True
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from skilllens.core.hooks import hooks_applied
from skilllens.core.moe_hooks import RouterHook, Routing
from skilllens.errors import SkillLensError
from skilllens.unlearning.selection import collect_forget_retain, load_fitted, save_fitted

MODES = ("reroute", "drop")


def routing_shares(stats, layers=None) -> torch.Tensor:
    """``[n_layers, E]`` share of tokens routed to each expert (``routing`` statistics)."""
    layers = stats.layers("routing") if layers is None else layers
    return torch.stack([stats["routing", l].frac_pos.double().cpu() for l in layers])


def reroute(r: Routing, banned: torch.Tensor, mode: str = "reroute") -> Routing:
    """Top-k choices without the experts ``banned`` (bool ``[E]``): each slot holding a banned
    expert takes the next best allowed expert by the router's own ranking with the banned
    experts taken out (``reroute``: :meth:`Routing.ranking`, the logits, or for DeepSeek-V3 /
    GLM-4.5 routers ``sigmoid(logits)`` plus the score-correction bias within the expert groups
    eligible without the banned experts; same weight; the other choices are kept) or weight 0
    (``drop``). A slot with no allowed expert left gets weight 0."""
    hit = banned[r.index.clamp(max=banned.numel() - 1)] & (r.index < banned.numel())
    if not bool(hit.any()):
        return r
    if mode == "drop":
        return Routing(r.logits, r.index, r.weights.masked_fill(hit, 0))
    logits = r.ranking(banned)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, r.index.clamp(
        max=logits.shape[1] - 1), True)
    allowed = logits.masked_fill(chosen | banned.to(logits.device)[None], float("-inf"))
    order = allowed.argsort(dim=1, descending=True, stable=True)
    rank = hit.long().cumsum(1) - 1                       # r-th banned slot of the row
    pick = order.gather(1, rank.clamp(min=0, max=order.shape[1] - 1))
    ok = allowed.gather(1, pick) > float("-inf")
    index = torch.where(hit & ok, pick, r.index)
    weights = r.weights.masked_fill(hit & ~ok, 0)
    return Routing(r.logits, index, weights)


class ExpertDeactivator:
    """Route away from the ``n_experts`` experts per layer most specific to the forget skill.

    ``min_ratio``: an expert is deactivated only if the forget share exceeds the retain share
    by this factor; ``mode``: ``reroute`` or ``drop``. ``fit`` collects ``routing`` statistics
    on forget and retain data; ``applied(lm)`` edits the routing inside the block.
    """

    site = "routing"

    def __init__(self, n_experts: int = 1, layers=None, mode: str = "reroute",
                 min_ratio: float = 1.0, eps: float = 1e-3, tokens: str = "all",
                 batch_size: int = 8, max_length: int = 512):
        if mode not in MODES:
            raise SkillLensError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if int(n_experts) < 1:
            raise SkillLensError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts, self.layers, self.mode = int(n_experts), layers, mode
        self.min_ratio, self.eps, self.tokens = float(min_ratio), float(eps), tokens
        self.batch_size, self.max_length = batch_size, max_length
        self.deactivated_: dict[int, torch.Tensor] = {}
        self.scores_: torch.Tensor | None = None
        self.fitted_layers_: list[int] = []
        self.fingerprint_: dict | None = None
        self.meta_: dict = {}

    def get_params(self) -> dict:
        return {"n_experts": self.n_experts, "layers": self.layers, "mode": self.mode,
                "min_ratio": self.min_ratio, "eps": self.eps, "tokens": self.tokens}

    def fit(self, lm, forget, retain, *, data_dir=None, progress: bool = True,
            forget_stats=None, retain_stats=None) -> "ExpertDeactivator":
        """Collect routing statistics of ``forget`` and pooled ``retain`` and pick experts."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        if not getattr(lm.adapter, "moe_layers", None):
            raise SkillLensError(f"{lm.name} is not a mixture-of-experts model: expert "
                                 f"deactivation needs routed experts (use NeuronAdjuster)")
        if self.layers is None:
            self.layers = lm.adapter.moe_layers
        fs, rs = collect_forget_retain(self, lm, forget, retain, ("moments", "positive"),
                                       data_dir=data_dir, progress=progress,
                                       forget_stats=forget_stats, retain_stats=retain_stats)
        return self.fit_stats(fs, rs, lm)

    def fit_stats(self, forget_stats, retain_stats, lm=None) -> "ExpertDeactivator":
        layers = forget_stats.layers("routing")
        if not layers or layers != retain_stats.layers("routing"):
            raise SkillLensError("ExpertDeactivator needs 'routing' statistics of the same "
                                 "layers on both sides: collect(..., sites=['routing'])")
        if self.layers is not None:
            layers = [l for l in layers if l in set(self.layers)]
        f, r = routing_shares(forget_stats, layers), routing_shares(retain_stats, layers)
        self.scores_ = f / (r + self.eps)
        k = min(self.n_experts, self.scores_.shape[1])
        top = torch.topk(self.scores_, k, dim=1)
        self.fitted_layers_ = list(layers)
        self.deactivated_ = {}
        for row, l in enumerate(layers):
            keep = top.values[row] > self.min_ratio
            if bool(keep.any()):
                self.deactivated_[l] = torch.sort(top.indices[row][keep]).values
        if lm is not None:
            self.fingerprint_ = lm.fingerprint
        return self

    @property
    def n_selected(self) -> int:
        return sum(int(v.numel()) for v in self.deactivated_.values())

    def selected_per_layer(self) -> dict[int, int]:
        return {l: int(self.deactivated_[l].numel()) if l in self.deactivated_ else 0
                for l in self.fitted_layers_}

    def hooks(self, lm) -> list[RouterHook]:
        from skilllens.core.artifacts import check_fingerprint
        from skilllens.core.models import load_model

        if self.scores_ is None:
            raise SkillLensError("ExpertDeactivator is not fitted: call fit(lm, forget, retain) "
                                 "or ExpertDeactivator.load(path, model) first")
        lm = load_model(lm)
        if self.fingerprint_ is not None:
            check_fingerprint({"fingerprint": self.fingerprint_}, lm, "this ExpertDeactivator")
        hooks = []
        for l, experts in self.deactivated_.items():
            n = lm.adapter.moe_layer(l).n_experts
            banned = torch.zeros(n, dtype=torch.bool, device=lm.adapter.site_device("key", l))
            banned[experts.to(banned.device)] = True
            hooks.append(RouterHook(l, lambda r, b=banned: reroute(r, b.to(r.index.device),
                                                                   self.mode)))
        return hooks

    @contextlib.contextmanager
    def applied(self, lm):
        """Route away from the deactivated experts inside the block (no weight changes)."""
        with hooks_applied(lm, self.hooks(lm)):
            yield self

    def summary(self, forget_stats, retain_stats) -> dict:
        """JSON-ready: deactivated experts and their routing shares (forget / retain)."""
        layers = self.fitted_layers_
        f, r = routing_shares(forget_stats, layers), routing_shares(retain_stats, layers)
        rows = [{"layer": l, "expert": int(e), "share_forget": float(f[i, e]),
                 "share_retain": float(r[i, e]), "ratio": float(self.scores_[i, e])}
                for i, l in enumerate(layers) for e in self.deactivated_.get(l, [])]
        return {"deactivated": rows, "n_selected": self.n_selected, "mode": self.mode}

    def save(self, path: str | os.PathLike) -> Path:
        if self.scores_ is None:
            raise SkillLensError("nothing to save: fit the ExpertDeactivator first")
        tensors = {"scores": self.scores_,
                   **{f"layer{l}.experts": e for l, e in self.deactivated_.items()}}
        return save_fitted(self, path, tensors, "expert_deactivation")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "ExpertDeactivator":
        obj, tensors = load_fitted(cls, path, "expert_deactivation", model)
        obj.deactivated_ = {l: tensors[f"layer{l}.experts"] for l in obj.fitted_layers_
                           if f"layer{l}.experts" in tensors}
        return obj

    def __repr__(self) -> str:
        return (f"ExpertDeactivator(n_experts={self.n_experts}, mode={self.mode!r}; "
                f"{self.n_selected} experts)")


def routing_profile(lm, skills: dict, *, batch_size: int = 8, max_length: int = 512,
                    progress: bool = False, stats: dict | None = None) -> dict:
    """Which experts each skill routes to: ``{"layers": [...], "shares": {skill: [[share per
    expert] per layer]}, "mean_weight": {...}}`` (``stats``: already collected routing
    statistics per skill name, reused)."""
    from skilllens.core.collect import collect

    layers = lm.adapter.moe_layers
    out = {"layers": layers, "shares": {}, "mean_weight": {}}
    for name, items in skills.items():
        st = (stats or {}).get(name) or collect(
            lm, items, sites=["routing"], layers=layers, batch_size=batch_size,
            max_length=max_length, stats=("moments", "positive"), progress=progress)
        out["shares"][name] = routing_shares(st, layers).tolist()
        out["mean_weight"][name] = torch.stack([st["routing", l].mean.cpu()
                                                for l in layers]).tolist()
    return out


REFERENCES = ["SEUF: Zhuang et al., ACL 2025 (expert attribution + router anchor)",
              "SteerMoE: Fayyaz et al., ICLR 2026 (training-free expert deactivation)"]


def expert_method(lm, cfg) -> ExpertDeactivator:
    """The audit's ``experts`` method (one expert per MoE layer, rerouted)."""
    if not getattr(lm.adapter, "moe_layers", None):
        raise SkillLensError(f"method 'experts' needs a mixture-of-experts model; {lm.name} is "
                             f"dense: drop 'experts' from --methods")
    return ExpertDeactivator(n_experts=1, layers=lm.adapter.moe_layers,
                             batch_size=cfg.batch_size, max_length=cfg.max_length)


def expert_report(lm, method: ExpertDeactivator, parts: dict, cfg, fs, rs) -> dict:
    """``results["experts"]`` of an audit: per-skill routing shares on the probe items, the
    deactivated experts, the references."""
    names = [cfg.forget, *cfg.retain]
    prof = routing_profile(lm, {s: parts[s][0] for s in names}, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, stats={cfg.forget: fs})
    prof.update(method.summary(fs, rs))
    prof["n_experts"] = [lm.adapter.moe_layer(l).n_experts for l in prof["layers"]]
    prof["references"] = REFERENCES
    return prof
