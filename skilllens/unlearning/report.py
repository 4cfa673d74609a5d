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
        rel_rows.append([m] + [_fmt(v["relative"][s]) for s in skills])
    rel_def = results.get("relative_definition", "after / before")
    trunc = [["truncated to max_length"] + [str(base[s].get("n_truncated", "n/a")) for s in skills]]
    tables = [(f"Scores ({results['metric']}, eval items)", head, score_rows + trunc),
              (f"Relative performance ({rel_def}; target: forget <= 0.2, retain >= 0.9)",
               head, rel_rows)]
    if "ksd" in results["methods"]:
        ab = results["methods"]["ksd"].get("abstained", {})
        n = {s: base[s]["n_items"] for s in skills}
        tables.append(("KSD abstentions", ["skill", "abstained / items"],
                       [[s, f"{ab.get(s, 0)} / {n[s]}"] for s in skills]))
        sweep = results["methods"]["ksd"].get("alpha_sweep")
        if sweep:
            tables.append(("KSD relative performance over alpha (exact, from the same items)",
                           ["alpha"] + head[1:],
                           [[f"{r['alpha']:g}"] + [_fmt(r["relative"][s], 2) for s in skills]
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
    return tables


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
    return (f"calibration on {cal['n_retain_probe']} retain probe queries (upper bound "
            f"{cal['alpha_max']:g}, max FPR {cal['max_fpr']:g}, margin {cal['margin']:g}; "
            f"probe FPR {cal['retain_probe_fpr']:.3f})")


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(results: dict, figures: list[str]) -> str:
    man = results.get("manifest", {})
    out = [f"# Skill unlearning audit: {results['model']}", "",
           f"Forget **{results['forget']}**, retain {', '.join(results['retain'])}; metric "
           f"`{results['metric']}`. Relative performance: "
           f"{results.get('relative_definition', 'score after / score before')}. Abstention: "
           f"{results.get('abstention', 'an abstaining model scores 0 on that item')}.", ""]
    for title, head, rows in _tables(results):
        out += [f"## {title}", "", _md_table(head, rows), ""]
    out += ["## Figures", ""]
    out += [f"![{f}](figures/{f}.png)" for f in figures]
    out += ["", "## Reproducibility manifest", "", "```json",
            json.dumps(man, indent=2, default=str), "```", ""]
    return "\n".join(out)


def render_html(results: dict, figures: list[str]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>skilllens audit</title>"
             f"<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}"
             f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}"
             f"</style></head><body><h1>Skill unlearning audit: {esc(results['model'])}</h1>"
             f"<p>Forget <b>{esc(results['forget'])}</b>, retain "
             f"{esc(', '.join(results['retain']))}; metric {esc(results['metric'])}.</p>"]
    for title, head, rows in _tables(results):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                               for r in rows) + "</table>")
    parts.append("<h2>Figures</h2>")
    parts += [f"<p><img src='figures/{esc(f)}.svg' alt='{esc(f)}' style='max-width:100%'></p>"
              for f in figures]
    parts.append("<h2>Reproducibility manifest</h2><pre>"
                 + esc(json.dumps(results.get("manifest", {}), indent=2, default=str))
                 + "</pre></body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, results: dict | None = None) -> list[Path]:
    """Draw the figures from ``results`` (default: ``folder/results.json``) and write
    ``report.md`` and ``report.html``."""
    from skilllens.unlearning.figures import draw_all

    folder = Path(folder)
    if results is None:
        results = json.loads((folder / "results.json").read_text())
    figures = draw_all(results, folder / "figures")
    write_text(folder / "report.md", render_markdown(results, figures))
    write_text(folder / "report.html", render_html(results, figures))
    return [folder / "report.md", folder / "report.html"]
