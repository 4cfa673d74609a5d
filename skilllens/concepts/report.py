"""Write ``results.json``, figures (PNG + SVG, drawn from the saved results) and ``report.md``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import write_json, write_text


def _save(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        paths.append(str(p))
    return paths


def plot_results(results: dict, out: str | os.PathLike) -> list[str]:
    """Top-token table, per-layer location of concept vectors and candidates, before/after bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["concepts"]
    names = [r["concept"] for r in rows]
    files = []
    # 1. top tokens table
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1))
    ax.axis("off")
    cells = [[r["concept"], f"{r['layer']}/{r['index']}",
              " ".join(repr(t)[1:-1] for t in r["top_tokens"][:10])] for r in rows]
    tab = ax.table(cellText=cells, colLabels=["concept", "layer/index", "top tokens"],
                   loc="center", cellLoc="left", colWidths=[0.18, 0.1, 0.72])
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    files += _save(fig, out, "top_tokens")
    plt.close(fig)
    # 2. where concept vectors sit per layer
    fig, ax = plt.subplots(figsize=(7, 3.2))
    cand_layers = [c["layer"] for r in rows for c in r.get("candidates", [])]
    n_layers = max([r["layer"] for r in rows] + cand_layers) + 1
    bins = [x - 0.5 for x in range(n_layers + 1)]
    ax.hist(cand_layers, bins=bins, alpha=0.5, label="search candidates")
    ax.hist([r["layer"] for r in rows], bins=bins, alpha=0.9, label="selected vector")
    ax.set_xlabel("layer")
    ax.set_ylabel("count")
    ax.legend()
    ax.set_title("Where concept vectors sit")
    files += _save(fig, out, "layers")
    plt.close(fig)
    # 3. before/after bars per concept (BLEU against the original answers; before = 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
    x = range(len(rows))
    w = 0.4
    axes[0].bar([i - w / 2 for i in x], [r["concept_qa"]["bleu"] for r in rows], w, label="concept QA")
    axes[0].bar([i + w / 2 for i in x], [r["unrelated_qa"]["bleu"] for r in rows], w,
                label="unrelated QA")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--", label="before (=1)")
    axes[0].set_ylabel("BLEU vs original answers")
    axes[0].set_ylim(0, 1.05)
    lp_b = [r["concept_qa"].get("logprob_before", 0) for r in rows]
    lp_a = [r["concept_qa"].get("logprob_after", 0) for r in rows]
    axes[1].bar([i - w / 2 for i in x], lp_b, w, label="before")
    axes[1].bar([i + w / 2 for i in x], lp_a, w, label="after")
    axes[1].set_ylabel("concept QA: log-prob / token of original answers")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"method={results['settings']['method']}")
    files += _save(fig, out, "before_after")
    plt.close(fig)
    if any("comparison" in r for r in rows):
        methods = [results["settings"]["method"]] + list(results["settings"].get("compare", []))
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for j, (key, title) in enumerate([("concept_qa", "concept QA BLEU"),
                                          ("unrelated_qa", "unrelated QA BLEU"),
                                          ("cosine", "cosine(original, edited vector)")]):
            for mi, m in enumerate(methods):
                vals = []
                for r in rows:
                    e = r if m == results["settings"]["method"] else r.get("comparison", {}).get(m)
                    if e is None:
                        vals.append(float("nan"))
                    else:
                        vals.append(e["intrinsic"]["cosine"] if key == "cosine" else e[key]["bleu"])
                axes[j].bar([i + (mi - len(methods) / 2) * 0.8 / len(methods) for i in x], vals,
                            0.8 / len(methods), label=m)
            axes[j].set_title(title, fontsize=9)
            axes[j].set_xticks(list(x))
            axes[j].set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        axes[0].legend(fontsize=7)
        files += _save(fig, out, "comparison")
        plt.close(fig)
    return files


