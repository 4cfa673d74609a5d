"""Audit figures, each drawn from a saved ``results.json`` dict (matplotlib, Agg).

``draw_all(results, folder, formats=("png", "svg"))`` writes whichever figures the results
support (add ``"pdf"`` on request) and returns their base names: ``relative_performance``,
``neurons_per_layer``, ``top_neuron_distributions``, ``detector_roc``, ``language_matrix``, ``expert_routing`` (mixture-of-experts models).
``CAPTIONS[name]`` says what each shows (the report prints it under the figure).

Paper style (:mod:`skilllens.display.style`): the colour-blind-safe Okabe-Ito palette (forget
bars also hatched, so the figures read in grey too), one-column (3.25 in) or two-column
(6.75 in) widths, axis labels with units. Distributions are the real histograms the audit saved
(``results["neuron_views"]``) with the fitted Gaussian dashed; each panel is a distinct neuron.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (kept: callers use figures.plt)
import numpy as np  # noqa: E402

from skilllens.display.style import PALETTE, paper_figure  # noqa: E402
from skilllens.io import save_figure  # noqa: E402

FORMATS = ("png", "svg")
CAPTIONS = {
    "relative_performance": "Relative score (after / before; < 1: worse) of each method on the "
                            "forget skill (hatched) and each retain skill, on held-out eval "
                            "items. Dotted: the forget target 0.2; dashed: unchanged (1.0).",
    "neurons_per_layer": "Number of neurons each method selected in each layer.",
    "top_neuron_distributions": "Activation histograms (solid; probe items, every token) of the "
                                "top neurons each method selected, per skill, with the fitted "
                                "Gaussian N(mean, std) dashed; every panel is a different "
                                "neuron.",
    "detector_roc": "KSD detector ROC on held-out forget vs retain queries, with the operating "
                    "point at the chosen alpha.",
    "language_matrix": "Relative score of each tested language (columns) after forgetting each "
                       "language (rows).",
}


def _save(fig, folder: Path, name: str, formats=FORMATS) -> str:
    save_figure(fig, Path(folder) / name, formats=tuple(formats), dpi=200)
    return name


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def relative_performance(results: dict, folder: Path, formats=FORMATS) -> str:
    """Grouped bars: relative score (after / before) per method and skill; 1 = unchanged."""
    methods = list(results["methods"])
    skills = [results["forget"], *results["retain"]]
    wide = len(methods) * len(skills) > 8
    fig, axes = paper_figure(width="page" if wide else "column", height=2.4)
    ax = axes[0, 0]
    width = 0.8 / max(len(skills), 1)
    x = np.arange(len(methods))
    for j, s in enumerate(skills):
        vals = [_num(results["methods"][m]["relative"].get(s)) for m in methods]
        forget = s == results["forget"]
        ax.bar(x + (j - (len(skills) - 1) / 2) * width, vals, width,
               label=f"{s} (forget)" if forget else s, color=PALETTE[j % len(PALETTE)],
               hatch="///" if forget else None, edgecolor="white", linewidth=0.3)
    ax.axhline(1.0, color="0.4", lw=0.7, ls="--")
    ax.axhline(0.2, color="0.2", lw=0.7, ls=":")
    ax.set_xticks(x, methods)
    ax.set_ylabel(f"relative {results['metric']}\n(after / before, unitless)")
    ax.set_xlabel("method")
    ax.legend(frameon=False, fontsize=6, ncol=min(3, len(skills)), loc="upper center",
              bbox_to_anchor=(0.5, 1.22))
    return _save(fig, folder, "relative_performance", formats)


def neurons_per_layer(results: dict, folder: Path, formats=FORMATS) -> str | None:
    neurons = results.get("neurons") or {}
    if not neurons:
        return None
    fig, axes = paper_figure(height=2.2)
    ax = axes[0, 0]
    for c, (name, info) in zip(PALETTE, neurons.items()):
        layers = sorted(int(l) for l in info["per_layer"])
        ax.plot(layers, [info["per_layer"][str(l)] for l in layers], marker="o", ms=2.5,
                color=c, label=f"{name} ({info['site']}, {info['n_selected']})")
    ax.set_xlabel("layer (index)")
    ax.set_ylabel("selected neurons (count)")
    ax.legend(frameon=False, fontsize=6)
    return _save(fig, folder, "neurons_per_layer", formats)


def _gaussian_panels(results: dict) -> list[tuple[str, dict]]:
    """Fallback without saved histograms: each method's top neurons not shown before."""
    seen, rows = set(), []
    for name, info in (results.get("neurons") or {}).items():
        n = 0
        for t in info["top"]:
            key = (info["site"], t["layer"], t["neuron"])
            if key in seen or n >= 2 or "mu_f" not in t:
                continue
            seen.add(key)
            rows.append((f"{name}: {info['site']} L{t['layer']} n{t['neuron']}", t))
            n += 1
    return rows


