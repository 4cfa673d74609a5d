"""Notebook displays of :class:`~skilllens.core.loaded_model.LoadedModel` and
:class:`~skilllens.core.collect.StatsCollection` (HTML via :mod:`skilllens.display`, text for
terminals). The classes call these from ``_repr_html_``/``__repr__``."""
from __future__ import annotations

from skilllens.display import Display, esc, figure_img, kv_table, short_hash, small_multiples, table


def model_facts(lm) -> dict:
    """Architecture, layers, widths, sites, dtype, device and fingerprint id of ``lm``."""
    d = lm.adapter.describe()
    p = next(lm.model.parameters())
    fp = lm.fingerprint
    return {"name": lm.name, "architecture": d["architecture"], "model type": d["model_type"],
            "layers": d["layers"], "d_model": d["d_model"], "d_ff": d["d_ff"],
            "sites": ", ".join(d["sites"]), "dtype": str(p.dtype).replace("torch.", ""),
            "device": str(p.device), "parameters": f"{fp.get('n_params', 0):,}",
            "fingerprint": f"{fp.get('id')} (weights sha256 {short_hash(fp.get('weights'))})"}


def model_display(lm) -> Display:
    f = model_facts(lm)
    text = (f"LoadedModel({f['name']!r}: {f['architecture']}, {f['layers']} layers, d_model "
            f"{f['d_model']}, d_ff {f['d_ff']}, sites {f['sites']}, {f['dtype']} on "
            f"{f['device']}, fingerprint {f['fingerprint'].split()[0]})")
    body = f"<h3>LoadedModel <code>{esc(f['name'])}</code></h3>" + kv_table(f)
    return Display(body, text, f"model {f['name']}")


def _summary_rows(sc) -> tuple[list[str], list[list]]:
    sites = sorted({s for s, _ in sc.stats})
    head = ["site", "layers", "neurons", "values per neuron", "statistics", "mean of means",
            "mean std"]
    rows = []
    for s in sites:
        layers = sc.layers(s)
        first = sc.stats[(s, layers[0])]
        means, stds = sc.stacked(s, "mean"), sc.stacked(s, "std")
        span = f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
        rows.append([s, f"{len(layers)} ({span})", first.d, f"{int(first.count.max()):,}",
                     ", ".join(first.stats), f"{float(means.mean()):.4g}",
                     f"{float(stds.mean()):.4g}"])
    return head, rows


def stats_display(sc, stat: str = "mean", site: str | None = None,
                  figure: bool = True) -> Display:
    """Sites x layers summary plus, for ``site`` (default the first), a small multiple of the
    per-neuron ``stat`` of each layer (histogram over the layer's neurons)."""
    from skilllens.display import text_table

    m = sc.meta
    head, rows = _summary_rows(sc)
    facts = {"data": m.get("data"), "source": m.get("data_source"),
             "data hash": short_hash(m.get("data_hash")), "items": m.get("n_items"),
             "tokens": m.get("n_tokens"), "model": m.get("model"),
             "fingerprint": (m.get("fingerprint") or {}).get("id")}
    args = m.get("args") or {}
    if args:
        facts["token selection"] = args.get("tokens")
    text = (f"StatsCollection({m.get('data')!r}, {len(sc.stats)} site/layer entries, "
            f"{m.get('n_tokens')} tokens)\n" + text_table(head, rows))
    body = ("<h3>StatsCollection</h3>" + kv_table({k: v for k, v in facts.items()
                                                   if v is not None}) + table(head, rows))
    sites = sorted({s for s, _ in sc.stats})
    site = site or (sites[0] if sites else None)
    if site is not None and figure:
        try:
            vals = sc.stacked(site, stat).numpy()
        except Exception as e:  # a statistic that was not collected: say so, draw nothing
            body += f"<p class='note'>{esc(e)}</p>"
        else:
            layers = sc.layers(site)
            fig = small_multiples({f"layer {l}": v for l, v in zip(layers, vals)},
                                  xlabel=f"{stat} of {site} activation per neuron")
            body += (f"<h4>{esc(stat)} per neuron, site {esc(site)}, one panel per layer</h4>"
                     + figure_img(fig, f"{stat} per neuron at {site}, per layer"))
    return Display(body, text, "statistics")
