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

Mixture-of-experts layers: a neuron is the flat index ``j`` over the layer's experts (neuron
``j - offsets[e]`` of expert ``e``, as ``collect`` and the methods address it), read through
:class:`~skilllens.core.moe_hooks.ExpertHook` on the tokens routed to expert ``e`` only: the
other tokens do not reach that neuron, so its count, histogram, mean/std and top contexts are
over its routed tokens, and the view says so (``expert``, ``expert_neuron``, ``note``). Its
value vector is its column of the expert's down projection (:mod:`skilllens.core.neuron_view_moe`).

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
from skilllens.core.neuron_view_moe import (expert_hook, expert_note, expert_value_vector,
                                            key_width, locate)
from skilllens.data import Skill, is_spec, resolve_skills
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.stats.topk import TopK


@dataclass
class NeuronView:
    """One neuron seen on one or more skills (JSON-ready: :meth:`to_dict` / :meth:`from_dict`).

    ``skills``: per skill ``{"skill", "source", "hash", "n_items", "count", "mean", "std",
    "hist": {"counts" (bins + 2, under/overflow at the ends), "lo", "hi"}, "contexts": [{"item",
    "position", "value", "before", "token", "after"}]}``; ``promoted``/``suppressed``:
    ``[[token, logit], ...]`` of ``W_U v`` (largest / smallest).

    On a mixture-of-experts layer ``neuron`` is the flat index over the layer's experts,
    ``expert``/``expert_neuron`` say which expert and which of its neurons it is, ``count`` is
    the number of (selected) tokens routed to that expert and ``note`` says so; ``expert`` is
    ``None`` on a dense layer."""

    model: str
    site: str
    layer: int
    neuron: int
    skills: list[dict] = field(default_factory=list)
    promoted: list = field(default_factory=list)
    suppressed: list = field(default_factory=list)
    label: str = ""
    expert: int | None = None
    expert_neuron: int | None = None
    note: str = ""

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
def neuron_pass(lm, skill: Skill, keys: list[tuple], k: int = 8, bins: int = 60,
                batch_size: int = 8, max_length: int = 256, tokens: str = "all"):
    """One pass over ``skill``: ``({key: TopK}, {key: NeuronStats with histogram}, encoded)``
    for every neuron of each key (``encoded[i].ids`` are the token ids of item ``i``, to
    rebuild contexts).

    A key is ``(site, layer)`` for a dense layer (its ``d_ff_at(layer)`` neurons, every selected
    token) or ``(site, layer, expert)`` for one expert of a mixture-of-experts layer (its own
    neurons, local indices ``0..f_e-1``, over the selected tokens routed to it only; read through
    :class:`~skilllens.core.moe_hooks.ExpertHook`). Raises ``SiteError`` for a bad key (a
    ``(site, layer)`` of a MoE layer among them)."""
    ad = lm.adapter
    widths = {key: key_width(ad, key) for key in keys}
    enc = encode_items(skill.items, lm.tokenizer, max_length)
    top = {key: TopK(widths[key], k) for key in keys}
    stats = {key: NeuronStats(widths[key], ("moments", "histogram"), bins, backend="torch")
             for key in keys}
    cur: dict = {}

    def make(key):
        def fn(act):
            mask = cur["mask"].to(act.device)
            top[key].update(act, mask, cur["items"])
            stats[key].update(act, mask)
        return fn

    hooks = [expert_hook(key, top[key], stats[key], cur) if len(key) == 3
             else Hook(key[0], key[1], make(key)) for key in keys]
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
    tokens with their logits (``[[token, logit], ...]``). On a mixture-of-experts layer
    ``neuron`` is flat and ``v`` is its column of its expert's down projection. Raises
    ``SiteError`` for an index outside the layer's width."""
    ad = lm.adapter
    layer, neuron, expert, local = locate(ad, "key", layer, neuron)
    v = (ad.value_vectors(layer)[neuron] if expert is None
         else expert_value_vector(ad, layer, expert, local)).detach()
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
    per skill over the distinct ``(site, layer)``s (``(site, layer, expert)``s on a
    mixture-of-experts layer, where ``neuron`` is the flat index over the layer's experts and
    the view covers the tokens routed to its expert only). Raises ``SiteError`` for a bad site
    or a neuron outside ``0..width-1`` of its layer (``adapter.d_ff_at(layer)``)."""
    lm = load_model(lm)
    ad = lm.adapter
    norm = [(site, *locate(ad, site, layer, j)) for site, layer, j in neurons]
    key_of = {i: (s, l) if e is None else (s, l, e) for i, (s, l, _, e, _) in enumerate(norm)}
    keys = sorted(set(key_of.values()), key=lambda x: (x[1], x[0], x[2:]))
    labels = labels or [""] * len(norm)
    views = [NeuronView(lm.name, s, l, j, label=labels[i], expert=e,
                        expert_neuron=None if e is None else loc,
                        note="" if e is None else expert_note(ad, l, e, loc))
             for i, (s, l, j, e, loc) in enumerate(norm)]
    for v in views:
        v.promoted, v.suppressed = vocab_projection(lm, v.layer, v.neuron, n_vocab)
    for skill in _skill_list(skills, data_dir):
        skill = skill.head(max_items)
        top, stats, enc = neuron_pass(lm, skill, keys, k, bins, batch_size, max_length)
        for i, v in enumerate(views):
            key, j = key_of[i], norm[i][4]
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
    value vector. Options as :func:`neuron_views` (``k``, ``max_items``, ``bins``...). On a
    mixture-of-experts layer ``neuron`` is the flat index over the layer's experts and the
    view shows the tokens routed to its expert only (``view.note``).
    Returns a :class:`NeuronView` (``_repr_html_`` in notebooks, ``save(path)`` to HTML)."""
    return neuron_views(lm, [(site, layer, neuron)], skills, **kw)[0]
