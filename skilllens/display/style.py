"""Figure style shared by notebook displays and paper figures: the Okabe-Ito palette (safe for
the common colour-vision deficiencies; Okabe & Ito 2008, "Color Universal Design"), one-column
(3.25 in) and two-column (6.75 in) widths, small fonts that stay legible at print size."""
from __future__ import annotations

import math

#: Okabe-Ito colours, most distinguishable first (yellow last: weak on white)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
           "#F0E442")
#: paper widths in inches: one column and the full page of a two-column layout
COLUMN_WIDTH, PAGE_WIDTH = 3.25, 6.75
RC = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
      "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
      "axes.spines.right": False, "lines.linewidth": 1.2, "savefig.dpi": 200}


def paper_figure(nrows: int = 1, ncols: int = 1, width: str | float = "column",
                 height: float | None = None, **kw):
    """``plt.subplots`` at a paper size: ``width`` ``"column"`` (3.25 in), ``"page"``
    (6.75 in) or inches; ``height`` defaults to 2.2 in per row. Uses the Okabe-Ito colour cycle
    and small fonts (the style applies to this figure only). Returns ``(fig, axes)``."""
    import matplotlib

    matplotlib.use("Agg")  # idempotent; figures are drawn without a display
    import matplotlib.pyplot as plt
    from cycler import cycler

    w = {"column": COLUMN_WIDTH, "page": PAGE_WIDTH}.get(width, width)
    with plt.rc_context({**RC, "axes.prop_cycle": cycler(color=list(PALETTE))}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(float(w), height or 2.2 * nrows),
                                 squeeze=False, **kw)
    for ax in axes.flat:  # rc_context ends before drawing: apply the style to the axes
        ax.set_prop_cycle(color=list(PALETTE))
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        ax.title.set_fontsize(8)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    return fig, axes


def small_multiples(panels: dict, xlabel: str, ylabel: str = "neurons", bins: int = 30,
                    ncols: int = 6, width: str | float = "page"):
    """One small histogram per panel (``{title: 1-d array}``), e.g. a statistic's values over
    the neurons of each layer. Returns the figure."""
    import numpy as np

    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = paper_figure(nrows, ncols, width=width, height=1.25 * nrows + 0.35,
                             sharey=False)
    for ax, (title, vals) in zip(axes.flat, panels.items()):
        v = np.asarray(vals, dtype=float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, color=PALETTE[0])
        ax.set_title(str(title), fontsize=7, pad=2)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel(xlabel, fontsize=7)
    fig.supylabel(ylabel, fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig
