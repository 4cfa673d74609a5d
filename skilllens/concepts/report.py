"""Write ``results.json``, figures (PNG + SVG, drawn from the saved results) and ``report.md``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from skilllens.io import save_figure, write_json, write_text


def _save(fig, out: Path, name: str) -> list[str]:
    return [str(p) for p in save_figure(fig, out / name, dpi=110)]


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
    cells = [[r["concept"], " ".join(f"{a}/{b}" for a, b in r.get("vectors", [[r["layer"], r["index"]]]))[:40],
              " ".join(repr(t)[1:-1] for t in r["top_tokens"][:10])] for r in rows]
    tab = ax.table(cellText=cells, colLabels=["concept", "layer/index", "top tokens"],
                   loc="center", cellLoc="left", colWidths=[0.18, 0.1, 0.72])
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    files += _save(fig, out, "top_tokens")
    # 2. where concept vectors sit per layer
    fig, ax = plt.subplots(figsize=(7, 3.2))
    cand_layers = [c["layer"] for r in rows for c in r.get("candidates", [])]
    n_layers = max([v[0] for r in rows for v in r.get("vectors", [[r["layer"]]])] + cand_layers) + 1
    bins = [x - 0.5 for x in range(n_layers + 1)]
    ax.hist(cand_layers, bins=bins, alpha=0.5, label="search candidates")
    ax.hist([v[0] for r in rows for v in r.get("vectors", [[r["layer"], r["index"]]])], bins=bins,
            alpha=0.9, label="selected vectors")
    ax.set_xlabel("layer")
    ax.set_ylabel("count")
    ax.legend()
    ax.set_title("Where concept vectors sit")
    files += _save(fig, out, "layers")
    # 3. before/after bars per concept (BLEU against the original answers; before = 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
    x = range(len(rows))
    w = 0.27
    ctrl = [r["control"]["concept_qa"]["bleu"] if "control" in r else float("nan") for r in rows]
    axes[0].bar([i - w for i in x], [r["concept_qa"]["bleu"] for r in rows], w, label="concept QA")
    axes[0].bar(list(x), ctrl, w, label="concept QA, random control")
    axes[0].bar([i + w for i in x], [r["unrelated_qa"]["bleu"] for r in rows], w,
                label="unrelated QA")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--", label="before (=1)")
    axes[0].set_ylabel("held-out BLEU vs original answers")
    axes[0].set_ylim(0, 1.05)
    w = 0.4
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
                    if e is None or "intrinsic" not in e:  # no comparison / no vector found
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
    return files


def _toks(ts, n: int) -> str:
    return ", ".join(repr(t)[1:-1].replace("|", "\\|") for t in ts[:n])


def _b(d: dict | None, key: str = "bleu") -> str:
    return "-" if not d else f"{d[key]:.3f}"


def report_markdown(results: dict) -> str:
    """A Markdown summary of the results (held-out numbers first, selection beside them)."""
    from skilllens.concepts.experiment import target_reached

    s, rows = results["settings"], results["concepts"]
    hit = sum(target_reached(r) for r in rows)
    meta = results.get("meta", {})
    lines = [f"# Concept vectors: {meta.get('model', 'model')}", "",
             f"Method `{s['method']}` (sigma {s['sigma']}), greedy answers of up to "
             f"{s['max_new_tokens']} new tokens (stopped at the answer's end), dtype "
             f"{meta.get('dtype')}. BLEU / ROUGE-L are against the unedited model's answers "
             f"(1 = unchanged). Vectors are chosen on the selection questions; the headline "
             f"numbers are on the held-out questions ({s.get('held_out')} of each set, seed "
             f"{s['seed']}; indices in `results.json`). Control: a layer-matched random set of "
             f"the same size.", "",
             f"Target (held-out concept BLEU <= 0.6, held-out unrelated BLEU >= 0.9, control "
             f"concept BLEU at least 0.3 higher): **{hit} of {len(rows)}** concepts.", "",
             "| concept | vectors | top tokens (first vector) | held-out concept BLEU | "
             "held-out concept ROUGE-L | held-out unrelated BLEU | selection concept BLEU | "
             "selection unrelated BLEU | control concept BLEU | control unrelated BLEU | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vecs = " ".join(f"{a}/{b}" for a, b in r.get("vectors", [[r["layer"], r["index"]]]))
        if not r.get("found", True):
            vecs = "none found (unedited scores)"
        sel, ctrl = r.get("selection", {}), r.get("control")
        lines.append(f"| {r['concept']} | {vecs} | {_toks(r['top_tokens'], 6)} | "
                     f"{r['concept_qa']['bleu']:.3f} | {r['concept_qa']['rougeL']:.3f} | "
                     f"{r['unrelated_qa']['bleu']:.3f} | {_b(sel.get('concept_qa'))} | "
                     f"{_b(sel.get('unrelated_qa'))} | {_b(ctrl and ctrl['concept_qa'])} | "
                     f"{_b(ctrl and ctrl['unrelated_qa'])} | {'yes' if target_reached(r) else 'no'} |")
    if any(r.get("screening") for r in rows):
        lines += ["", "## Selection (selection questions only)", "",
                  f"Pool: the {s.get('n_candidates')} vocabulary-projection candidates and the "
                  f"{s.get('n_attr')} vectors of highest attribution selectivity; screened by the "
                  f"teacher-forced greedy agreement (share of each original answer greedy decoding "
                  f"keeps) and log-prob drop (nats/token); greedy set of at most "
                  f"{s.get('max_vectors')} (unrelated agreement >= "
                  f"{s.get('min_unrelated_agreement')}); set size checked by regenerating the "
                  f"selection answers.", "",
                  "| concept | vector | source | attribution | concept agreement | unrelated "
                  "agreement | concept drop | unrelated drop | in set |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            chosen = {tuple(v) for v in r.get("vectors", [])}
            for v in r.get("screening", [])[:8]:
                lines.append(f"| {r['concept']} | {v['layer']}/{v['index']} | {v['source']} | "
                             f"{v['attribution']:.4f} | {v['concept_agreement']:.3f} | "
                             f"{v['unrelated_agreement']:.3f} | {v['concept_drop']:.4f} | "
                             f"{v['unrelated_drop']:.4f} | "
                             f"{'**yes**' if (v['layer'], v['index']) in chosen else ''} |")
    if any("comparison" in r for r in rows):
        lines += ["", "## Unlearning comparison (same vector)", "",
                  "| concept | method | concept BLEU | unrelated BLEU | completions BLEU | cosine | "
                  "L2 | Jaccard top-200 | article share after |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "comparison" not in r:
                continue
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
    missing = [r for r in rows if not r.get("found", True)]
    if missing:
        lines += ["", "## No vector found", ""] + [f"- {r['concept']}: {r['reason']}"
                                                   for r in missing]
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