def report_markdown(results: dict) -> str:
    """A Markdown summary of the results."""
    from .experiment import target_reached

    s, rows = results["settings"], results["concepts"]
    hit = sum(target_reached(r) for r in rows)
    lines = [f"# Concept vectors: {results.get('meta', {}).get('model', 'model')}", "",
             f"Method `{s['method']}` (sigma {s['sigma']}), greedy answers of up to "
             f"{s['max_new_tokens']} new tokens, dtype {results.get('meta', {}).get('dtype')}. "
             f"BLEU / ROUGE-L are against the unedited model's answers (1 = unchanged).", "",
             f"Target (concept-QA BLEU <= 0.6 and unrelated-QA BLEU >= 0.9): **{hit} of "
             f"{len(rows)}** concepts.", "",
             "| concept | layer | index | top tokens | concept BLEU | concept ROUGE-L | "
             "unrelated BLEU | unrelated ROUGE-L | cosine | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        toks = ", ".join(repr(t)[1:-1].replace("|", "\\|") for t in r["top_tokens"][:8])
        lines.append(f"| {r['concept']} | {r['layer']} | {r['index']} | {toks} | "
                     f"{r['concept_qa']['bleu']:.3f} | {r['concept_qa']['rougeL']:.3f} | "
                     f"{r['unrelated_qa']['bleu']:.3f} | {r['unrelated_qa']['rougeL']:.3f} | "
                     f"{r['intrinsic']['cosine']:.3f} | {'yes' if target_reached(r) else 'no'} |")
    if any(r.get("validation") for r in rows):
        lines += ["", "## Causal validation of the candidates", "",
                  f"Screened: the {s.get('n_candidates')} best search candidates, by the teacher-"
                  f"forced log-prob drop of the original concept answers under `"
                  f"{s.get('screen_method')}`; validated: the {s.get('n_validate')} best, by "
                  f"regenerating the answers. The chosen vector has the lowest concept BLEU among "
                  f"those with unrelated BLEU >= {s.get('min_unrelated_bleu', 0.9)}; unrelated "
                  f"answers are generated only until one passes ('-' = not generated).", "",
                  "| concept | layer | index | search rank | top tokens | concept log-prob drop | "
                  "concept BLEU | concept ROUGE-L | unrelated BLEU | chosen |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for v in r.get("validation", []):
                toks = ", ".join(repr(t)[1:-1].replace("|", "\\|") for t in v["top_tokens"][:6])
                u = v.get("unrelated_qa")
                ub = "-" if u is None else f"{u['bleu']:.3f}"
                lines.append(f"| {r['concept']} | {v['layer']} | {v['index']} | "
                             f"{v['search_rank']} | {toks} | {v['concept_drop']:.3f} | "
                             f"{v['concept_qa']['bleu']:.3f} | {v['concept_qa']['rougeL']:.3f} | "
                             f"{ub} | "
                             f"{'**yes**' if v['chosen'] else ''} |")
    if any("multi" in r for r in rows):
        lines += ["", "## Several vectors ablated together", "",
                  "| concept | vectors | concept BLEU | unrelated BLEU |", "|---|---|---|---|"]
        for r in rows:
            if "multi" in r:
                m = r["multi"]
                lines.append(f"| {r['concept']} | {', '.join(f'{a}/{b}' for a, b in m['vectors'])} | "
                             f"{m['concept_qa']['bleu']:.3f} | {m['unrelated_qa']['bleu']:.3f} |")
    if any("comparison" in r for r in rows):
        lines += ["", "## Unlearning comparison (same vector)", "",
                  "| concept | method | concept BLEU | unrelated BLEU | completions BLEU | cosine | "
                  "L2 | Jaccard top-200 | article share after |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for m, e in [(s["method"], r)] + list(r.get("comparison", {}).items()):
                comp = e.get("completions", {}).get("bleu")
                i = e["intrinsic"]
                lines.append(f"| {r['concept']} | {m} | {e['concept_qa']['bleu']:.3f} | "
                             f"{e['unrelated_qa']['bleu']:.3f} | "
                             f"{'-' if comp is None else f'{comp:.3f}'} | {i['cosine']:.3f} | "
                             f"{i['l2']:.3f} | {i['jaccard_top']:.3f} | {i['article_share_after']:.3f} |")
    probes = sorted({k for r in rows for k in r if k in ("in_context", "role_play")
                     or k.startswith("translated:")})
    if probes:
        lines += ["", "## Robustness probes (BLEU vs the original model under the same prompt)", "",
                  "| concept | method | " + " | ".join(probes) + " |",
                  "|---" * (len(probes) + 2) + "|"]
        for r in rows:
            for m, e in [(s["method"], r)] + list(r.get("comparison", {}).items()):
                lines.append(f"| {r['concept']} | {m} | " + " | ".join(
                    f"{e[p]['bleu']:.3f}" if p in e else "-" for p in probes) + " |")
    lines += ["", "Figures: `top_tokens.png`, `layers.png`, `before_after.png`"
              + (", `comparison.png`" if any("comparison" in r for r in rows) else "") + "."]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: str | os.PathLike) -> dict[str, list[str] | str]:
    """Save ``results.json``, then draw the figures and ``report.md`` from the saved file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    saved = json.loads((out / "results.json").read_text())
    figs = plot_results(saved, out)
    write_text(out / "report.md", report_markdown(saved))
    return {"results": str(out / "results.json"), "figures": figs, "report": str(out / "report.md")}
