"""Notebook display of one :class:`~skilllens.stats.neuron_stats.NeuronStats`: the statistics it
holds, a summary over its neurons and the histogram of per-neuron means."""
from __future__ import annotations

from skilllens.display import Display, figure_img, paper_figure, table, text_table


def neuron_stats_display(st, figure: bool = True) -> Display:
    rows = []
    for name in ("count", "mean", "std", "min", "max", "mean_abs", "frac_pos"):
        try:
            v = getattr(st, name).double()
        except Exception:  # not collected
            continue
        rows.append([name, f"{float(v.min()):.4g}", f"{float(v.median()):.4g}",
                     f"{float(v.max()):.4g}"])
    head = ["statistic", "min over neurons", "median", "max"]
    hist = st.histogram is not None and st.histogram.lo is not None
    text = (f"NeuronStats(d={st.d}, stats={', '.join(st.stats)}, histogram="
            f"{'yes' if hist else 'no'})\n" + text_table(head, rows))
    body = (f"<h3>NeuronStats: {st.d} neurons</h3><p>statistics: {', '.join(st.stats)}"
            f"{'; histograms with ' + str(st.histogram.bins) + ' bins' if hist else ''}</p>"
            + table(head, rows))
    if figure and int(st.count.max()) > 0:
        fig, axes = paper_figure()
        axes[0, 0].hist(st.mean.double().cpu().numpy(), bins=40)
        axes[0, 0].set_xlabel("mean activation per neuron")
        axes[0, 0].set_ylabel("neurons")
        body += figure_img(fig, "histogram of per-neuron means")
    return Display(body, text, "neuron statistics")