def top_neuron_distributions(results: dict, folder: Path, formats=FORMATS) -> str | None:
    """One panel per distinct top neuron: real histograms per skill + fitted Gaussians."""
    from skilllens.core.neuron_view_html import draw_histograms

    views = results.get("neuron_views") or []
    panels = [(f"{v['method']}: {v['site']} L{v['layer']} n{v['neuron']}"
               + ("" if v.get("expert") is None else f" (e{v['expert']})"), v) for v in views]
    if not panels:
        panels = _gaussian_panels(results)
    if not panels:
        return None
    cols = min(3, len(panels))
    n_r = math.ceil(len(panels) / cols)
    fig, axes = paper_figure(n_r, cols, width="page", height=1.7 * n_r + 0.3)
    for i, (ax, (title, v)) in enumerate(zip(axes.flat, panels)):
        if "skills" in v:
            draw_histograms(ax, v["skills"], f"{v['site']} activation (a.u.)", legend=False)
        else:  # Gaussians only (results without histograms)
            lo = min(v["mu_f"] - 4 * v["sd_f"], v["mu_r"] - 4 * v["sd_r"])
            hi = max(v["mu_f"] + 4 * v["sd_f"], v["mu_r"] + 4 * v["sd_r"])
            xs = np.linspace(lo, hi, 300)
            for c, (mu, sd, lab) in zip(PALETTE, ((v["mu_f"], v["sd_f"], "forget"),
                                                  (v["mu_r"], v["sd_r"], "retain"))):
                sd = max(sd, 1e-9)
                ax.plot(xs, np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
                        color=c, ls="--", label=lab)
            ax.set_xlabel("activation (a.u.)")
            ax.set_ylabel("density (1 / a.u.)")
        ax.set_title(title, fontsize=7)
        if i % cols:
            ax.set_ylabel("")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, [l.split(" (n=")[0] for l in labels], loc="upper center",
                   ncol=len(labels), frameon=False, fontsize=7, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(pad=0.4, rect=(0, 0, 1, 0.95))
    return _save(fig, folder, "top_neuron_distributions", formats)


def detector_roc(results: dict, folder: Path, formats=FORMATS) -> str | None:
    det = results.get("detector")
    if not det:
        return None
    return _save(roc_figure(det), folder, "detector_roc", formats)


def roc_figure(rep, width="column"):
    """ROC of a DetectorReport (dict or dataclass) with the operating point at its alpha."""
    g = rep if isinstance(rep, dict) else vars(rep)
    fig, axes = paper_figure(width=width, height=2.6)
    ax = axes[0, 0]
    ax.plot(g["roc_fpr"], g["roc_tpr"], label=f"ROC, AUC {g['auc']:.3f}")
    ax.scatter([g["fpr"]], [g["tpr"]], color="#D55E00", zorder=3, s=14,
               label=f"alpha = {g['alpha']:.3g}")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.7, ls="--", label="chance")
    ax.set_xlabel("false positive rate (retain queries abstained)")
    ax.set_ylabel("true positive rate (forget queries abstained)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", frameon=False)
    return fig


def language_matrix(results: dict, folder: Path, method: str | None = None,
                    formats=FORMATS) -> str | None:
    """Forgotten language (rows) x tested language (columns) relative scores."""
    mat = results.get("language_matrix")
    if not mat:
        return None
    names = [method] if method else list(mat["methods"])
    fig, axes = paper_figure(1, len(names), width="page" if len(names) > 2 else "column",
                             height=1.0 + 0.35 * len(mat["forgotten"]))
    for ax, m in zip(axes.flat, names):
        data = np.array([[_num(v) for v in row] for row in mat["methods"][m]])
        im = ax.imshow(data, vmin=0, vmax=1.2, cmap="cividis")
        ax.set_xticks(range(len(mat["tested"])), [t.replace("xquad-", "") for t in mat["tested"]])
        ax.set_yticks(range(len(mat["forgotten"])),
                      [t.replace("xquad-", "") for t in mat["forgotten"]])
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="white" if v < 0.6 else "black")
        ax.set_title(m)
        ax.set_xlabel("tested language")
        ax.set_ylabel("forgotten language")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="relative score (unitless)")
    return _save(fig, folder, "language_matrix", formats)


def expert_routing(results: dict, folder: Path, formats=FORMATS) -> str | None:
    """Expert-level localization: per skill, the share of its probe tokens routed to each expert
    (layers x experts); the experts deactivated for the forget skill are marked."""
    ex = results.get("experts")
    if not ex or not ex.get("shares"):
        return None
    skills = list(ex["shares"])
    fig, axes = plt.subplots(1, len(skills), figsize=(1.2 + 2.6 * len(skills), 2.8),
                             squeeze=False, sharey=True)
    vmax = max(max(max(r) for r in ex["shares"][s]) for s in skills) or 1.0
    for ax, s in zip(axes[0], skills):
        im = ax.imshow(np.array(ex["shares"][s]), aspect="auto", cmap="viridis", vmin=0,
                       vmax=vmax)
        for d in ex.get("deactivated", []):
            ax.scatter([d["expert"]], [ex["layers"].index(d["layer"])], marker="x", c="red", s=40)
        ax.set_title(f"{s} (forget)" if s == results["forget"] else s, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(ex["layers"])), ex["layers"])
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of tokens routed")
    fig.suptitle(f"{results['model']}: which experts each skill routes to (x: deactivated)", y=1.04,
                 fontsize=10)
    return _save(fig, folder, "expert_routing", formats)


def draw_all(results: dict, folder: str | Path, formats=FORMATS) -> list[str]:
    """Every figure ``results`` supports, in ``formats`` (``"pdf"`` too on request)."""
    folder = Path(folder)
    made = [relative_performance(results, folder, formats),
            neurons_per_layer(results, folder, formats),
            top_neuron_distributions(results, folder, formats),
            detector_roc(results, folder, formats), language_matrix(results, folder,
                                                                    formats=formats),
            expert_routing(results, folder, formats)]
    return [m for m in made if m]
