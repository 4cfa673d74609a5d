"""Rendering of a :class:`~skilllens.core.neuron_view.NeuronView`: contexts with the activating
token highlighted, histograms with the fitted Gaussian, the vocabulary projection; and
:func:`draw_histograms`, shared with the audit's paper figure."""
from __future__ import annotations

import math

from skilllens.display import (PALETTE, Display, esc, figure_img, paper_figure, short_hash,
                               table, text_table)


def _visible(s: str) -> str:
    return esc(s).replace("\n", "\u23ce").replace("\t", "\u21e5")


def draw_histograms(ax, entries: list[dict], xlabel: str, gaussian: bool = True,
                    legend: bool = True) -> None:
    """Per skill entry (``{"skill", "hist", "mean", "std"}``): the real histogram as a density
    (step line; under/overflow bins left out and counted in the legend) and, dashed in the same
    colour, the fitted Gaussian ``N(mean, std)``."""
    import numpy as np

    for c, e in zip(PALETTE, entries):
        h = e.get("hist")
        if not h:
            continue
        counts = np.asarray(h["counts"], dtype=float)
        inner, out = counts[1:-1], counts[0] + counts[-1]
        edges = np.linspace(h["lo"], h["hi"], len(inner) + 1)
        width = edges[1] - edges[0]
        total = counts.sum()
        dens = inner / max(total * width, 1e-300)
        lab = f"{e['skill']} (n={int(total)}" + (f", {int(out)} outside" if out else "") + ")"
        ax.stairs(dens, edges, color=c, label=lab, fill=False, lw=1.1)
        if gaussian and e.get("std", 0) > 0:
            xs = np.linspace(h["lo"], h["hi"], 200)
            mu, sd = e["mean"], e["std"]
            ax.plot(xs, np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
                    color=c, ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (1 / activation unit)")
    if legend:
        ax.legend(frameon=False, fontsize=6)


def _context_rows(ctxs: list[dict]) -> list[list[str]]:
    return [[str(r + 1), f"{c['value']:.4g}",
             f"<span class='ctx'>{_visible(c['before'])}<mark>{_visible(c['token'])}</mark>"
             f"{_visible(c['after'])}</span>", str(c["item"]), str(c["position"])]
            for r, c in enumerate(ctxs)]


def view_display(v) -> Display:
    where = f"neuron {v.neuron} at {v.site}, layer {v.layer}"
    head = f"{v.model}: {where}" + (f" ({v.label})" if v.label else "")
    body = [f"<h3>{esc(head)}</h3>"]
    text = [head]
    if v.note:  # an expert neuron of a mixture-of-experts layer: which tokens it saw
        body.append(f"<p class='note'><b>{esc(v.note)}</b></p>")
        text.append(v.note)
    tokens = "tokens" if v.expert is None else "routed tokens"
    if any(e.get("hist") for e in v.skills):  # an expert no token was routed to has none
        fig, axes = paper_figure(height=2.0)
        which = "" if v.expert is None else f" = expert {v.expert} #{v.expert_neuron}"
        draw_histograms(axes[0, 0], v.skills, f"{v.site} activation (layer {v.layer}, "
                        f"neuron {v.neuron}{which})")
        body.append("<p class='note'>Activation histograms per skill (solid: counted values; "
                    "dashed: fitted Gaussian N(mean, std))</p>"
                    + figure_img(fig, f"activation histogram of {where}"))
    for e in v.skills:
        body.append(f"<h4>Top activating contexts: {esc(e['skill'])}</h4><p class='note'>"
                    f"{e['n_items']} items, {e['count']} {tokens}, source "
                    f"{esc(e['source'] or 'n/a')}, items sha256 "
                    f"{esc(short_hash(e['hash'], 16))}; mean {e['mean']:.4g}, std {e['std']:.4g}"
                    f"</p>")
        if not e["count"]:
            why = "." if v.expert is None else f": none was routed to expert {v.expert}."
            body.append(f"<p class='note'>No token of this skill reached this neuron{why}</p>")
        body.append(table(["#", "activation", "context (activating token marked)", "item",
                           "token position"], _context_rows(e["contexts"]), raw=True))
        text.append(f"{e['skill']}: mean {e['mean']:.4g}, std {e['std']:.4g}; top: "
                    + "; ".join(f"{c['value']:.3g} {c['token']!r}" for c in e["contexts"][:5]))
    if v.promoted:
        rows = [[_visible(p[0]), f"{p[1]:.3g}", _visible(s[0]), f"{s[1]:.3g}"]
                for p, s in zip(v.promoted, v.suppressed)]
        body.append("<h4>Vocabulary projection of its value vector (W_U v)</h4>"
                    + table(["promoted token", "logit", "suppressed token", "logit"], rows,
                            raw=True))
        text.append(text_table(["promoted", "logit"], [[repr(p[0]), f"{p[1]:.3g}"]
                                                       for p in v.promoted[:5]]))
    return Display("".join(body), "\n".join(text), head)
