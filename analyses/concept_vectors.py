"""Concept vectors on a real model (default: the embedded SmolLM2-135M), in two stages.

Stage A (validation): search all concepts, screen the top candidates by the teacher-forced
log-prob drop of zero-ablation, then score the best vector's ablation (``--method``) with
BLEU / ROUGE-L against the original answers, plus ``noise`` at sigma 0.1 for comparison.
Stage B (unlearning comparison): on the first ``--compare-concepts`` concepts, Needle, gradient
ascent and NPO on the same vector, intrinsic next to behavioural metrics, and the robustness
probes (in-context article, role play).

    python analyses/concept_vectors.py --out benchmarks/concept_vectors            # full
    python analyses/concept_vectors.py --model tiny-llama --concepts 2 --max-new-tokens 4 \\
        --unrelated 4 --compare-concepts 1 --steps 1 --out /tmp/cv                  # smoke test

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
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--unrelated", type=int, default=20)
    p.add_argument("--compare-concepts", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--out", default="benchmarks/concept_vectors")
    args = p.parse_args(argv)

    import torch

    from skilllens import load_model
    from skilllens.concepts import ConceptSearch, load_concepts
    from skilllens.concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from skilllens.concepts.report import write_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    concepts = load_concepts(None, args.data_dir, limit=args.concepts)
    ts = time.perf_counter()
    search = ConceptSearch(k=50, n_candidates=args.candidates).fit(lm, concepts)
    search_s = time.perf_counter() - ts
    search.save(out / "search.safetensors")
    common = dict(sigma=args.sigma, n_candidates=args.candidates,
                  max_new_tokens=args.max_new_tokens, n_unrelated=args.unrelated,
                  seq_len=args.seq_len, max_chunks=args.max_chunks, unlearn_steps=args.steps)
    res_a = run_concepts(lm, concepts, ExperimentSettings(method=args.method, compare=("noise",),
                                                          **common), search=search)
    res_a["meta"].update(search_seconds=round(search_s, 1), machine=_machine(torch))
    write_report(res_a, out / "validation")
    summary = {"validation_hits": sum(target_reached(r) for r in res_a["concepts"]),
               "n_concepts": len(concepts), "search_seconds": round(search_s, 1)}
    print(json.dumps(summary))
    if not args.skip_b and args.compare_concepts:
        sub = concepts[: args.compare_concepts]
        res_b = run_concepts(lm, sub, ExperimentSettings(
            method="needle", compare=("ga", "npo"), n_completions=3,
            probes=("in_context", "role_play"), **common), search=search)
        res_b["meta"].update(machine=_machine(torch))
        write_report(res_b, out / "unlearning")
        summary["unlearning_concepts"] = len(sub)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


def _machine(torch) -> str:
    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
