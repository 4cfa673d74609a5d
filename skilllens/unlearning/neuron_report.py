"""Neuron views for the audit report: the top neurons each method selected (Neuron Adjust and
Selective Pruning: highest selection score; KSD: the key dimensions that reject most retain
queries), each shown on the forget and retain probe items. Every FFN neuron ``(layer, index)``
appears once, whichever site a method reads: a method (e.g. a second NA percentage) shows its
next-best neurons not shown before."""
from __future__ import annotations


def _ranked(method) -> list[tuple[int, int]]:
    """``(layer, neuron)`` of a fitted NA/SP by its selection score, best first."""
    sel = getattr(method, "params_", None) or getattr(method, "params", None)
    if isinstance(sel, dict) and sel and hasattr(next(iter(sel.values())), "index"):
        sel = {l: p.index for l, p in sel.items()}
    else:
        sel = getattr(method, "selected_", None) or getattr(method, "selected", None) or {}
    scores = getattr(method, "scores_", None)
    scores = scores if scores is not None else method.scores
    layers = getattr(method, "fitted_layers_", None) or method.fitted_layers
    flat = [(float(scores[layers.index(l), int(i)]), l, int(i))
            for l, idx in sel.items() for i in idx.tolist()]
    return [(l, i) for _, l, i in sorted(flat, key=lambda r: (-r[0], r[1], r[2]))]


def pick_neurons(fitted: dict, results: dict, per_method: int, n_layers: int) -> list[tuple]:
    """``[(method, site, layer, neuron, label)]``: ``per_method`` neurons per method, each FFN
    neuron ``(layer, index)`` once (NA and SP by their scores in fit order, then KSD)."""
    seen, out = set(), []

    def take(name, site, ranked, why):
        n = 0
        for r, (layer, j) in enumerate(ranked):
            if n >= per_method:
                break
            if (layer, j) in seen:  # one FFN neuron, whichever site a method reads
                continue
            seen.add((layer, j))
            out.append((name, site, layer, j, f"{name}: {why} #{r + 1}"))
            n += 1

    for name, m in fitted.items():
        take(name, m.site, _ranked(m), "selection score rank")
    det = results.get("detector")
    if det and "ksd" in results.get("methods", {}):
        p = results["methods"]["ksd"]["params"]
        layer = p["layer"] % n_layers
        take("ksd", p["site"], [(layer, d["dim"]) for d in det["top_deciding_dims"]],
             "key dimension rejecting most retain queries")
    return out


def audit_neuron_views(lm, fitted: dict, results: dict, skills: dict, per_method: int = 2,
                       k: int = 6, max_items: int = 24, batch_size: int = 8,
                       max_length: int = 256) -> list[dict]:
    """JSON-ready neuron views (``NeuronView.to_dict()`` plus ``method``) of the neurons
    :func:`pick_neurons` chooses, on ``skills`` (``{name: Skill}``, the probe items). On a
    mixture-of-experts model a neuron of an expert layer is its flat index over the layer's
    experts and its view covers the tokens routed to its expert (``expert``, ``note``)."""
    from skilllens.core.neuron_view import neuron_views

    if per_method <= 0:
        return []
    picks = pick_neurons(fitted, results, per_method, lm.adapter.n_layers)
    if not picks:
        return []
    views = neuron_views(lm, [(s, l, j) for _, s, l, j, _ in picks], list(skills.values()), k=k,
                         max_items=max_items, batch_size=batch_size, max_length=max_length,
                         labels=[lab for *_, lab in picks])
    return [{"method": m, **v.to_dict()} for (m, *_), v in zip(picks, views)]
