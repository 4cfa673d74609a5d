"""Skill unlearning results on the embedded SmolLM2-135M (issue: skill unlearning audit, item 7).

Runs (or, with ``--reuse``, re-reads) two experiments and appends their tables to
``benchmarks/RESULTS.md`` with the date, machine and command:

1. an audit forgetting GSM8K and keeping HumanEval and XQuAD-en: KSD, Neuron Adjust at 0.5, 1.5
   and 3 %, Selective Pruning (``benchmarks/results/audit-gsm8k/results.json``);
2. the 7 x 7 XQuAD language matrix, forgetting each language and testing all seven, for KSD and
   Neuron Adjust (``benchmarks/results/language-matrix/language_matrix.json``).

    python benchmarks/unlearning.py                       # runs both (about 20 min on 2 cores)
    python benchmarks/unlearning.py --reuse               # tables from saved results only

Scores are teacher-forced token accuracy of the gold answers (the meaningful score for a 135M
model), relative to the unmodified model; KSD abstentions score 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LANGS = ["en", "de", "es", "ar", "zh", "vi", "hi"]


def run_gsm8k(out: Path, args) -> dict:
    from skilllens.unlearning.audit import AuditConfig, run_audit
    cfg = AuditConfig(probe_items=args.probe_items, eval_items=args.eval_items,
                      na_percent=[0.5, 1.5, 3.0], out=str(out), data_dir=args.data_dir,
                      progress=not args.no_progress)
    return run_audit(cfg)


def run_matrix(out: Path, args) -> dict:
    """The language matrix for ``--matrix-methods``; the rows of methods left out are kept from
    the saved ``language_matrix.json`` (listed in ``params.rows_kept_from``)."""
    from skilllens.io import write_json
    from skilllens.unlearning.audit import run_language_matrix
    from skilllens.unlearning.figures import language_matrix

    methods = tuple(m for m in args.matrix_methods.split(",") if m)
    saved = out / "language_matrix.json"
    old = json.loads(saved.read_text()) if saved.exists() else None
    res = run_language_matrix([f"xquad-{l}" for l in LANGS], out, methods=methods,
                              probe_items=args.matrix_probe_items,
                              eval_items=args.matrix_eval_items, alphas=(1.0, 2.0),
                              na_percent=1.5, data_dir=args.data_dir, max_length=384,
                              progress=not args.no_progress)
    kept = {k: v for k, v in (old or {}).get("methods", {}).items()
            if k.split("@")[0] not in methods}
    if kept:
        if old["baseline"] != res["baseline"]:
            raise SystemExit("the saved matrix has other baselines; rerun every method")
        res["methods"].update(kept)
        res["params"]["rows_kept_from"] = {k: f"previous run ({old['seconds']:.0f} s)"
                                           for k in kept}
        write_json(saved, res)
        language_matrix({"language_matrix": res}, out)
    return res


def gsm8k_table(res: dict) -> str:
    skills = [res["forget"], *res["retain"]]
    lines = ["| method | params | " + " | ".join(f"{s} rel." for s in skills) + " |",
             "|---|---|" + "---:|" * len(skills)]
    lines.append("| baseline (abs. score) | | " + " | ".join(
        f"{res['baseline'][s]['score']:.3f}" for s in skills) + " |")
    for name, m in res["methods"].items():
        p = m["params"]
        desc = (f"alpha={p['alpha']:.3g}{' (calibrated)' if p.get('calibration') else ''}, "
                f"k={p['k']:.2f}" if name == "ksd"
                else f"{p.get('percent', '')}%, rule={p.get('rule', 'mean|x| ratio')}")
        lines.append(f"| {name} | {desc} | " + " | ".join(
            f"{m['relative'][s]:.2f}" for s in skills) + " |")
    d = res.get("detector")
    if d:
        lines.append("")
        lines.append(f"KSD detector (forget {res['forget']} vs retain queries, "
                     f"{d['n_forget']} / {d['n_retain']} eval items): ROC AUC {d['auc']:.3f}, "
                     f"TPR {d['tpr']:.2f} and FPR {d['fpr']:.2f} at alpha {d['alpha']:g}; "
                     f"retain queries fall outside the cube on "
                     f"{min(d['retain_rejecting_dims'])}-{max(d['retain_rejecting_dims'])} of "
                     f"the d_ff dimensions.")
    sweep = res["methods"].get("ksd", {}).get("alpha_sweep")
    if sweep:
        lines += ["", "KSD over alpha (same items; relative score, abstention rate):", "",
                  "| alpha | " + " | ".join(skills) + " |", "|---:|" + "---:|" * len(skills)]
        for r in sweep:
            lines.append(f"| {r['alpha']:g} | " + " | ".join(
                f"{r['relative'][s]:.2f} ({r['abstention_rate'][s]:.2f})" for s in skills) + " |")
    t = res["manifest"]["timing_s"]
    lines.append("")
    lines.append(f"{res['manifest'].get('config', {}).get('probe_items', '?')} probe / "
                 f"{res['manifest'].get('config', {}).get('eval_items', '?')} eval items per "
                 f"skill; wall time {t['total']:.0f} s.")
    return "\n".join(lines)


def matrix_table(res: dict) -> str:
    langs = [t.replace("xquad-", "") for t in res["tested"]]
    out = [f"Baseline token accuracy: " + ", ".join(
        f"{l} {res['baseline'][t]:.3f}" for l, t in zip(langs, res["tested"])) + "."]
    for name, rows in res["methods"].items():
        out += ["", f"**{name}** (row: forgotten language, column: tested language, relative "
                f"score)", "", "| forgot \\ tested | " + " | ".join(langs) + " |",
                "|---|" + "---:|" * len(langs)]
        for f, row in zip(langs, rows):
            out.append(f"| {f} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        diag = [rows[i][i] for i in range(len(langs))]
        off = [rows[i][j] for i in range(len(langs)) for j in range(len(langs)) if i != j]
        out.append("")
        out.append(f"diagonal (forgotten language) mean {sum(diag) / len(diag):.2f}; "
                   f"off-diagonal mean {sum(off) / len(off):.2f}, min {min(off):.2f}; "
                   f"cells with retain >= 0.9: {sum(v >= 0.9 for v in off)}/{len(off)}.")
    if res.get("detector_auc"):
        out.append("")
        out.append("KSD ROC AUC per forgotten language (vs the other six): " + ", ".join(
            f"{k.replace('xquad-', '')} {v:.3f}" for k, v in res["detector_auc"].items()) + ".")
    p = res["params"]
    if p.get("calibrated_alpha"):
        out.append("")
        rule = ("largest held-out catch of its own probe items, cap" if p.get("calibration")
                else "upper bound")
        out.append(f"ksd@auto: alpha calibrated per forgotten language on probe items only "
                   f"({rule} {p['calibrate_max']:g}, at most "
                   f"{p.get('max_fpr', 0.05):.0%} of the other languages' probe items inside): "
                   + ", ".join(f"{k.replace('xquad-', '')} {v:.2f}"
                               for k, v in p["calibrated_alpha"].items()) + ".")
    out.append("")
    if p.get("rows_kept_from"):
        out.append("")
        out.append("Rows kept from the previous run (not re-measured here): "
                   + ", ".join(p["rows_kept_from"]) + ".")
    out.append(f"{p['probe_items']} probe / {p['eval_items']} eval items per language; wall "
               f"time {res['seconds']:.0f} s.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--reuse", action="store_true", help="only re-read saved results")
    ap.add_argument("--skip", default="", help="comma list of gsm8k,matrix to skip")
    ap.add_argument("--probe-items", type=int, default=64)
    ap.add_argument("--eval-items", type=int, default=24)
    ap.add_argument("--matrix-probe-items", type=int, default=24)
    ap.add_argument("--matrix-eval-items", type=int, default=12)
    ap.add_argument("--matrix-methods", default="ksd,na",
                    help="language matrix methods to run; the others' rows are kept from the "
                         "saved language_matrix.json")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    skip = set(filter(None, args.skip.split(",")))
    sections = []
    g_dir, m_dir = out / "audit-gsm8k", out / "language-matrix"
    if "gsm8k" not in skip:
        res = (json.loads((g_dir / "results.json").read_text()) if args.reuse
               else run_gsm8k(g_dir, args))
        sections.append("### Forget GSM8K, keep HumanEval and XQuAD-en\n\n" + gsm8k_table(res))
    if "matrix" not in skip:
        res = (json.loads((m_dir / "language_matrix.json").read_text()) if args.reuse
               else run_matrix(m_dir, args))
        sections.append("### XQuAD language matrix (7 x 7)\n\n" + matrix_table(res))
    text = "\n\n".join(sections)
    print(text)
    import torch
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(f"\n## Skill unlearning on SmolLM2-135M, {stamp}, {machine}\n\n"
                f"torch {torch.__version__}; command: `python benchmarks/unlearning.py "
                f"{' '.join(sys.argv[1:] if argv is None else argv)}`; results in "
                f"`{os.path.relpath(out, HERE.parent)}/`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
