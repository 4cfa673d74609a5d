"""Metrics and figures for grafts: recovered fraction, ECE, mask overlap, mask location.

Masks are ``dict[str, BoolTensor]`` (parameter name -> mask of the parameter's shape). Every
figure function takes saved results (plain dicts / lists) and writes ``PATH.png`` + ``PATH.svg``.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

from skilllens.errors import DataError
from skilllens.io import save_figure

MODULE_TYPES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "norm", "other")
_TYPE_PATTERNS = [("qkv", ("c_attn", "query_key_value", "qkv_proj")), ("q", ("q_proj", "query")),
                  ("k", ("k_proj", "key")), ("v", ("v_proj", "value")),
                  ("o", ("o_proj", "attn.c_proj", "attention.dense", "attention.output.dense")),
                  ("gate", ("gate_proj",)), ("up", ("up_proj", "c_fc", "dense_h_to_4h", "fc1",
                                                    "intermediate.dense")),
                  ("down", ("down_proj", "mlp.c_proj", "dense_4h_to_h", "fc2", "output.dense")),
                  ("norm", ("norm", "ln_", "layernorm", "LayerNorm"))]


def recovered_fraction(pre: float, ft: float, graft: float, eps: float = 1e-9) -> float:
    """``(graft - pre) / (ft - pre)``; NaN when fine-tuning gained nothing (|ft - pre| < eps)."""
    gain = ft - pre
    return float("nan") if abs(gain) < eps else (graft - pre) / gain


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width confidence bins: ``sum_b |B|/n * |acc(B) - conf(B)|``.

    A confidence of exactly 0 falls in the first bin, 1 in the last."""
    conf = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
    corr = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    if conf.numel() == 0 or conf.numel() != corr.numel():
        raise DataError("ECE needs as many confidences as correctness flags (at least one)")
    if n_bins < 1:
        raise DataError("n_bins must be >= 1")
    bins = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    n = conf.numel()
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += float(sel.sum()) / n * abs(float(corr[sel].mean() - conf[sel].mean()))
    return ece


def mask_count(masks: dict) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def mask_overlap(a: dict, b: dict) -> dict:
    """``{"a_in_b": |a&b|/|b|, "jaccard": |a&b|/|a|b|, "intersection": |a&b|}`` (over the
    parameters both masks cover; a parameter missing from one mask counts as all False)."""
    inter = sum(int((a[n].to(b[n].device) & b[n]).sum()) for n in a if n in b)
    nb, na = mask_count(b), mask_count(a)
    union = na + nb - inter
    return {"a_in_b": inter / nb if nb else float("nan"),
            "jaccard": inter / union if union else float("nan"), "intersection": inter}


def overlap_matrix(masks: dict[str, dict]) -> dict:
    """For named masks: ``asymmetric[i][j] = |g_i & g_j| / |g_j|`` and ``jaccard[i][j]``."""
    names = list(masks)
    asym = [[mask_overlap(masks[i], masks[j])["a_in_b"] for j in names] for i in names]
    jac = [[mask_overlap(masks[i], masks[j])["jaccard"] for j in names] for i in names]
    return {"names": names, "asymmetric": asym, "jaccard": jac}


def precision_recall(predicted: dict, truth: dict) -> tuple[float, float]:
    """Entry-level precision and recall of ``predicted`` against ``truth``."""
    tp = sum(int((predicted[n].to(truth[n].device) & truth[n]).sum())
             for n in predicted if n in truth)
    npred, ntrue = mask_count(predicted), mask_count(truth)
    return (tp / npred if npred else 0.0), (tp / ntrue if ntrue else 0.0)


def module_type(name: str) -> str:
    """``q``/``k``/``v``/``o``/``qkv``/``gate``/``up``/``down``/``norm``/``other`` from a name."""
    for typ, keys in _TYPE_PATTERNS:
        if any(k in name for k in keys):
            return typ
    return "other"


