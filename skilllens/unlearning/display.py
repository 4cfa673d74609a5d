"""Notebook displays of the unlearning estimators (``NeuronAdjuster``, ``SelectivePruner``,
``KeySpaceDetector``), of a ``DetectorReport`` and of audit results.

Each shows the parameters, what the method was fitted on (skill names, sources, item hashes,
model fingerprint) and what it selected (neurons per layer, top neurons, the detector cube and
its calibration). Fitted attributes are read under both their names (``params`` and
``params_`` etc.), so the displays work before and after the trailing-underscore renaming.
"""
from __future__ import annotations

from skilllens.display import (Display, esc, figure_img, kv_table, paper_figure, short_hash,
                               table, text_table)


def _attr(obj, *names, default=None):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None and not callable(v):
            return v
    return default


def _fitted_on(obj) -> dict:
    meta = _attr(obj, "meta_", "meta", default={}) or {}
    fp = _attr(obj, "fingerprint_", "fingerprint", default=None) or {}
    out = {}
    for side in ("forget", "retain"):
        if side in meta:
            out[side] = meta[side]
            if meta.get(f"{side}_source"):
                out[f"{side} source"] = meta[f"{side}_source"]
            if meta.get(f"{side}_hash"):
                out[f"{side} items sha256"] = short_hash(meta[f"{side}_hash"], 16)
    if "n_probe" in meta:
        out["probe queries"] = meta["n_probe"]
    if fp:
        out["model fingerprint"] = f"{fp.get('id')} ({fp.get('architecture')}, " \
                                   f"{fp.get('n_layers')} layers)"
    return out


def _per_layer(obj) -> dict[int, int]:
    fn = getattr(obj, "selected_per_layer", None)
    return dict(fn()) if callable(fn) else {}


def _per_layer_figure(per_layer: dict[int, int], site: str) -> str:
    fig, axes = paper_figure(height=1.6)
    ax = axes[0, 0]
    ax.bar(list(per_layer), list(per_layer.values()), width=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"selected {site} neurons")
    return figure_img(fig, "selected neurons per layer")


def _top_rows(obj, n: int = 8) -> tuple[list[str], list[list]]:
    top = getattr(obj, "top_neurons", None)
    if callable(top):  # Neuron Adjust: the Gaussians of the top neurons
        rows = top(n)
        return (["layer", "neuron", "score", "forget mu (sd)", "retain mu (sd)"],
                [[r["layer"], r["neuron"], f"{r['score']:.4g}",
                  f"{r['mu_f']:.3g} ({r['sd_f']:.3g})", f"{r['mu_r']:.3g} ({r['sd_r']:.3g})"]
                 for r in rows])
    scores = _attr(obj, "scores_", "scores")
    selected = _attr(obj, "selected_", "selected", default={}) or {}
    layers = _attr(obj, "fitted_layers_", "fitted_layers", default=[]) or []
    if scores is None or not selected:
        return [], []
    flat = [(float(scores[layers.index(l), int(i)]), l, int(i))
            for l, idx in selected.items() for i in idx.tolist()]
    return (["layer", "neuron", "score (forget / retain mean |x|)"],
            [[l, i, f"{s:.4g}"] for s, l, i in sorted(flat, reverse=True)[:n]])


def estimator_display(obj) -> Display:
    """Parameters, fitted-on record and selected neurons of a NeuronAdjuster or
    SelectivePruner (works on an unfitted one too)."""
    name = type(obj).__name__
    params = obj.get_params()
    per_layer = _per_layer(obj)
    n_sel = sum(per_layer.values())
    fitted = bool(per_layer)
    site = params.get("site", "")
    head = ["layer", "selected neurons"]
    rows = [[l, n] for l, n in per_layer.items()]
    text = (f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})\n"
            + (f"fitted: {n_sel} {site} neurons over {len(per_layer)} layers\n"
               + "\n".join(f"  {k}: {v}" for k, v in _fitted_on(obj).items()) + "\n"
               + "selected per layer: " + ", ".join(f"L{l}:{n}" for l, n in per_layer.items())
               if fitted else "not fitted"))
    body = (f"<h3>{esc(name)}: {n_sel} {esc(site)} neurons selected</h3>" if fitted else
            f"<h3>{esc(name)} (not fitted)</h3>") + "<h4>Parameters</h4>" + kv_table(params)
    if fitted:
        body += "<h4>Fitted on</h4>" + kv_table(_fitted_on(obj))
        body += "<h4>Neurons selected per layer</h4>" + table(head, rows)
        body += _per_layer_figure(per_layer, site)
        th, tr = _top_rows(obj)
        if tr:
            body += "<h4>Top selected neurons</h4>" + table(th, tr)
    return Display(body, text, name)


