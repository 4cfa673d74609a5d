"""Concept vectors on a real model (default: the embedded SmolLM2-135M), in two stages.

Stage A (held-out validation): ``run_concepts`` with the CLI's defaults: each concept's questions
and unrelated questions are split (seeded, half held out); a set of at most ``--max-vectors``
value vectors is chosen on the selection half (vocabulary-projection + attribution candidates,
teacher-forced screening, greedy set, size checked by regenerating the selection answers), and
BLEU / ROUGE-L of the *held-out* answers are reported next to a layer-matched random control.
Stage B (unlearning comparison): on the first ``--compare-concepts`` concepts that reached the
target in stage A (else the first ones), Needle (one per chosen vector), gradient ascent and NPO
on the stage-A vectors, intrinsic next to behavioural metrics on held-out questions, and the
robustness probes (in-context article, role play; held-out questions).

    python analyses/concept_vectors.py --out benchmarks/results/concept-vectors     # recorded run
    python analyses/concept_vectors.py --model tiny-llama --concepts 2 --max-new-tokens 4 \\
        --unrelated 4 --compare-concepts 1 --steps 1 --out /tmp/cv                  # smoke test
    python analyses/concept_vectors.py --stage-a benchmarks/results/concepts-default/results.json \\
        --out benchmarks/results/concept-vectors     # stage B only, on a stage-A run's vectors

Each stage writes ``results.json``, ``report.md`` and figures into its own subfolder.
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
    p.add_argument("--max-vectors", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--unrelated", type=int, default=None, help="unrelated questions (all 50)")
    p.add_argument("--unrelated-b", type=int, default=20, help="unrelated questions in stage B")
    p.add_argument("--compare-concepts", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--stage-a", default=None, help="reuse a stage-A results.json (skip stage A)")
    p.add_argument("--out", default="benchmarks/results/concept-vectors")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    from skilllens import load_model
    from skilllens.concepts import load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from skilllens.concepts.report import write_report
    from skilllens.io import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    concepts = load_concepts(None, args.data_dir, limit=args.concepts)
    common = dict(sigma=args.sigma, max_vectors=args.max_vectors,
                  max_new_tokens=args.max_new_tokens, seq_len=args.seq_len,
                  max_chunks=args.max_chunks, unlearn_steps=args.steps)
    if args.stage_a:
        res_a = json.loads(Path(args.stage_a).read_text())
    else:
        res_a = run_concepts(lm, concepts, ExperimentSettings(method=args.method,
                                                              n_unrelated=args.unrelated, **common))
        res_a["meta"].update(machine=_machine(torch))
        write_report(res_a, out / "validation")
    hits = [r for r in res_a["concepts"] if target_reached(r)]
    summary = {"held_out_hits": len(hits), "n_concepts": len(res_a["concepts"]),
               "hit_concepts": [r["concept"] for r in hits],
               "stage_a_seconds": res_a["meta"]["seconds"],
               "vectors": {r["concept"]: {"vectors": r["vectors"],
                                          "concept_bleu": round(r["concept_qa"]["bleu"], 4),
                                          "unrelated_bleu": round(r["unrelated_qa"]["bleu"], 4),
                                          "control_bleu": round(r["control"]["concept_qa"]["bleu"], 4)
                                          if "control" in r else None,
                                          "found": r.get("found", True),
                                          "hit": target_reached(r)} for r in res_a["concepts"]}}
    write_json(out / "summary.json", summary)
    if not args.skip_b and args.compare_concepts:
        order = [r["concept"] for r in hits] + [r["concept"] for r in res_a["concepts"]
                                                 if not target_reached(r) and r["vectors"]]
        names = order[: args.compare_concepts]
        sub = [c for c in concepts if c.name in names]
        vecs = {r["concept"]: [tuple(v) for v in r["vectors"]] for r in res_a["concepts"]}
        res_b = run_concepts(lm, sub, ExperimentSettings(
            method="needle", compare=("ga", "npo"), n_completions=3, n_unrelated=args.unrelated_b,
            probes=("in_context", "role_play"), n_candidates=0, control=False, **common),
            vectors=vecs)
        res_b["meta"].update(machine=_machine(torch))
        write_report(res_b, out / "unlearning")
        summary["unlearning_concepts"] = [c.name for c in sub]
        summary["unlearning_seconds"] = res_b["meta"]["seconds"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary))
    return summary


def _machine(torch) -> str:
    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
