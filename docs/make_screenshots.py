"""Make the README screenshots (docs/img/*.png) with skilllens' own code: a small audit of the
embedded SmolLM2-135M, its report.html, and the neuron view of the top Neuron Adjust neuron,
each shot in headless Chromium (tests/_browser.py).

    python docs/make_screenshots.py [--audit DIR]   # DIR: reuse an existing audit folder
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import skilllens  # noqa: E402
from _browser import Browser  # noqa: E402
from skilllens.unlearning.audit import AuditConfig, run_audit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audit", help="an audit folder to reuse (default: run a small audit)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    lm = skilllens.load_model("smollm2-135m")
    audit = Path(args.audit) if args.audit else Path(tempfile.mkdtemp(prefix="shots-"))
    if not (audit / "results.json").exists():
        run_audit(AuditConfig(probe_items=8, eval_items=4, max_length=128, out=str(audit),
                              progress=False), lm=lm)
    res = json.loads((audit / "results.json").read_text())
    na = next(v for v in res["neuron_views"] if v["method"].startswith("na"))
    view = skilllens.show_neuron(lm, na["site"], na["layer"], na["neuron"],
                                 skills="gsm8k,humaneval,xquad-en", k=6, max_items=16,
                                 max_length=160)
    page = view.save(Path(tempfile.mkdtemp(prefix="shots-")) / "neuron.html")
    with Browser() as b:
        b.visit(page, 860, 1250, screenshot=out / "neuron_view.png")
        b.visit(audit / "report.html", 1100, 1500, screenshot=out / "report.png")
    print(f"wrote {out / 'neuron_view.png'} and {out / 'report.png'} (audit {audit}, neuron "
          f"{na['site']} L{na['layer']} n{na['neuron']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
