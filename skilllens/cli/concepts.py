"""``skilllens concepts``: find concept vectors on selection questions, score them on held-out
questions against a random control, ablate or unlearn."""
from __future__ import annotations

import sys

from ..errors import DataError
from .common import add_data_args, add_model_args, formatter, load

EXAMPLE = """examples:
  skilllens concepts --out cv_out                       # SmolLM2, the 10 shared dev concepts
  skilllens concepts --concepts my_concepts.yaml --max-vectors 1 --max-new-tokens 24 --out cv
  skilllens concepts --method needle --sigma 0.1 --names Poland,Italy --compare ga,npo --out cv
  skilllens concepts --model tiny-llama --max-concepts 2 --max-new-tokens 4 --out /tmp/cv

Each concept's questions and unrelated questions are split (seeded, --held-out of each into the
held-out part): vectors are chosen on the selection part, and the reported BLEU / ROUGE-L
(results.json concepts[].concept_qa / unrelated_qa) are on the held-out part, next to a
layer-matched random control of the same size.

A concept file (JSON or YAML) holds one concept or a list, each with fields name, text (its
article), questions, unrelated_questions (optional: completions, translated_questions); the
ConceptVectors JSON format (Concept, QA, unrelated_QA, wikipedia_content, ...) is read too.
Writes results.json, report.md and figures (top_tokens, layers, before_after[, comparison])."""


def _csv(s: str | None) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip()) if s else ()


def add_parser(sub):
    p = sub.add_parser("concepts", help="find, validate and ablate concept vectors",
                       epilog=EXAMPLE, formatter_class=formatter, description=__doc__)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--concepts", default=None,
                   help="concept file (JSON/YAML, or ConceptVectors JSON); default: the shared "
                        "dev concepts in the data folder")
    p.add_argument("--names", default=None, help="comma-separated concept names to keep")
    p.add_argument("--max-concepts", type=int, default=None)
    p.add_argument("--method", default="zero",
                   choices=["noise", "zero", "project", "needle", "ga", "npo"],
                   help="edit scored on the chosen vectors (vectors are chosen with this ablation, "
                        "or with zero for needle/ga/npo)")
    p.add_argument("--compare", default="", help="more methods to compare on the same vectors, "
                                                   "e.g. needle,ga,npo")
    p.add_argument("--sigma", type=float, default=0.1, help="noise scale (noise, needle)")
    p.add_argument("--seed", type=int, default=0, help="split, noise and control seed")
    p.add_argument("--held-out", type=float, default=0.5,
                   help="fraction of each concept's questions (and unrelated questions) held out "
                        "for the reported numbers")
    p.add_argument("--candidates", type=int, default=5,
                   help="vocabulary-projection candidates per concept in the pool")
    p.add_argument("--attr-candidates", type=int, default=12,
                   help="attribution (gradient x activation) candidates per concept in the pool")
    p.add_argument("--max-vectors", type=int, default=8,
                   help="largest vector set chosen greedily on the selection questions")
    p.add_argument("--no-control", action="store_true", help="skip the random-vector control")
    p.add_argument("--k", type=int, default=50, help="top tokens used by the search scorer")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--questions", type=int, default=None, help="concept questions used (all)")
    p.add_argument("--unrelated", type=int, default=None, help="unrelated questions used (all)")
    p.add_argument("--completions", type=int, default=0, help="text completions scored")
    p.add_argument("--probes", default="",
                   help="robustness probes: in_context,role_play,translated:LANG")
    p.add_argument("--steps", type=int, default=5, help="training steps (needle, ga, npo)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (ga, npo)")
    p.add_argument("--scope", default="ffn_out", choices=["ffn_out", "full"],
                   help="parameters trained by ga/npo")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is much faster on a busy CPU")
    p.add_argument("--validate", type=int, default=None, metavar="N",
                   help="deprecated, accepted for old scripts: validation by regenerating the "
                        "selection answers is now part of the greedy selection")
    p.add_argument("--multi", type=int, default=None, metavar="M",
                   help="deprecated alias of --max-vectors M (M > 0)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder")
    return p


def run(args) -> int:
    from ..concepts.data import load_concepts
    from ..concepts.experiment import ExperimentSettings, run_concepts, target_reached
    from ..concepts.report import write_report

    if args.validate is not None:
        print("note: --validate is deprecated and ignored; candidates are checked by regenerating "
              "the selection answers during the greedy selection", file=sys.stderr)
    if args.multi is not None:
        if args.multi < 1:
            raise DataError("--multi must be >= 1; use --max-vectors N (the vector-set size)")
        print(f"note: --multi is deprecated; using --max-vectors {args.multi}", file=sys.stderr)
        args.max_vectors = args.multi
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    settings = ExperimentSettings(
        method=args.method, sigma=args.sigma, seed=args.seed, held_out=args.held_out,
        k_search=args.k, n_candidates=args.candidates, n_attr=args.attr_candidates,
        max_vectors=args.max_vectors, control=not args.no_control,
        max_new_tokens=args.max_new_tokens,
        n_questions=args.questions, n_unrelated=args.unrelated, n_completions=args.completions,
        probes=_csv(args.probes), batch_size=args.batch_size, compare=_csv(args.compare),
        unlearn_steps=args.steps, unlearn_lr=args.lr, scope=args.scope).check()
    concepts = load_concepts(args.concepts, args.data_dir, list(_csv(args.names)) or None,
                             args.max_concepts)
    lm = load(args)
    results = run_concepts(lm, concepts, settings, progress=not args.no_progress)
    paths = write_report(results, args.out)
    hit = sum(target_reached(r) for r in results["concepts"])
    print(f"wrote {paths['results']}, {paths['report']} and {len(paths['figures'])} figure files; "
          f"target reached (held-out) for {hit} of {len(results['concepts'])} concepts in "
          f"{results['meta']['seconds']:.0f} s")
    return 0
