"""Notebook display of a :class:`~skilllens.grafting.localizer.GraftLocalizer`: parameters, the
task and models it was fitted on, and the grafted region (entries per parameter tensor)."""
from __future__ import annotations

from skilllens.display import Display, esc, kv_table, table


def localizer_display(loc) -> Display:
    params = {"sparsity": loc.sparsity, "steps": loc.steps, "lr": loc.lr, "bias": loc.bias,
              "l1": loc.l1, "optimizer": loc.optimizer, "include": loc.include,
              "exclude": loc.exclude}
    res = getattr(loc, "result_", None)
    if res is None:
        return Display("<h3>GraftLocalizer (not fitted)</h3>" + kv_table(params),
                       f"GraftLocalizer(sparsity={loc.sparsity:g}, steps={loc.steps}; not fitted)",
                       "GraftLocalizer")
    meta = getattr(loc, "meta_", {}) or {}
    fitted = {"task": meta.get("task"),
              "base model fingerprint": (meta.get("fingerprint") or {}).get("id"),
              "fine-tuned model fingerprint": (meta.get("finetuned_fingerprint") or {}).get("id"),
              "selected / eligible parameters": f"{res.n_selected:,} / {res.n_eligible:,} "
                                                f"({res.sparsity:.3g}; target "
                                                f"{res.sparsity_target:.3g})",
              "base patch": f"{res.n_base:,}", "best step": res.best_step}
    rows = sorted(((n, int(m.sum()), m.numel()) for n, m in loc.masks_.items()),
                  key=lambda r: -r[1])
    table_rows = [[n, f"{k:,}", f"{k / t:.2e}"] for n, k, t in rows[:30]]
    text = (f"GraftLocalizer(sparsity={loc.sparsity:g}, steps={loc.steps}; {res.n_selected} of "
            f"{res.n_eligible} parameters in {len(rows)} tensors)")
    body = (f"<h3>GraftLocalizer: {res.n_selected:,} parameters grafted</h3><h4>Parameters</h4>"
            + kv_table(params) + "<h4>Fitted on</h4>" + kv_table(fitted)
            + f"<h4>Grafted entries per tensor (top {len(table_rows)} of {len(rows)})</h4>"
            + table(["parameter", "entries", "share of tensor"], table_rows))
    return Display(body, text, "GraftLocalizer " + esc(loc.optimizer))
