"""Evaluation harness on the embedded SmolLM2-135M: teacher-forced scores (and optionally a few
generation scores) on seeded samples of each skill's eval part.

    python benchmarks/eval_harness.py                       # token accuracy, 24 items each
    python benchmarks/eval_harness.py --generation --n 4    # + substring/F1, pass@1, GSM8K EM

Prints one JSON line per measurement and writes them to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import skilllens
from skilllens import scoring
from skilllens.data import load_skill, sample_skill
from skilllens.evaluation import evaluate
from skilllens.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--skills", default="gsm8k,humaneval,xquad-en")
    p.add_argument("--n", type=int, default=24, help="eval items per skill (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generation", action="store_true", help="also run generation metrics")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="eval_harness.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = skilllens.load_model(args.model)
    rows = []

    def record(skill, metric, res, t0, **extra):
        row = {"skill": skill, "metric": metric, "score": round(res.score, 4),
               "accuracy": round(res.accuracy, 4), "nll": round(res.nll, 4), "n": res.n_items,
               "seconds": round(time.time() - t0, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    samples = {s: sample_skill(load_skill(s, part="eval"), args.n, args.seed)
               for s in args.skills.split(",")}
    for name, sk in samples.items():
        t0 = time.time()
        record(name, "token_accuracy", evaluate(lm, sk, batch_size=args.batch_size,
                                                progress=False), t0)
    if args.generation:
        for name, sk in samples.items():
            family = name.split("-")[0]
            t0 = time.time()
            if family == "xquad":
                res = evaluate(lm, sk, "substring", batch_size=args.batch_size, progress=False)
                f1 = sum(scoring.f1_score(r["prediction"], it.meta["answers"],
                                          it.meta.get("lang", "en"))
                         for r, it in zip(res.per_item, sk)) / len(sk)
                record(name, "substring", res, t0, f1=round(f1, 4))
            elif family == "humaneval":
                res = evaluate(lm, sk, "pass@1", batch_size=args.batch_size, progress=False,
                               max_new_tokens=128)
                record(name, "pass@1", res, t0, max_new_tokens=128)
            elif family == "gsm8k":
                res = evaluate(lm, sk, "exact_match", batch_size=args.batch_size,
                               progress=False, n_shots=2, max_new_tokens=128)
                record(name, "exact_match", res, t0, n_shots=2, max_new_tokens=128)
    write_json(args.out, {"model": lm.name, "fingerprint": lm.fingerprint["id"],
                          "n": args.n, "seed": args.seed, "machine": platform.machine(),
                          "torch": torch.__version__, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
