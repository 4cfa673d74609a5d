"""Concept vectors on a real model (default: the embedded SmolLM2-135M), in two stages.

Stage A (validation): search all concepts (TF-IDF scorer through the final norm, see
``skilllens.concepts.search``), screen the ``--candidates`` best vectors per concept by the
teacher-forced log-prob drop of the concept's original answers under ``--method`` ablation,
validate the ``--validate`` best by regenerating the answers (concept QA, then all 50 unrelated
questions) and keep the vector with the lowest concept-QA BLEU whose unrelated BLEU stays
>= 0.9; report BLEU / ROUGE-L against the original answers and every validated candidate.
Stage B (unlearning comparison): on the first ``--compare-concepts`` concepts that reached the
target in stage A (else the first ones), Needle, gradient ascent and NPO on the stage-A vector,
intrinsic next to behavioural metrics, and the robustness probes (in-context article, role play).

    python analyses/concept_vectors.py --out benchmarks/results/concept-vectors     # recorded run
    python analyses/concept_vectors.py --model tiny-llama --concepts 2 --max-new-tokens 4 \\
        --unrelated 4 --compare-concepts 1 --steps 1 --out /tmp/cv                  # smoke test

Each stage writes ``results.json``, ``report.md`` and figures into its own subfolder.

Supplementary (not the headline; run after the above): a small model may spread a concept over
several vectors, so ``--multi-only M`` re-reads ``<out>/validation/results.json`` and ablates the
first ``M`` screened candidates of each concept *together* (``--method``), writing ``<out>/multi``::

    python analyses/concept_vectors.py --multi-only 8 --out benchmarks/results/concept-vectors
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--concepts", type=int, default=None, help="number of dev concepts (all)")
    p.add_argument("--method", default="zero", choices=["noise", "zero", "project"])
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--validate", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--unrelated", type=int, default=None, help="unrelated questions (all 50)")
    p.add_argument("--unrelated-b", type=int, default=20, help="unrelated questions in stage B")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compare-concepts", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--multi-only", type=int, default=0,
                   help="only the supplementary stage: ablate the first M screened vectors together")
    p.add_argument("--out", default="benchmarks/results/concept-vectors")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)

    from skilllens import load_model
    from skilllens.concepts import ConceptSearch, load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from skilllens.concepts.report import write_report
    from skilllens.io import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.multi_only:
        return multi_stage(args, out, torch)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    concepts = load_concepts(None, args.data_dir, limit=args.concepts)
    ts = time.perf_counter()
    search = ConceptSearch(k=50, n_candidates=args.candidates, through_norm=True).fit(lm, concepts)
    search_s = time.perf_counter() - ts
    search.save(out / "search.safetensors")
    common = dict(sigma=args.sigma, n_candidates=args.candidates, n_validate=args.validate,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  seq_len=args.seq_len, max_chunks=args.max_chunks, unlearn_steps=args.steps)
    res_a = run_concepts(lm, concepts, ExperimentSettings(method=args.method,
                                                          n_unrelated=args.unrelated, **common),
                         search=search)
    res_a["meta"].update(search_seconds=round(search_s, 1), machine=_machine(torch))
    write_report(res_a, out / "validation")
    hits = [r for r in res_a["concepts"] if target_reached(r)]
    summary = {"validation_hits": len(hits), "n_concepts": len(concepts),
               "hit_concepts": [r["concept"] for r in hits],
               "search_seconds": round(search_s, 1),
               "validation_seconds": res_a["meta"]["seconds"],
               "vectors": {r["concept"]: {"layer": r["layer"], "index": r["index"],
                                          "concept_bleu": round(r["concept_qa"]["bleu"], 4),
                                          "unrelated_bleu": round(r["unrelated_qa"]["bleu"], 4),
                                          "hit": target_reached(r)} for r in res_a["concepts"]}}
    print(json.dumps(summary))
    write_json(out / "summary.json", summary)
    if not args.skip_b and args.compare_concepts:
        order = [r["concept"] for r in hits] + [r["concept"] for r in res_a["concepts"]
                                                 if not target_reached(r)]
        names = order[: args.compare_concepts]
        sub = [c for c in concepts if c.name in names]
        vecs = {r["concept"]: (r["layer"], r["index"]) for r in res_a["concepts"]}
        res_b = run_concepts(lm, sub, ExperimentSettings(
            method="needle", compare=("ga", "npo"), n_completions=3, n_unrelated=args.unrelated_b,
            probes=("in_context", "role_play"), **common), search=search, vectors=vecs)
        res_b["meta"].update(machine=_machine(torch))
        write_report(res_b, out / "unlearning")
        summary["unlearning_concepts"] = [c.name for c in sub]
        summary["unlearning_seconds"] = res_b["meta"]["seconds"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary))
    return summary


def multi_stage(args, out: Path, torch) -> dict:
    """Ablate the first ``args.multi_only`` screened vectors of each concept together."""
    from skilllens import load_model
    from skilllens.concepts import AnswerCache, BehaviourSuite, load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, evaluate_multi, target_reached
    from skilllens.io import write_json, write_text

    t0 = time.perf_counter()
    prev = json.loads((out / "validation" / "results.json").read_text())
    lm = load_model(args.model)
    concepts = {c.name: c for c in load_concepts(None, args.data_dir)}
    s = ExperimentSettings(method=args.method, sigma=args.sigma, max_new_tokens=args.max_new_tokens,
                           n_unrelated=args.unrelated, batch_size=args.batch_size)
    rows, cache = [], AnswerCache()
    for r in prev["concepts"]:
        c = concepts[r["concept"]]
        vecs = [(x["layer"], x["index"]) for x in r["screening"]][: args.multi_only]
        suite = BehaviourSuite(c, s.max_new_tokens, s.n_unrelated, batch_size=s.batch_size).fit(lm, cache)
        m = evaluate_multi(lm, suite, vecs, s.method, s)
        m["target"] = target_reached(m)
        rows.append({"concept": c.name, "single": {"layer": r["layer"], "index": r["index"],
                     "concept_qa": r["concept_qa"], "unrelated_qa": r["unrelated_qa"]}, **m})
        print(c.name, m["concept_qa"]["bleu"], m["unrelated_qa"]["bleu"], flush=True)
    res = {"concepts": rows, "settings": {"m": args.multi_only, "method": s.method,
                                          "sigma": s.sigma, "max_new_tokens": s.max_new_tokens,
                                          "n_unrelated": s.n_unrelated},
           "meta": {"model": args.model, "machine": _machine(torch),
                    "seconds": round(time.perf_counter() - t0, 1)}}
    write_json(out / "multi" / "results.json", res)
    lines = [f"# {args.multi_only} screened vectors ablated together ({s.method}), "
             f"{args.model}", "", f"Greedy answers of up to {s.max_new_tokens} new tokens; all "
             f"unrelated questions; BLEU against the unedited model's answers. Supplementary: the "
             f"headline target is about one vector (see ../validation/report.md).", "",
             f"Target reached (concept BLEU <= 0.6, unrelated >= 0.9): "
             f"**{sum(r['target'] for r in rows)} of {len(rows)}**", "",
             "| concept | single vector | single: concept BLEU | single: unrelated BLEU | "
             f"{args.multi_only} vectors: concept BLEU | {args.multi_only} vectors: unrelated BLEU | "
             "target |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sg = r["single"]
        lines.append(f"| {r['concept']} | {sg['layer']}/{sg['index']} | "
                     f"{sg['concept_qa']['bleu']:.3f} | {sg['unrelated_qa']['bleu']:.3f} | "
                     f"{r['concept_qa']['bleu']:.3f} | {r['unrelated_qa']['bleu']:.3f} | "
                     f"{'yes' if r['target'] else 'no'} |")
    write_text(out / "multi" / "report.md", "\n".join(lines) + "\n")
    return res


def _machine(torch) -> str:
    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
