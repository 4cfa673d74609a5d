"""Selective Pruning (the baseline of METHODS.md 2b): zero the neurons whose mean |activation|
on the forget skill is largest relative to the retain skills.

Score per neuron: ``mean|x|_forget / (mean|x|_retain + eps)`` at site ``key`` (the neuron
coefficients) over all non-padding tokens; the top ``percent`` % (globally or per layer) are set
to zero during every forward pass inside ``with sp.applied(lm): ...``.

>>> import skilllens
>>> from skilllens.unlearning.selective_pruning import SelectivePruner
>>> lm = skilllens.load_model("tiny-llama")
>>> sp = SelectivePruner(percent=5).fit(lm, ["2+2=4", "3*3=9"], ["the cat", "a dog"],
...                                     progress=False)
>>> sp.n_selected
6
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from skilllens.core.artifacts import check_fingerprint
from skilllens._compat import DeprecatedAlias
from skilllens.errors import SkillLensError
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.core.moe_collect import neuron_hooks, unseen
from skilllens.unlearning.selection import (SCOPES, check_percent, check_same_layers,
                                            collect_forget_retain, load_fitted, save_fitted,
                                            top_percent)


def pruning_scores(abs_forget: torch.Tensor, abs_retain: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """``abs_forget / (abs_retain + eps)`` (any matching shapes; float64)."""
    return abs_forget.double() / (abs_retain.double() + eps)


class SelectivePruner:
    """Zero the top ``percent`` % neurons by the forget/retain ratio of mean |activation|.

    Fitted attributes (scikit-learn convention): ``selected_`` (per layer: neuron indices),
    ``scores_`` ``[n_layers_fitted, max d_ff]`` (NaN past a
    narrower layer's ``d_ff``), ``fitted_layers_``, ``fingerprint_``, ``meta_``.
    """

    # scikit-learn naming: fitted attributes end in "_" (old names: deprecated aliases)
    selected = DeprecatedAlias("selected_")
    scores = DeprecatedAlias("scores_")
    fitted_layers = DeprecatedAlias("fitted_layers_")
    fingerprint = DeprecatedAlias("fingerprint_")
    meta = DeprecatedAlias("meta_")

    def __init__(self, percent: float = 0.5, site: str = "key", layers=None,
                 scope: str = "global", tokens: str = "all", eps: float = 1e-6,
                 batch_size: int = 8, max_length: int = 512):
        self.percent = check_percent(percent)
        if scope not in SCOPES:
            raise SkillLensError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        self.site, self.layers, self.scope, self.tokens = site, layers, scope, tokens
        self.eps, self.batch_size, self.max_length = float(eps), batch_size, max_length
        self.selected_: dict[int, torch.Tensor] = {}
        self.scores_: torch.Tensor | None = None
        self.fitted_layers_: list[int] = []
        self.fingerprint_: dict | None = None
        self.meta_: dict = {}

    def get_params(self) -> dict:
        return {"percent": self.percent, "site": self.site, "layers": self.layers,
                "scope": self.scope, "tokens": self.tokens, "eps": self.eps,
                "batch_size": self.batch_size, "max_length": self.max_length}

    def fit(self, lm, forget, retain, *, data_dir=None, progress: bool = True,
            forget_stats=None, retain_stats=None) -> "SelectivePruner":
        """Collect mean |activation| (stats ``abs``) on both sides and rank. Returns ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        fs, rs = collect_forget_retain(self, lm, forget, retain, ("moments", "abs"),
                                       data_dir=data_dir, progress=progress,
                                       forget_stats=forget_stats, retain_stats=retain_stats)
        return self.fit_stats(fs, rs, lm)

    def fit_stats(self, forget_stats, retain_stats, lm=None) -> "SelectivePruner":
        layers = check_same_layers(forget_stats, retain_stats, self.site)
        self.scores_ = pruning_scores(forget_stats.stacked(self.site, "mean_abs"),
                                     retain_stats.stacked(self.site, "mean_abs"), self.eps)
        # experts the forget tokens never reached are not forget-specific (MoE); experts only
        # forget tokens reach (no retain count) keep their large ratio
        self.scores_ = self.scores_.masked_fill(
            unseen(forget_stats, retain_stats, self.site, need_retain=False), float("nan"))
        picked = top_percent(self.scores_, self.percent, self.scope,
                             forget_stats.widths(self.site))  # each layer's own d_ff
        self.fitted_layers_ = list(layers)
        self.selected_ = {layers[r]: idx for r, idx in picked.items()}
        if lm is not None:
            self.fingerprint_ = lm.fingerprint
        return self

    @property
    def n_selected(self) -> int:
        return sum(int(i.numel()) for i in self.selected_.values())

    def selected_per_layer(self) -> dict[int, int]:
        return {l: int(self.selected_[l].numel()) if l in self.selected_ else 0
                for l in self.fitted_layers_}

    def hooks(self, lm) -> list[Hook]:
        if not self.selected_:
            raise SkillLensError("SelectivePruner is not fitted: call fit(lm, forget, retain) or "
                                 "SelectivePruner.load(path, model) first")
        from skilllens.core.models import load_model

        lm = load_model(lm)
        if self.fingerprint_ is not None:
            check_fingerprint({"fingerprint": self.fingerprint_}, lm, "this SelectivePruner")
        on_device = {l: i.to(lm.adapter.site_device(self.site, l))  # each layer's device
                     for l, i in self.selected_.items()}

        def make(idx):
            def fn(act):
                out = act.clone()
                out[..., idx] = 0
                return out
            return fn

        return [h for l, i in on_device.items() for h in neuron_hooks(
            lm.adapter, self.site, l, i, lambda pos, local, i=i: make(i if pos is None else local))]

    @contextlib.contextmanager
    def applied(self, lm):
        """Zero the selected neurons inside the block (reversible: no weight is changed)."""
        with hooks_applied(lm, self.hooks(lm)):
            yield self

    def save(self, path: str | os.PathLike) -> Path:
        if not self.selected_:
            raise SkillLensError("nothing to save: fit the SelectivePruner first")
        tensors = {"scores": self.scores_, **{f"layer{l}.index": i for l, i in self.selected_.items()}}
        return save_fitted(self, path, tensors, "selective_pruning")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "SelectivePruner":
        obj, tensors = load_fitted(cls, path, "selective_pruning", model)
        obj.selected_ = {l: tensors[f"layer{l}.index"] for l in obj.fitted_layers_
                        if f"layer{l}.index" in tensors}
        return obj

    def __repr__(self) -> str:
        return f"SelectivePruner(percent={self.percent}, site={self.site!r}; {self.n_selected} neurons)"

    def _repr_html_(self) -> str:  # notebook display: parameters, fitted on, selection
        from skilllens.unlearning.display import estimator_display
        return estimator_display(self)._repr_html_()
