"""Audit report: ``report.md`` and ``report.html`` from ``results.json``, with the figures and a
reproducibility manifest (versions, seeds, data hashes, model fingerprint, timing)."""
from __future__ import annotations

import html
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from skilllens.eval.scores import format_relative
from skilllens.io import write_text


def manifest(cfg, lm, parts: dict, timing: dict) -> dict:
    """Everything needed to reproduce an audit."""
    import numpy
    import sklearn
    import torch
    import transformers

    from skilllens._version import __version__

    return {
        "command": " ".join(sys.argv) if sys.argv and "skilllens" in sys.argv[0] else None,
        "config": asdict(cfg),
        "seeds": {"sampling": cfg.seed, "neuron_adjust": cfg.seed, "torch": cfg.seed},
        "versions": {"skilllens": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__, "scikit-learn": sklearn.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "device": str(lm.device)},
        "model_fingerprint": lm.fingerprint,
        "data": {s: {"source": p.source, "probe_hash": p.digest(), "probe_items": len(p),
                     "eval_hash": e.digest(), "eval_items": len(e)}
                 for s, (p, e) in parts.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "timing_s": timing,
    }


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    skills = [results["forget"], *results["retain"]]
    head = ["state"] + [f"{s} (forget)" if s == results["forget"] else s for s in skills]
    base = results["baseline"]
    score_rows = [["baseline"] + [_fmt(base[s]["score"]) for s in skills]]
    rel_rows = []
    for m, v in results["methods"].items():
        score_rows.append([m] + [_fmt(v["scores"][s]["score"]) for s in skills])
        rel_rows.append([m] + [format_relative(v["relative"][s], base[s]["score"])
                               for s in skills])
    rel_def = results.get("relative_definition", "after / before")
    trunc = [["truncated to max_length"] + [str(base[s].get("n_truncated", "n/a")) for s in skills]]
    data = results.get("data")
    tables = [("Items used (probe: fitting and calibration; eval: every score)",
               ["skill", "probe", "eval"],
               [[s, data[s]["probe"], data[s]["eval"]] for s in skills])] if data else []
    tables += [(f"Scores ({results['metric']}, eval items)", head, score_rows + trunc),
              (f"Relative performance ({rel_def}; target: forget <= 0.2, retain >= 0.9)",
               head, rel_rows)]
    if results.get("multiple_choice"):
        tables.append(_columns_table(results))
    if "ksd" in results["methods"]:
        ab = results["methods"]["ksd"].get("abstained", {})
        n = {s: base[s]["n_items"] for s in skills}
        tables.append(("KSD abstentions", ["skill", "abstained / items"],
                       [[s, f"{ab.get(s, 0)} / {n[s]}"] for s in skills]))
        sweep = results["methods"]["ksd"].get("alpha_sweep")
        if sweep:
            tables.append(("KSD relative performance over alpha (exact, from the same items)",
                           ["alpha"] + head[1:],
                           [[f"{r['alpha']:g}"] + [format_relative(r["relative"][s],
                                                                   base[s]["score"], 2)
                                                   for s in skills]
                            for r in sweep]))
    tables += _expert_tables(results, skills)
    det = results.get("detector")
    if det:
        dims = ", ".join(f"{d['dim']} ({d['n_rejected']})" for d in det["top_deciding_dims"][:8])
        rej = det["retain_rejecting_dims"]
        tables.append(("KSD detector", ["quantity", "value"], [
            ["k (binary search)", _fmt(det["k"], 4)], ["alpha", f"{det['alpha']:.4g}"],
            ["alpha chosen by", _calibration_text(results["methods"]["ksd"]["params"])],
            ["ROC AUC (forget vs retain queries)", _fmt(det["auc"])],
            ["TPR at alpha (forget abstained)", _fmt(det["tpr"])],
            ["FPR at alpha (retain abstained)", _fmt(det["fpr"])],
            ["dims rejecting a retain query (min / median / max)",
             f"{min(rej)} / {sorted(rej)[len(rej) // 2]} / {max(rej)}" if rej else "n/a"],
            ["top deciding dims (retain queries rejected)", dims or "none"],
            ["zero-variance dims left out", str(det["n_degenerate_dims"])]]))
    cal = results.get("methods", {}).get("ksd", {}).get("params", {}).get("calibration") or {}
    if cal.get("curve"):
        tables.append(("KSD calibration curve (probe items only; chosen alpha marked)",
                       ["alpha", "forget probe catch (held-out)", "retain probe FPR"],
                       [[f"{c['alpha']:.4g}" + (" (chosen)" if c["alpha"] == cal["alpha"]
                                                else ""),
                         _fmt(c["forget_probe_catch"], 2), _fmt(c["retain_probe_fpr"], 3)]
                        for c in cal["curve"]]))
    return tables


def _columns_table(results: dict) -> tuple[str, list[str], list[list[str]]]:
    """Forget / other skills / MMLU-Redux (lm-eval acc), as the unlearning papers report."""
    from skilllens.unlearning.columns import three_columns

    mc = results["multiple_choice"]
    skill = next(iter(mc["baseline"]))
    rows = [[r["state"], _fmt(r["forget"], 2), _fmt(r["other"], 2),
             f"{_fmt(r['mmlu_acc'])} ({_fmt(r['mmlu'], 2)})"
             + (" near chance" if r["mmlu_near_chance"] else "")]
            for r in three_columns(results)]
    return (f"Forget / other skills / {skill} (relative; {skill}: lm-eval acc (relative), "
            f"chance {mc['chance']:g})", ["state", f"forget ({results['forget']})",
                                          "other skills (mean)", f"{skill} acc"], rows)


def _expert_tables(results: dict, skills: list[str]) -> list:
    """Mixture-of-experts audits: the experts each skill uses most, and expert-level vs
    neuron-level forgetting on the same skills."""
    ex = results.get("experts")
    if not ex:
        return []
    rows = []
    for s in skills:
        for layer, shares in zip(ex["layers"], ex["shares"].get(s, [])):
            top = sorted(range(len(shares)), key=lambda e: -shares[e])[:3]
            rows.append([s, str(layer), ", ".join(f"{e} ({shares[e]:.2f})" for e in top)])
    cmp_rows = []
    for m, v in results["methods"].items():
        if m == "experts":
            units = f"{ex.get('n_selected', 0)} experts ({ex.get('mode', '')})"
        elif m in results.get("neurons", {}):
            units = f"{results['neurons'][m]['n_selected']} neurons"
        else:
            continue
        ret = [v["relative"][s] for s in skills[1:] if v["relative"].get(s) is not None]
        cmp_rows.append([m, units, _fmt(v["relative"].get(skills[0])),
                         _fmt(sum(ret) / len(ret) if ret else None)])
    return [("Experts each skill routes to (share of probe tokens; top 3 per layer)",
             ["skill", "layer", "experts (share)"], rows),
            ("Expert-level vs neuron-level forgetting (relative performance; "
             + "; ".join(ex.get("references", [])) + ")",
             ["method", "edited", "forget", "retain (mean)"], cmp_rows)]


def _calibration_text(params: dict) -> str:
    cal = params.get("calibration")
    if not cal:
        return "the user (fixed)"
    if "forget_probe_catch" not in cal:  # results written before the two-sided search
        return (f"calibration on {cal['n_retain_probe']} retain probe queries (upper bound "
                f"{cal['alpha_max']:g}, max FPR {cal['max_fpr']:g}, margin {cal['margin']:g}; "
                f"probe FPR {cal['retain_probe_fpr']:.3f})")
    return (f"calibration on probe items only: largest held-out catch of "
            f"{cal['n_forget_probe']} forget probe queries ({cal['forget_probe_catch']:.2f}) "
            f"with at most {cal['max_fpr']:g} of {cal['n_retain_probe']} retain probe queries "
            f"inside ({cal['retain_probe_fpr']:.3f}); searched over (0, {cal['alpha_cap']:g}], "
            f"feasible up to {cal['alpha_feasible_max']:.4g}, margin {cal['margin']:g}")


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _command(results: dict) -> str:
    cmd = (results.get("manifest") or {}).get("command")
    return cmd or "skilllens.run_audit(AuditConfig(...)) in Python (config in the manifest)"


def _caption(name: str, results: dict) -> str:
    from skilllens.unlearning.figures import CAPTIONS

    return (f"{CAPTIONS.get(name, name)} Drawn from results.json; made by: "
            f"{_command(results)}")


def _view_rows(results: dict) -> list[list[str]]:
    rows = []
    for v in results.get("neuron_views") or []:
        tops = "; ".join(f"{e['skill']}: " + (repr(e["contexts"][0]["token"]) + f" "
                                              f"{e['contexts'][0]['value']:.3g}"
                                              if e["contexts"] else "none")
                         for e in v["skills"])
        where = "" if v.get("expert") is None else \
            f" (expert {v['expert']} #{v['expert_neuron']}, routed tokens)"
        rows.append([v["method"], v["site"], str(v["layer"]), f"{v['neuron']}{where}", tops,
                     ", ".join(repr(t) for t, _ in v["promoted"][:5])])
    return rows


VIEW_HEAD = ["method", "site", "layer", "neuron", "top activating token per skill",
             "promoted tokens (W_U v)"]


def render_markdown(results: dict, figures: list[str]) -> str:
    man = results.get("manifest", {})
    out = [f"# Skill unlearning audit: {results['model']}", "",
           f"Forget **{results['forget']}**, retain {', '.join(results['retain'])}; metric "
           f"`{results['metric']}`. Relative performance: "
           f"{results.get('relative_definition', 'score after / score before')}. Abstention: "
           f"{results.get('abstention', 'an abstaining model scores 0 on that item')}.", ""]
    out += [f"**Warning:** {w}" for w in results.get("warnings", [])] + \
        ([""] if results.get("warnings") else [])
    for title, head, rows in _tables(results):
        out += [f"## {title}", "", _md_table(head, rows), ""]
    out += ["## Figures", ""]
    for f in figures:
        out += [f"![{f}](figures/{f}.png)", "", f"*{_caption(f, results)}*", ""]
    if results.get("neuron_views"):
        out += ["## Top neurons each method selected", "",
                "Contexts, histograms and vocabulary projections: see report.html.", "",
                _md_table(VIEW_HEAD, _view_rows(results)), ""]
    out += ["", "## Reproducibility manifest", "", "```json",
            json.dumps(man, indent=2, default=str), "```", ""]
    return "\n".join(out)


def render_html(results: dict, figures: list[str]) -> str:
    from skilllens.core.neuron_view import NeuronView
    from skilllens.display.html import CSS, table

    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>skilllens audit: {esc(results['model'])}</title>{CSS}"
             f"<style>body{{margin:0 auto;padding:0 12px;max-width:1000px}}"
             f"figure{{margin:1em 0}}figure img{{width:min(100%,680px)}}"
             f"figcaption{{font-size:12px;color:#444;max-width:680px}}"
             f"pre{{overflow-x:auto;font-size:11px}}</style></head><body class='skl'>"
             f"<h1>Skill unlearning audit: {esc(results['model'])}</h1>"
             f"<p>Forget <b>{esc(results['forget'])}</b>, retain "
             f"{esc(', '.join(results['retain']))}; metric {esc(results['metric'])}.</p>"]
    parts += [f"<p><b>Warning:</b> {esc(w)}</p>" for w in results.get("warnings", [])]
    for title, head, rows in _tables(results):
        parts.append(f"<h2>{esc(title)}</h2>" + table(head, rows))
    parts.append("<h2>Figures</h2>")
    parts += [f"<figure id='fig-{esc(f)}'><img src='figures/{esc(f)}.svg' alt='{esc(f)}'>"
              f"<figcaption>{esc(_caption(f, results))}</figcaption></figure>" for f in figures]
    views = results.get("neuron_views") or []
    if views:
        parts.append("<h2>Top neurons each method selected</h2><p>Each neuron on the probe "
                     "items of every skill: the contexts where it is most active (activating "
                     "token marked), its activation histogram with the fitted Gaussian, and the "
                     "tokens its value vector promotes and suppresses.</p>"
                     + table(VIEW_HEAD, _view_rows(results)))
        for v in views:
            d = {k: x for k, x in v.items() if k != "method"}
            parts.append(f"<section class='neuron'>{NeuronView.from_dict(d).display().html}"
                         f"</section>")
    parts.append("<h2>Reproducibility manifest</h2><pre>"
                 + esc(json.dumps(results.get("manifest", {}), indent=2, default=str))
                 + "</pre></body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, results: dict | None = None,
                 formats=("png", "svg")) -> list[Path]:
    """Draw the figures from ``results`` (default: ``folder/results.json``) in ``formats``
    (add ``"pdf"`` for a paper) and write ``report.md`` and ``report.html``."""
    from skilllens.unlearning.figures import draw_all

    folder = Path(folder)
    if results is None:
        results = json.loads((folder / "results.json").read_text())
    figures = draw_all(results, folder / "figures", formats)
    write_text(folder / "report.md", render_markdown(results, figures))
    write_text(folder / "report.html", render_html(results, figures))
    return [folder / "report.md", folder / "report.html"]
