"""What does a neuron respond to? ``show_neuron(lm, site, layer, neuron, skills=...)``.

For each skill, one streaming pass over its items with hooks at the needed ``(site, layer)``s
collects, for EVERY neuron of those layers, a bounded top-k of activations with their item and
token position (:class:`skilllens.stats.topk.TopK`) and a per-neuron histogram with moments
(:class:`skilllens.stats.neuron_stats.NeuronStats`); memory is ``O(k * d_ff)`` per layer
whatever the data size. A view then holds, per skill, the top-k activating contexts (the
activating token and a window around it), the real activation histogram and the fitted Gaussian
``N(mean, std)``, plus the vocabulary projection ``W_U v`` of the neuron's value vector (the
tokens it promotes and suppresses through the residual stream; Geva et al. 2022, "Transformer
Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space").

>>> import skilllens
>>> lm = skilllens.load_model("tiny-llama")
>>> view = skilllens.show_neuron(lm, "key", 1, 5, skills=["2+2=4", "3*3=9"], k=3)
>>> len(view.skills[0]["contexts"])
3
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from skilllens.core.batching import encode_items, iter_batches, pad_id
from skilllens.core.hooks import Hook, run_with_hooks
from skilllens.core.models import load_model
from skilllens.data import Skill, is_spec, resolve_skills
from skilllens.errors import SiteError
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.stats.topk import TopK


@dataclass
class NeuronView:
    """One neuron seen on one or more skills (JSON-ready: :meth:`to_dict` / :meth:`from_dict`).

    ``skills``: per skill ``{"skill", "source", "hash", "n_items", "count", "mean", "std",
    "hist": {"counts" (bins + 2, under/overflow at the ends), "lo", "hi"}, "contexts": [{"item",
    "position", "value", "before", "token", "after"}]}``; ``promoted``/``suppressed``:
    ``[[token, logit], ...]`` of ``W_U v`` (largest / smallest)."""

    model: str
    site: str
    layer: int
    neuron: int
    skills: list[dict] = field(default_factory=list)
    promoted: list = field(default_factory=list)
    suppressed: list = field(default_factory=list)
    label: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronView":
        return cls(**d)

    def display(self):
        from skilllens.core.neuron_view_html import view_display
        return view_display(self)

    def _repr_html_(self) -> str:
        return self.display()._repr_html_()

    def __repr__(self) -> str:
        return self.display().text

    def save(self, path: str | os.PathLike) -> Path:
        """A standalone HTML page (figures embedded)."""
        return self.display().save(path)


def _skill_list(skills, data_dir=None) -> list[Skill]:
    """Each entry its own skill: a ``Skill``, a spec (``"gsm8k,humaneval"`` gives two), or a
    list of them; a list of literal texts or items is one skill."""
    if isinstance(skills, Skill):
        return [skills]
    if isinstance(skills, str):
        return [resolve_skills(s.strip(), data_dir) for s in skills.split(",") if s.strip()]
    skills = list(skills)
    if skills and all(isinstance(s, Skill) or (isinstance(s, str) and is_spec(s))
                      for s in skills):
        return [resolve_skills(s, data_dir) for s in skills]
    return [resolve_skills(skills, data_dir)]


@torch.no_grad()
def neuron_pass(lm, skill: Skill, keys: list[tuple[str, int]], k: int = 8, bins: int = 60,
                batch_size: int = 8, max_length: int = 256, tokens: str = "all"):
    """One pass over ``skill``: ``({key: TopK}, {key: NeuronStats with histogram}, encoded)``
    for every neuron at each ``(site, layer)`` of ``keys`` (``encoded[i].ids`` are the token ids
    of item ``i``, to rebuild contexts)."""
    ad = lm.adapter
    enc = encode_items(skill.items, lm.tokenizer, max_length)
    top = {key: TopK(ad.d_ff, k) for key in keys}
    stats = {key: NeuronStats(ad.d_ff, ("moments", "histogram"), bins, backend="torch")
             for key in keys}
    cur: dict = {}

    def make(key):
        def fn(act):
            mask = cur["mask"].to(act.device)
            top[key].update(act, mask, cur["items"])
            stats[key].update(act, mask)
        return fn

    hooks = [Hook(s, l, make((s, l))) for s, l in keys]
    for batch in iter_batches(enc, batch_size, pad_id(lm.tokenizer), lm.device):
        cur["mask"], cur["items"] = batch.token_mask(tokens), batch.index
        run_with_hooks(lm, batch.inputs, hooks, stop_after_last=True, use_cache=False)
    return top, stats, enc


def _piece(tok, ids: list[int]) -> str:
    return "".join(tok.decode([i]) for i in ids)


def contexts(lm, top: TopK, enc, neuron: int, window: tuple[int, int] = (16, 4)) -> list[dict]:
    """The top activating contexts of ``neuron``: item, position, value and the text before, at
    and after the activating token (``window`` tokens before / after)."""
    out = []
    for value, item, pos in top.neuron(neuron):
        ids = enc[item].ids
        out.append({"item": item, "position": pos, "value": value,
                    "before": _piece(lm.tokenizer, ids[max(0, pos - window[0]):pos]),
                    "token": _piece(lm.tokenizer, ids[pos:pos + 1]),
                    "after": _piece(lm.tokenizer, ids[pos + 1:pos + 1 + window[1]])})
    return out


@torch.no_grad()
def vocab_projection(lm, layer: int, neuron: int, n: int = 10) -> tuple[list, list]:
    """``W_U v`` of the neuron's value vector: the ``n`` most promoted and most suppressed
    tokens with their logits (``[[token, logit], ...]``)."""
    v = lm.adapter.value_vectors(layer)[neuron].detach()
    W = lm.adapter.unembedding().detach()
    logits = (W.float() @ v.to(W.device).float()).cpu()
    n = min(n, logits.numel())
    hi, lo = torch.topk(logits, n), torch.topk(-logits, n)
    dec = lambda i: lm.tokenizer.decode([int(i)])  # noqa: E731
    return ([[dec(i), float(x)] for x, i in zip(hi.values, hi.indices)],
            [[dec(i), float(-x)] for x, i in zip(lo.values, lo.indices)])


def neuron_views(lm, neurons, skills, *, k: int = 8, max_items: int | None = 64, bins: int = 60,
                 batch_size: int = 8, max_length: int = 256, n_vocab: int = 10,
                 window: tuple[int, int] = (16, 4), data_dir=None, labels=None) -> list[NeuronView]:
    """Views of several ``neurons`` (``[(site, layer, neuron), ...]``) on ``skills``: one pass
    per skill over the distinct ``(site, layer)``s. Raises ``SiteError`` for a bad neuron."""
    lm = load_model(lm)
    ad = lm.adapter
    norm = []
    for site, layer, j in neurons:
        ad.arch.site(site)
        layer = ad.check_layers([layer])[0]
        if not 0 <= int(j) < ad.d_ff:
            raise SiteError(f"neuron {j} is out of range: {site} has {ad.d_ff} neurons "
                            f"(0..{ad.d_ff - 1}) per layer")
        norm.append((site, layer, int(j)))
    keys = sorted({(s, l) for s, l, _ in norm}, key=lambda x: (x[1], x[0]))
    views = [NeuronView(lm.name, s, l, j, label=(labels or [""] * len(norm))[i])
             for i, (s, l, j) in enumerate(norm)]
    for v in views:
        v.promoted, v.suppressed = vocab_projection(lm, v.layer, v.neuron, n_vocab)
    for skill in _skill_list(skills, data_dir):
        skill = skill.head(max_items)
        top, stats, enc = neuron_pass(lm, skill, keys, k, bins, batch_size, max_length)
        for v in views:
            key, j = (v.site, v.layer), v.neuron
            st, h = stats[key], stats[key].histogram
            v.skills.append({
                "skill": skill.name, "source": skill.source, "hash": skill.digest(),
                "n_items": len(skill), "count": int(st.count[j]), "mean": float(st.mean[j]),
                "std": float(st.std[j]),
                "hist": {"counts": h.counts[j].tolist(), "lo": float(h.lo[j]),
                         "hi": float(h.hi[j])} if h.lo is not None else None,
                "contexts": contexts(lm, top[key], enc, j, window)})
    return views


def show_neuron(lm, site: str, layer: int, neuron: int, skills="gsm8k", **kw) -> NeuronView:
    """What ``neuron`` at ``(site, layer)`` responds to on ``skills`` (a spec such as
    ``"gsm8k,humaneval"``, a ``Skill``, a list of them, or a list of texts): top-k activating
    contexts, activation histograms with the fitted Gaussian, the vocabulary projection of its
    value vector. Options as :func:`neuron_views` (``k``, ``max_items``, ``bins``...).
    Returns a :class:`NeuronView` (``_repr_html_`` in notebooks, ``save(path)`` to HTML)."""
    return neuron_views(lm, [(site, layer, neuron)], skills, **kw)[0]
