"""Neuron Adjust (Li, Sun & Weng, NAACL 2025, METHODS.md 2a): training-free skill unlearning by
moving FFN pre-activations of skill-specific neurons from the forget distribution onto the
retain distribution.

Each neuron at site ``gate`` is modelled by one Gaussian per skill, ``N(mu_f, sd_f)`` (forget)
and ``N(mu_r, sd_r)`` (retain). The top ``percent`` % of neurons by a selection ``rule`` are
adjusted at inference: a value ``x`` more likely under the forget Gaussian is, with probability
``p_f / (p_f + p_r)``, replaced by ``mu_r - (x - mu_f) * sd_r / sd_f``.

Defects of the reference code fixed here (each has a regression test): ``sd`` is a real standard
deviation (not a variance); ``sd_f`` is the forget std (never ``mu_f``); the random draw is
independent per element (seeded ``torch.Generator``); statistics move to the device once.

>>> import skilllens
>>> from skilllens.unlearning.neuron_adjust import NeuronAdjuster
>>> lm = skilllens.load_model("tiny-llama")
>>> na = NeuronAdjuster(percent=5).fit(lm, ["2+2=4", "3*3=9"], ["the cat sat", "a dog ran"],
...                                   progress=False)
>>> with na.applied(lm):
...     _ = lm.model(input_ids=lm.tokenizer(["1+1="], return_tensors="pt")["input_ids"])
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from skilllens._compat import DeprecatedAlias
from skilllens.errors import SkillLensError
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.core.moe_collect import neuron_hooks, unseen
from skilllens.unlearning.selection import (SCOPES, check_percent, check_same_layers,
                                            collect_forget_retain, load_fitted, save_fitted,
                                            top_percent)

RULES = ("signed", "abs_standardized", "divergence")
DIVERGENCES = ("sym_kl", "hellinger")
# --- the method ------------------------------------------------------------------------------
def selection_scores(mu_f, sd_f, mu_r, sd_r, rule: str = "signed",
                     divergence: str = "sym_kl") -> torch.Tensor:
    """Per-neuron selection score (higher = more forget-specific), same shape as the inputs.

    ``signed``: ``mu_f - mu_r`` (reference); ``abs_standardized``: ``|mu_f - mu_r|`` over the
    pooled std ``sqrt((sd_f^2 + sd_r^2)/2)``; ``divergence``: symmetric KL or squared Hellinger
    distance between ``N(mu_f, sd_f)`` and ``N(mu_r, sd_r)``.
    """
    if rule not in RULES:
        raise SkillLensError(f"unknown selection rule {rule!r}; use one of {', '.join(RULES)}")
    diff = mu_f - mu_r
    vf, vr = sd_f ** 2, sd_r ** 2
    if rule == "signed":
        return diff
    if rule == "abs_standardized":
        return diff.abs() / torch.sqrt((vf + vr) / 2)
    if divergence == "sym_kl":
        return (vf + diff ** 2) / (2 * vr) + (vr + diff ** 2) / (2 * vf) - 1
    if divergence == "hellinger":
        bc = torch.sqrt(2 * sd_f * sd_r / (vf + vr)) * torch.exp(-diff ** 2 / (4 * (vf + vr)))
        return 1 - bc
    raise SkillLensError(f"unknown divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")


def adjust_values(x: torch.Tensor, mu_f, sd_f, mu_r, sd_r,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The NA intervention on ``x [..., n]`` for ``n`` neurons with parameters ``[n]`` each.

    Where ``p_f(x) > p_r(x)``, each element independently (one uniform draw per element) is
    replaced with probability ``p_f / (p_f + p_r)`` by ``mu_r - (x - mu_f) * sd_r / sd_f``.
    """
    xf = x.float()
    zf, zr = (xf - mu_f) / sd_f, (xf - mu_r) / sd_r
    log_pf = -0.5 * zf * zf - torch.log(sd_f)
    log_pr = -0.5 * zr * zr - torch.log(sd_r)
    prob = torch.sigmoid(log_pf - log_pr)  # p_f / (p_f + p_r)
    u = torch.rand(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
    replace_ = (log_pf > log_pr) & (u < prob)
    mapped = mu_r - (xf - mu_f) * (sd_r / sd_f)
    return torch.where(replace_, mapped, xf).to(x.dtype)


@dataclass
class _LayerParams:
    index: torch.Tensor
    mu_f: torch.Tensor
    sd_f: torch.Tensor
    mu_r: torch.Tensor
    sd_r: torch.Tensor

    def to(self, device) -> "_LayerParams":
        return _LayerParams(self.index.to(device), *(getattr(self, k).to(device, torch.float32)
                                                     for k in ("mu_f", "sd_f", "mu_r", "sd_r")))


class NeuronAdjuster:
    """Neuron Adjust: ``fit`` on forget/retain data, then ``with na.applied(lm): ...``.

    ``percent``: share of neurons adjusted (0, 100], of each layer's own ``d_ff`` (``per_layer``)
    or of all the layers' neurons together (``global``); ``rule``: ``signed`` (reference),
    ``abs_standardized`` or ``divergence`` (``divergence="sym_kl"|"hellinger"``); ``scope``:
    ``global`` (one threshold over all layers, reference) or ``per_layer``; ``tokens``: which
    tokens the statistics cover (``all`` non-padding tokens, ``last`` or ``answer``);
    ``seed``: seeds the per-element random draws (one generator per ``applied`` block).

    Fitted attributes (scikit-learn convention): ``params_`` (per layer: selected neurons and
    their Gaussians), ``scores_`` ``[n_layers_fitted, max d_ff]`` (NaN past a
    narrower layer's ``d_ff``), ``fitted_layers_``,
    ``fingerprint_`` (of the model fitted on), ``meta_`` (what it was fitted on).
    """

    # scikit-learn naming: fitted attributes end in "_" (old names: deprecated aliases)
    params = DeprecatedAlias("params_")
    scores = DeprecatedAlias("scores_")
    fitted_layers = DeprecatedAlias("fitted_layers_")
    fingerprint = DeprecatedAlias("fingerprint_")
    meta = DeprecatedAlias("meta_")

    def __init__(self, percent: float = 0.5, rule: str = "signed", scope: str = "global",
                 site: str = "gate", layers=None, tokens: str = "all",
                 divergence: str = "sym_kl", seed: int = 0, min_std: float = 1e-6,
                 batch_size: int = 8, max_length: int = 512):
        self.percent = check_percent(percent)
        if rule not in RULES:
            raise SkillLensError(f"unknown selection rule {rule!r}; use one of {', '.join(RULES)}")
        if divergence not in DIVERGENCES:
            raise SkillLensError(f"unknown divergence {divergence!r}; use one of "
                                 f"{', '.join(DIVERGENCES)}")
        if scope not in SCOPES:
            raise SkillLensError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        self.rule, self.scope, self.site, self.layers = rule, scope, site, layers
        self.tokens, self.divergence, self.seed = tokens, divergence, int(seed)
        self.min_std, self.batch_size, self.max_length = float(min_std), batch_size, max_length
        self.params_: dict[int, _LayerParams] = {}
        self.scores_: torch.Tensor | None = None  # [n_layers_fitted, d_ff] float64
        self.fitted_layers_: list[int] = []
        self.fingerprint_: dict | None = None
        self.meta_: dict = {}
        self.n_device_transfers = 0

    # -- fitting --
    def get_params(self) -> dict:
        return {"percent": self.percent, "rule": self.rule, "scope": self.scope,
                "site": self.site, "layers": self.layers, "tokens": self.tokens,
                "divergence": self.divergence, "seed": self.seed, "min_std": self.min_std,
                "batch_size": self.batch_size, "max_length": self.max_length}

    def fit(self, lm, forget, retain, *, data_dir=None, progress: bool = True,
            forget_stats=None, retain_stats=None) -> "NeuronAdjuster":
        """Collect ``gate`` statistics on ``forget`` and the pooled ``retain`` skills (or take
        precomputed ``StatsCollection``s) and select neurons. Returns ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        fs, rs = collect_forget_retain(self, lm, forget, retain, ("moments",), data_dir=data_dir,
                                       progress=progress, forget_stats=forget_stats,
                                       retain_stats=retain_stats)
        return self.fit_stats(fs, rs, lm)

    def fit_stats(self, forget_stats, retain_stats, lm=None) -> "NeuronAdjuster":
        """Select neurons from two ``StatsCollection``s (site ``self.site``)."""
        layers = check_same_layers(forget_stats, retain_stats, self.site)
        mu_f = forget_stats.stacked(self.site, "mean")
        mu_r = retain_stats.stacked(self.site, "mean")
        # a real standard deviation (sqrt of the variance), floored so no division by zero
        sd_f = forget_stats.stacked(self.site, "std").clamp(min=self.min_std)
        sd_r = retain_stats.stacked(self.site, "std").clamp(min=self.min_std)
        self.scores_ = selection_scores(mu_f, sd_f, mu_r, sd_r, self.rule, self.divergence)
        # experts that forget or retain tokens never reached have no Gaussian to map between
        self.scores_ = self.scores_.masked_fill(unseen(forget_stats, retain_stats, self.site),
                                                float("nan"))
        picked = top_percent(self.scores_, self.percent, self.scope,
                             forget_stats.widths(self.site))  # each layer's own d_ff
        self.fitted_layers_ = list(layers)
        self.params_ = {layers[r]: _LayerParams(idx, mu_f[r, idx].float(), sd_f[r, idx].float(),
                                               mu_r[r, idx].float(), sd_r[r, idx].float())
                       for r, idx in picked.items()}
        if lm is not None:
            self.fingerprint_ = lm.fingerprint
        return self

    # -- inspection --
    @property
    def n_selected(self) -> int:
        return sum(int(p.index.numel()) for p in self.params_.values())

    def selected_per_layer(self) -> dict[int, int]:
        return {l: int(self.params_[l].index.numel()) if l in self.params_ else 0
                for l in self.fitted_layers_}

    def top_neurons(self, n: int = 6) -> list[dict]:
        """The ``n`` selected neurons with the highest score, with their Gaussians."""
        rows = []
        for l, p in self.params_.items():
            r = self.fitted_layers_.index(l)
            for j, i in enumerate(p.index.tolist()):
                rows.append({"layer": l, "neuron": i, "score": float(self.scores_[r, i]),
                             "mu_f": float(p.mu_f[j]), "sd_f": float(p.sd_f[j]),
                             "mu_r": float(p.mu_r[j]), "sd_r": float(p.sd_r[j])})
        return sorted(rows, key=lambda d: -d["score"])[:n]

    # -- application --
    def _check_fitted(self):
        if not self.params_:
            raise SkillLensError("NeuronAdjuster is not fitted: call fit(lm, forget, retain) or "
                                 "NeuronAdjuster.load(path, model) first")

    def hooks(self, lm, generator: torch.Generator | None = None) -> list[Hook]:
        """Hooks that adjust the selected neurons; parameters are moved to the device here once."""
        self._check_fitted()
        from skilllens.core.artifacts import check_fingerprint
        from skilllens.core.models import load_model

        lm = load_model(lm)
        if self.fingerprint_ is not None:
            check_fingerprint({"fingerprint": self.fingerprint_}, lm, "this NeuronAdjuster")
        # each layer's parameters and random stream live on that layer's device (device_map)
        devices = {l: lm.adapter.site_device(self.site, l) for l in self.params_}
        on_device = {l: p.to(devices[l]) for l, p in self.params_.items()}
        self.n_device_transfers += 1
        gens = {} if generator is None else {generator.device: generator}
        for dev in devices.values():
            if dev not in gens and dev.type != "meta":  # meta (shape-only) tensors draw nothing
                gens[dev] = torch.Generator(device=dev).manual_seed(self.seed)

        def make(p: _LayerParams, gen: torch.Generator | None):
            def fn(act):
                out = act.clone()
                out[..., p.index] = adjust_values(act[..., p.index], p.mu_f, p.sd_f, p.mu_r,
                                                  p.sd_r, gen)
                return out
            return fn

        def part(p, pos, local):  # MoE: the selected neurons of one expert
            return p if pos is None else _LayerParams(local, *(getattr(p, k)[pos] for k in
                                                              ("mu_f", "sd_f", "mu_r", "sd_r")))

        return [h for l, p in on_device.items() for h in neuron_hooks(
            lm.adapter, self.site, l, p.index,
            lambda pos, local, p=p, g=gens.get(devices[l]): make(part(p, pos, local), g))]

    @contextlib.contextmanager
    def applied(self, lm):
        """Adjust the selected neurons in every forward pass inside the block (reversible)."""
        with hooks_applied(lm, self.hooks(lm)):
            yield self

    # -- persistence --
    def save(self, path: str | os.PathLike) -> Path:
        """Safetensors artifact with the selected neurons, their Gaussians and all scores."""
        self._check_fitted()
        tensors = {"scores": self.scores_}
        for l, p in self.params_.items():
            for k in ("index", "mu_f", "sd_f", "mu_r", "sd_r"):
                tensors[f"layer{l}.{k}"] = getattr(p, k)
        return save_fitted(self, path, tensors, "neuron_adjust")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "NeuronAdjuster":
        """Load a saved adjuster; with ``model`` its fingerprint must match."""
        obj, tensors = load_fitted(cls, path, "neuron_adjust", model)
        obj.params_ = {l: _LayerParams(*(tensors[f"layer{l}.{k}"] for k in
                                        ("index", "mu_f", "sd_f", "mu_r", "sd_r")))
                      for l in obj.fitted_layers_ if f"layer{l}.index" in tensors}
        return obj

    def __repr__(self) -> str:
        state = f"{self.n_selected} neurons" if self.params_ else "not fitted"
        return (f"NeuronAdjuster(percent={self.percent}, rule={self.rule!r}, "
                f"scope={self.scope!r}; {state})")

    def _repr_html_(self) -> str:  # notebook display: parameters, fitted on, selection
        from skilllens.unlearning.display import estimator_display
        return estimator_display(self)._repr_html_()