def detector_display(ksd) -> Display:
    """A KeySpaceDetector: parameters, fitted-on record, the cube and its calibration."""
    params = ksd.get_params()
    k = _attr(ksd, "k_", "k")
    fitted = k is not None
    facts = {}
    if fitted:
        m = _attr(ksd, "m_", "m")
        facts = {"dimensions": int(m.numel()), "k (smallest cube holding the probe)": f"{k:.6g}",
                 "k exact (closed form)": f"{_attr(ksd, 'k_exact_', 'k_exact'):.6g}",
                 "cube": "m +- alpha * k * s", "alpha": f"{ksd.alpha:.4g}",
                 "zero-variance dims left out": ksd.n_degenerate_dims}
    cal = _attr(ksd, "calibration_", "calibration")
    cal_text = ("fixed by the user" if not cal else
                f"calibrated on {cal.get('n_retain_probe')} retain probe queries: max FPR "
                f"{cal.get('max_fpr')}, margin {cal.get('margin')}, upper bound "
                f"{cal.get('alpha_max')}, probe FPR {cal.get('retain_probe_fpr', float('nan')):.3f}")
    text = (f"KeySpaceDetector({', '.join(f'{a}={v!r}' for a, v in params.items())})\n"
            + ("not fitted" if not fitted else
               f"fitted: k={k:.4g}, alpha={ksd.alpha:.4g} ({cal_text})\n"
               + "\n".join(f"  {a}: {v}" for a, v in _fitted_on(ksd).items())))
    body = (f"<h3>KeySpaceDetector{'' if fitted else ' (not fitted)'}</h3><h4>Parameters</h4>"
            + kv_table(params))
    if fitted:
        body += ("<h4>Fitted on</h4>" + kv_table(_fitted_on(ksd)) + "<h4>Hypercube</h4>"
                 + kv_table(facts) + f"<h4>Detector calibration</h4><p>alpha {ksd.alpha:.4g}: "
                 f"{esc(cal_text)}</p>")
    return Display(body, text, "KeySpaceDetector")


def report_display(rep) -> Display:
    """A DetectorReport: AUC, the operating point, the ROC curve and the deciding dims."""
    from skilllens.unlearning.figures import roc_figure

    g = vars(rep)
    facts = {"ROC AUC (forget vs retain queries)": f"{g['auc']:.4f}",
             "alpha": f"{g['alpha']:.4g}", "k": f"{g['k']:.4g}",
             "TPR at alpha (forget abstained)": f"{g['tpr']:.3f}",
             "FPR at alpha (retain abstained)": f"{g['fpr']:.3f}",
             "queries (forget / retain)": f"{g['n_forget']} / {g['n_retain']}",
             "zero-variance dims left out": g["n_degenerate_dims"]}
    dims = [[d["dim"], d["n_rejected"]] for d in g["top_deciding_dims"][:12]]
    text = (f"DetectorReport(AUC {g['auc']:.4f}, alpha {g['alpha']:.4g}: TPR {g['tpr']:.3f}, "
            f"FPR {g['fpr']:.3f}; {g['n_forget']} forget / {g['n_retain']} retain queries)\n"
            + "deciding dims: " + ", ".join(f"{d}({n})" for d, n in dims))
    body = (f"<h3>DetectorReport: AUC {g['auc']:.4f}</h3>" + kv_table(facts)
            + figure_img(roc_figure(rep), f"ROC curve, AUC {g['auc']:.3f}")
            + "<h4>Deciding dimensions (retain queries each rejects)</h4>"
            + (table(["key dimension", "retain queries rejected"], dims) if dims else
               "<p>none: no retain query falls outside the cube</p>"))
    return Display(body, text, "DetectorReport")


class AuditResults(dict):
    """What :func:`run_audit` returns: the ``results.json`` dict, displayed in a notebook as
    its score and relative-performance tables (``repr`` gives the same tables as text)."""

    def display(self) -> Display:
        from skilllens.unlearning.report import _tables

        parts, texts = [], []
        for title, head, rows in _tables(self):
            parts.append(f"<h4>{esc(title)}</h4>" + table(head, rows))
            texts.append(f"{title}\n{text_table(head, rows)}")
        head = (f"Skill unlearning audit of {self.get('model')}: forget {self.get('forget')}, "
                f"retain {', '.join(self.get('retain', []))} ({self.get('metric')})")
        return Display(f"<h3>{esc(head)}</h3>" + "".join(parts), head + "\n\n"
                       + "\n\n".join(texts), "audit")

    def _repr_html_(self) -> str:
        return self.display()._repr_html_()

    def __repr__(self) -> str:
        return self.display().text
