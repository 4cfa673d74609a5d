"""Regenerate the paper-style skill unlearning figures from saved audit results.

Usage::

    python analyses/skill_unlearning.py figures AUDIT_DIR [AUDIT_DIR ...] --out FIG_DIR
    python analyses/skill_unlearning.py matrix --langs en,de,es,ar,zh,vi,hi --out runs/matrix \\
        [--methods ksd,na] [--probe-items 8] [--eval-items 6]

``figures`` reads each ``AUDIT_DIR/results.json`` (written by ``skilllens audit``) and draws:
relative performance per method and skill, the Neuron Adjust forget/retain trade-off over all
``na*`` entries (one point per percentage), and the forgotten x tested language matrix when a
``language_matrix.json`` is present. ``matrix`` runs the 7 x 7 XQuAD language experiment
(:func:`skilllens.unlearning.audit.run_language_matrix`) and draws it. Figures are PNG + SVG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from skilllens.unlearning import figures  # noqa: E402


def tradeoff(results: list[dict], out: Path) -> str | None:
    """Forget vs mean-retain relative score for every Neuron Adjust setting (+ KSD, SP)."""
    pts = []
    for res in results:
        for name, m in res["methods"].items():
            rel = m["relative"]
            retain = [rel[s] for s in res["retain"]]
            pts.append((name, m["params"].get("percent"), rel[res["forget"]],
                        sum(retain) / len(retain)))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    for name, pct, f, r in pts:
        ax.scatter(r, f, marker="o" if name.startswith("na") else "s")
        ax.annotate(name if pct is None or not name.startswith("na") else f"NA {pct:g}%",
                    (r, f), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.2, color="red", ls=":", lw=0.8)
    ax.axvline(0.9, color="red", ls=":", lw=0.8)
    ax.set_xlabel("mean relative score, retain skills")
    ax.set_ylabel("relative score, forget skill")
    ax.set_title("forget / retain trade-off (target: lower right)", fontsize=10)
    return figures._save(fig, out, "tradeoff")


def cmd_figures(args) -> int:
    out = Path(args.out)
    loaded = []
    for d in args.dirs:
        p = Path(d) / "results.json"
        if not p.exists():
            print(f"error: {p} not found; run 'skilllens audit --out {d}' first", file=sys.stderr)
            return 2
        res = json.loads(p.read_text())
        loaded.append(res)
        figures.draw_all(res, out / Path(d).name)
        mat = Path(d) / "language_matrix.json"
        if mat.exists():
            figures.language_matrix({"language_matrix": json.loads(mat.read_text())}, out)
    tradeoff(loaded, out)
    print(f"figures written under {out}")
    return 0


def cmd_matrix(args) -> int:
    from skilllens.unlearning.audit import run_language_matrix

    langs = [f"xquad-{l.strip()}" for l in args.langs.split(",") if l.strip()]
    res = run_language_matrix(langs, args.out, model=args.model,
                              methods=tuple(args.methods.split(",")),
                              probe_items=args.probe_items, eval_items=args.eval_items,
                              alphas=tuple(float(a) for a in args.alphas.split(",")),
                              na_percent=args.na_percent, max_length=args.max_length,
                              data_dir=args.data_dir, progress=not args.no_progress)
    for m, rows in res["methods"].items():
        print(f"{m} (rows: forgotten, columns: tested {', '.join(res['tested'])})")
        for f, row in zip(res["forgotten"], rows):
            print(f"  {f:9s} " + " ".join(f"{v:5.2f}" for v in row))
    print(f"detector AUC per forgotten language: "
          + ", ".join(f"{k} {v:.3f}" for k, v in res["detector_auc"].items()))
    print(f"{res['seconds']} s; wrote {args.out}/language_matrix.json")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figures", help="figures from saved audit folders")
    f.add_argument("dirs", nargs="+")
    f.add_argument("--out", default="figures")
    m = sub.add_parser("matrix", help="run the forgotten x tested language matrix")
    m.add_argument("--langs", default="en,de,es,ar,zh,vi,hi")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--methods", default="ksd,na")
    m.add_argument("--probe-items", type=int, default=8)
    m.add_argument("--eval-items", type=int, default=6)
    m.add_argument("--alphas", default="1,2")
    m.add_argument("--na-percent", type=float, default=1.5)
    m.add_argument("--max-length", type=int, default=256)
    m.add_argument("--data-dir", default=None)
    m.add_argument("--out", default="runs/language_matrix")
    m.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    return cmd_figures(args) if args.cmd == "figures" else cmd_matrix(args)


if __name__ == "__main__":
    sys.exit(main())
