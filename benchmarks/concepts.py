"""Time the default ``skilllens concepts`` run (10 ConceptVectors dev concepts, SmolLM2-135M) and
record held-out results.

    python benchmarks/concepts.py                     # the default run, appends to RESULTS.md
    python benchmarks/concepts.py --threads 2         # e.g. re-time on an idle 2-core machine
    python benchmarks/concepts.py --names Poland --no-append --out /tmp/cv   # quick check

Prints a per-concept table (vectors, held-out concept / unrelated BLEU, control BLEU, seconds
per stage) and the wall time, with the load average before and after (the run shares the CPU
with whatever else runs: re-time on an idle machine for a clean number). The settings are
``ExperimentSettings()`` = the CLI's defaults, so the run equals
``skilllens concepts --out <out>`` apart from the thread count.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _record import command, record  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--names", default=None, help="comma-separated concept names (all 10)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concepts-default"))
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--compare-from", default=None, metavar="RESULTS_JSON",
                   help="instead of the default run: score zero ablation, Needle, GA and NPO on the "
                        "vectors a previous run found (held-out answers), e.g. "
                        "benchmarks/results/concepts-default/results.json")
    args = p.parse_args(argv)
    if args.compare_from:
        return compare(args, argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from skilllens import load_model
    from skilllens.concepts import load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from skilllens.concepts.report import write_report

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    lm = load_model(args.model)
    names = [x.strip() for x in args.names.split(",")] if args.names else None
    concepts = load_concepts(None, args.data_dir, names=names)
    res = run_concepts(lm, concepts, ExperimentSettings(), progress=False)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    machine = (f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads")
    res["meta"].update(wall_seconds=round(wall, 1), machine=machine,
                       load_before=[round(x, 2) for x in load0], load_after=[round(x, 2) for x in load1])
    write_report(res, args.out)
    rows = res["concepts"]
    hit = sum(target_reached(r) for r in rows)
    lines = ["| concept | vectors | held-out concept BLEU | held-out unrelated BLEU | control concept BLEU "
             "| control unrelated BLEU | selection concept / unrelated BLEU | target | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        sel = r.get("selection") or {}
        sc = sel.get("concept_qa", {}).get("bleu")
        su = (sel.get("unrelated_qa") or {}).get("bleu")
        ctrl = r.get("control") or {}
        vecs = " ".join(f"{a}/{b}" for a, b in r["vectors"]) if r.get("found", True) else \
            ("none found (" + " ".join(f"{a}/{b}" for a, b in r.get("greedy_vectors", [])) +
             f": selection unrelated BLEU {max(t['unrelated_qa']['bleu'] for t in r['size_choice']):.3f})"
             if r.get("size_choice") else "none found (no candidate passes the greedy rule)")
        lines.append(f"| {r['concept']} | {vecs} | "
                     f"{r['concept_qa']['bleu']:.3f} | {r['unrelated_qa']['bleu']:.3f} | "
                     f"{f(ctrl.get('concept_qa', {}).get('bleu'))} | "
                     f"{f(ctrl.get('unrelated_qa', {}).get('bleu'))} | "
                     f"{f(sc)} / {f(su)} | {'**yes**' if target_reached(r) else 'no'} | {r['seconds']} |")
    stages: dict[str, float] = {}
    for r in rows:
        for k, v in r.get("timing", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    cmd = command(__file__, argv)
    text = (f"\n## Concept vectors, default run (held-out split) — "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
            f"Machine: {machine}. Command (repository root): `{cmd}` (= `skilllens concepts "
            f"--out {Path(args.out).name}` with its defaults). Load average (1/5/15 min) before "
            f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after {load1[0]:.1f}/{load1[1]:.1f}/"
            f"{load1[2]:.1f}" + (": other jobs shared the CPU, so the wall time is an upper "
                                 "bound" if load0[0] > 1.0 else " (no other job running at the start)")
            + ".\n\n"
            f"Wall time **{wall:.0f} s** ({wall / 60:.1f} min) for {len(rows)} concepts: model load + "
            f"vocabulary search {res['meta']['search_seconds']:.0f} s; original answers "
            f"({res['meta']['original_prompts']} distinct prompts, generated once) "
            f"{res['meta']['originals_seconds']:.0f} s; summed per concept stage: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
            + f". Target (held-out concept BLEU <= 0.6, unrelated >= 0.9, control at least 0.3 "
              f"higher): **{hit} of {len(rows)}**. Results: `{os.path.relpath(args.out, ROOT)}/`.\n\n"
            + "\n".join(lines) + "\n")
    record(text, append=not args.no_append)
    return res


def compare(args, argv) -> dict:
    """Item 4 of issue 14: intrinsic vs behavioural change of Needle / GA / NPO on the chosen
    vectors, next to zeroing them, on the held-out questions (same split and originals)."""
    import json

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from skilllens import load_model
    from skilllens.concepts import load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts
    from skilllens.concepts.report import write_report

    prev = json.loads(Path(args.compare_from).read_text())
    found = {r["concept"]: [tuple(v) for v in r["vectors"]] for r in prev["concepts"] if r["vectors"]}
    out = args.out if "concepts-default" not in args.out else \
        str(ROOT / "benchmarks" / "results" / "concepts-compare")
    load0, t0 = os.getloadavg(), time.perf_counter()
    lm = load_model(args.model)
    concepts = load_concepts(None, args.data_dir, names=list(found))
    res = run_concepts(lm, concepts, ExperimentSettings(compare=("needle", "ga", "npo"),
                                                        n_candidates=0), progress=False,
                       vectors=found)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    res["meta"].update(wall_seconds=round(wall, 1), vectors_from=args.compare_from)
    write_report(res, out)
    lines = ["| concept | vectors | method | held-out concept BLEU | held-out unrelated BLEU | "
             "cosine | L2 | Jaccard top-200 | concept log-prob drop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["concepts"]:
        for m, e in [("zero", r)] + list(r.get("comparison", {}).items()):
            i = e["intrinsic"]
            lines.append(f"| {r['concept']} | {' '.join(f'{a}/{b}' for a, b in r['vectors'])} | {m} | "
                         f"{e['concept_qa']['bleu']:.3f} | {e['unrelated_qa']['bleu']:.3f} | "
                         f"{i['cosine']:.3f} | {i['l2']:.3f} | {i['jaccard_top']:.3f} | "
                         f"{e['logprob_drop'].get('concept_qa', float('nan')):.3f} |")
    cmd = command(__file__, argv)
    text = (f"\n## Concept vectors: zero ablation vs Needle / GA / NPO on the chosen vectors — "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
            f"Command: `{cmd}` ({torch.get_num_threads()} torch threads; load average before "
            f"{load0[0]:.1f}, after {load1[0]:.1f}); wall time {wall:.0f} s. The vectors are those "
            f"the default run found ({len(found)} concepts); every number is on the held-out "
            f"questions (same split, originals and stop rule); Needle / GA / NPO use the defaults "
            f"(5 steps; GA/NPO lr 1e-5 on the FFN output weights, Needle lr 1e-2 on the vector). "
            f"Results: `{os.path.relpath(out, ROOT)}/`.\n\n" + "\n".join(lines) + "\n")
    record(text, append=not args.no_append)
    return res


if __name__ == "__main__":
    main()
