"""Notebook displays of a concept search (top tokens of each candidate value vector) and of a
column edit / concept ablation (which vector, how it is edited, fitted on which model)."""
from __future__ import annotations

from skilllens.display import Display, esc, kv_table, short_hash, table, text_table


def search_display(search, n_tokens: int = 12) -> Display:
    """``ConceptSearch``: parameters and, per concept, each candidate's layer, index, score,
    coverage and top vocabulary tokens."""
    cands = getattr(search, "candidates_", {}) or {}
    params = {"k": search.k, "n_candidates": search.n_candidates, "layers": search.layers,
              "through_norm": search.through_norm, "min_count": search.min_count,
              "min_chars": search.min_chars, "alpha": search.alpha,
              "name_weight": search.name_weight}
    fp = getattr(search, "fingerprint_", None) or {}
    head = ["rank", "layer", "index", "score", "coverage", "top tokens"]
    body = (f"<h3>ConceptSearch: {len(cands)} concepts</h3>" + kv_table(params)
            + (f"<p class='note'>model fingerprint {esc(fp.get('id'))}</p>" if fp else ""))
    texts = [f"ConceptSearch(k={search.k}, n_candidates={search.n_candidates}; "
             f"{len(cands)} concepts)"]
    for name, cs in cands.items():
        rows = [[r + 1, c.layer, c.index, f"{c.score:.4g}", f"{c.coverage:.2f}",
                 " | ".join(repr(t)[1:-1] for t in c.top_tokens[:n_tokens])]
                for r, c in enumerate(cs)]
        body += f"<h4>{esc(name)}</h4>" + table(head, rows)
        texts.append(f"{name}\n" + text_table(head, [r[:5] + [r[5][:60]] for r in rows]))
    return Display(body, "\n".join(texts), "concept search")


def edit_display(edit) -> Display:
    """``ConceptAblation`` / ``ColumnEdit``: the edited value vector and how."""
    name = type(edit).__name__
    facts = {"layer": edit.layer, "value vector (neuron) index": edit.index}
    for k in ("method", "sigma", "seed"):
        if hasattr(edit, k):
            facts[k] = getattr(edit, k)
    orig, new = getattr(edit, "original_", None), getattr(edit, "new_vector_", None)
    if orig is not None:
        facts["|v| before"] = f"{float(orig.double().norm()):.4g}"
    if new is not None:
        facts["|v| after"] = f"{float(new.double().norm()):.4g}"
    fp = getattr(edit, "fingerprint_", None) or {}
    if fp:
        facts["model fingerprint"] = f"{fp.get('id')} (weights {short_hash(fp.get('weights'))})"
    state = "fitted" if new is not None else "not fitted"
    text = f"{name}({', '.join(f'{k}={v}' for k, v in facts.items())}; {state})"
    return Display(f"<h3>{esc(name)} ({state})</h3>" + kv_table(facts), text, name)
