"""Audit figures, each drawn from a saved ``results.json`` dict (matplotlib, Agg; PNG + SVG).

``draw_all(results, folder)`` writes whichever figures the results support and returns their
base names: ``relative_performance``, ``neurons_per_layer``, ``top_neuron_distributions``,
``detector_roc``, ``language_matrix``, ``expert_routing`` (mixture-of-experts models).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from skilllens.io import save_figure  # noqa: E402


def _save(fig, folder: Path, name: str) -> str:
    save_figure(fig, Path(folder) / name)
    return name


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def relative_performance(results: dict, folder: Path) -> str:
    """Grouped bars: relative score (after / before) per method and skill; 1 = unchanged."""
    methods = list(results["methods"])
    skills = [results["forget"], *results["retain"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(methods) * len(skills) / 2, 3.6))
    width = 0.8 / max(len(skills), 1)
    x = np.arange(len(methods))
    for j, s in enumerate(skills):
        vals = [_num(results["methods"][m]["relative"].get(s)) for m in methods]
        label = f"{s} (forget)" if s == results["forget"] else s
        ax.bar(x + (j - (len(skills) - 1) / 2) * width, vals, width, label=label,
               hatch="//" if s == results["forget"] else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.2, color="red", lw=0.8, ls=":")
    ax.set_xticks(x, methods)
    ax.set_ylabel(f"relative {results['metric']} (after / before)")
    ax.set_title(f"{results['model']}: forget {results['forget']}")
    ax.legend(fontsize=8)
    return _save(fig, folder, "relative_performance")


def neurons_per_layer(results: dict, folder: Path) -> str | None:
    neurons = results.get("neurons") or {}
    if not neurons:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, info in neurons.items():
        layers = sorted(int(l) for l in info["per_layer"])
        ax.plot(layers, [info["per_layer"][str(l)] for l in layers], marker="o", ms=3,
                label=f"{name} ({info['site']}, {info['n_selected']} neurons)")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.legend(fontsize=8)
    return _save(fig, folder, "neurons_per_layer")


def top_neuron_distributions(results: dict, folder: Path) -> str | None:
    """Forget vs retain Gaussians N(mu, sd) of the top selected neurons of each method."""
    rows = [(name, t) for name, info in (results.get("neurons") or {}).items()
            for t in info["top"][:4]]
    if not rows:
        return None
    cols = 4
    n_r = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_r, cols, figsize=(3.2 * cols, 2.4 * n_r), squeeze=False)
    for ax, (name, t) in zip(axes.flat, rows):
        lo = min(t["mu_f"] - 4 * t["sd_f"], t["mu_r"] - 4 * t["sd_r"])
        hi = max(t["mu_f"] + 4 * t["sd_f"], t["mu_r"] + 4 * t["sd_r"])
        xs = np.linspace(lo, hi, 300)
        for mu, sd, lab in ((t["mu_f"], t["sd_f"], "forget"), (t["mu_r"], t["sd_r"], "retain")):
            sd = max(sd, 1e-9)
            ax.plot(xs, np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
                    label=lab)
        ax.set_title(f"{name}: L{t['layer']} n{t['neuron']}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("activation distributions of top neurons (fitted Gaussians)", fontsize=10)
    fig.tight_layout()
    return _save(fig, folder, "top_neuron_distributions")


def detector_roc(results: dict, folder: Path) -> str | None:
    det = results.get("detector")
    if not det:
        return None
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot(det["roc_fpr"], det["roc_tpr"], label=f"AUC {det['auc']:.3f}")
    ax.scatter([det["fpr"]], [det["tpr"]], color="red", zorder=3,
               label=f"alpha={det['alpha']:g}")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.7, ls="--")
    ax.set_xlabel("false positive rate (retain abstained)")
    ax.set_ylabel("true positive rate (forget abstained)")
    ax.set_title("KSD detector ROC", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, folder, "detector_roc")


def language_matrix(results: dict, folder: Path, method: str | None = None) -> str | None:
    """Forgotten language (rows) x tested language (columns) relative scores."""
    mat = results.get("language_matrix")
    if not mat:
        return None
    names = [method] if method else list(mat["methods"])
    fig, axes = plt.subplots(1, len(names), figsize=(1.0 + 0.6 * len(mat["tested"]) * len(names),
                                                     1.2 + 0.5 * len(mat["forgotten"])),
                             squeeze=False)
    for ax, m in zip(axes.flat, names):
        data = np.array([[_num(v) for v in row] for row in mat["methods"][m]])
        im = ax.imshow(data, vmin=0, vmax=1.2, cmap="viridis")
        ax.set_xticks(range(len(mat["tested"])), [t.replace("xquad-", "") for t in mat["tested"]])
        ax.set_yticks(range(len(mat["forgotten"])),
                      [t.replace("xquad-", "") for t in mat["forgotten"]])
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
        ax.set_title(m)
        ax.set_xlabel("tested")
        ax.set_ylabel("forgotten")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    return _save(fig, folder, "language_matrix")


def expert_routing(results: dict, folder: Path) -> str | None:
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
    return _save(fig, folder, "expert_routing")


def draw_all(results: dict, folder: str | Path) -> list[str]:
    folder = Path(folder)
    made = [relative_performance(results, folder), neurons_per_layer(results, folder),
            top_neuron_distributions(results, folder), detector_roc(results, folder),
            language_matrix(results, folder), expert_routing(results, folder)]
    return [m for m in made if m]