def layer_of(name: str) -> int | None:
    m = re.search(r"(?:layers|layer|\.h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def mask_location(masks: dict) -> dict:
    """Where a mask sits: counts ``by_layer`` (``{layer: n}``), ``by_type`` and the full
    ``by_layer_type`` table (``{layer: {type: n}}``); ``total`` entries."""
    by_layer, by_type, table = OrderedDict(), OrderedDict((t, 0) for t in MODULE_TYPES), {}
    for n, m in masks.items():
        c = int(m.sum())
        layer, typ = layer_of(n), module_type(n)
        key = -1 if layer is None else layer
        by_layer[key] = by_layer.get(key, 0) + c
        by_type[typ] += c
        table.setdefault(key, {}).setdefault(typ, 0)
        table[key][typ] += c
    return {"total": sum(by_layer.values()), "by_layer": dict(sorted(by_layer.items())),
            "by_type": {k: v for k, v in by_type.items() if v or k in ("q", "k", "v", "o",
                                                                        "gate", "up", "down")},
            "by_layer_type": {k: table[k] for k in sorted(table)}}


def expert_location(masks: dict) -> dict:
    """Mixture-of-experts models: mask entries per expert, ``{layer: {expert: n}}``, from the
    3-D fused expert parameters (``...experts.gate_up_proj [E, ...]``, ``down_proj`` and
    their biases; the first axis is the expert)."""
    out: dict = {}
    for n, m in masks.items():
        if ".experts." not in n or m.dim() < 2:
            continue
        layer = layer_of(n)
        per = m.reshape(m.shape[0], -1).sum(1).tolist()
        row = out.setdefault(-1 if layer is None else layer, {})
        for e, c in enumerate(per):
            row[e] = row.get(e, 0) + int(c)
    return {k: out[k] for k in sorted(out)}


# ---------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_mask_location(location: dict, path, title: str = "where the graft sits") -> list[Path]:
    """Heatmap layer x module type of mask entries (from :func:`mask_location`)."""
    plt = _plt()
    table = {int(k): v for k, v in location["by_layer_type"].items()}
    layers = sorted(table)
    types = [t for t in MODULE_TYPES if any(table[l].get(t, 0) for l in layers)] or ["other"]
    grid = [[table[l].get(t, 0) for t in types] for l in layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(types), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(len(layers)), ["other" if l < 0 else str(l) for l in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mask entries")
    return save_figure(fig, path)


def plot_overlap_heatmap(matrix: dict, path, key: str = "asymmetric") -> list[Path]:
    """Heatmap of :func:`overlap_matrix` (``key``: ``asymmetric`` or ``jaccard``)."""
    plt = _plt()
    names, vals = matrix["names"], matrix[key]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 1.2 + 0.9 * len(names)))
    im = ax.imshow(vals, vmin=0, vmax=1, cmap="magma")
    for i in range(len(names)):
        for j in range(len(names)):
            v = vals[i][j]
            ax.text(j, i, "nan" if v != v else f"{v:.2f}", ha="center", va="center",
                    color="white" if (v != v or v < 0.6) else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title("|g_i & g_j| / |g_j|" if key == "asymmetric" else "Jaccard(g_i, g_j)")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def plot_recovery_curve(curves: dict[str, list[dict]], path) -> list[Path]:
    """Recovered fraction against actual sparsity; ``curves[task] = [{"sparsity",
    "recovered_fraction"}, ...]``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in curves.items():
        pts = sorted((p for p in pts if not math.isnan(p["recovered_fraction"])),
                     key=lambda p: p["sparsity"])
        if pts:
            ax.plot([p["sparsity"] * 100 for p in pts], [p["recovered_fraction"] for p in pts],
                    marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.9, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("graft size (% of eligible parameters)")
    ax.set_ylabel("recovered fraction")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_scores(scores: dict, path, title: str = "") -> list[Path]:
    """Bars of score and ECE for ``{"pre": {...}, "ft": {...}, "graft": {...}}``."""
    plt = _plt()
    names = list(scores)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for ax, key in zip(axes, ("score", "ece")):
        ax.bar(names, [scores[n][key] for n in names], color=["#999", "#c44", "#48c"][:len(names)])
        ax.set_title(key)
    fig.suptitle(title)
    return save_figure(fig, path)
