"""Evaluation harness on the embedded SmolLM2-135M: teacher-forced scores (and optionally a few
generation scores) on seeded samples of each skill's eval part.

    python benchmarks/eval_harness.py                       # token accuracy, 24 items each
    python benchmarks/eval_harness.py --generation --n 4    # + substring/F1, pass@1, GSM8K EM
    python benchmarks/eval_harness.py --padding-only --n 64 # padding table only (no model run)

Prints one JSON line per measurement and writes them to ``--out`` (JSON), with a padding table:
per skill and path (collect, teacher-forced evaluate, generate), the real tokens and the
positions the model computes (rows x longest row per batch) with the shared length-sorted plan
and with naive batches in item order. Generation counts the prompt (prefill) positions.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import skilllens
from skilllens.core.batching import encode_items, encode_prompts, padding_stats
from skilllens.data import load_skill, sample_skill
from skilllens.eval import MAX_NEW_TOKENS, evaluate, fewshot_prefix, scoring
from skilllens.eval.evaluation import _kind
from skilllens.io import write_json


def padding_rows(tok, samples: dict, batch_size: int, max_length: int, shots) -> list[dict]:
    """Real vs computed positions per skill and path, sorted (the code's plan) vs naive."""
    rows = []
    for name, sk in samples.items():
        enc = encode_items(sk.items, tok, max_length)
        kind = _kind(sk.items[0], sk.family)
        prefix = fewshot_prefix(shots) if kind == "gsm8k" else ""
        gen_len = max(max_length, 2048) if prefix else max_length
        prompts, _ = encode_prompts(tok, [prefix + it.prompt for it in sk.items],
                                    max(1, gen_len - MAX_NEW_TOKENS[kind]))
        paths = {"collect (tokens=all)": [len(e.ids) for e in enc],
                 "evaluate (teacher-forced)": [len(e.ids) for e in enc],
                 "generate (prompt prefill)": [len(p) for p in prompts]}
        for path, lengths in paths.items():
            s, n = padding_stats(lengths, batch_size), padding_stats(lengths, batch_size, False)
            rows.append({"skill": name, "path": path, "items": len(lengths), "real": s["real"],
                         "computed_sorted": s["computed"], "padded_sorted": s["padded"],
                         "padding_sorted": round(s["padding_fraction"], 4),
                         "computed_naive": n["computed"], "padded_naive": n["padded"],
                         "padding_naive": round(n["padding_fraction"], 4)})
    return rows


def padding_table(rows: list[dict]) -> str:
    lines = ["| skill | path | items | real tokens | computed (sorted) | padded (sorted) | "
             "computed (naive) | padded (naive) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['skill']} | {r['path']} | {r['items']} | {r['real']:,} | "
                     f"{r['computed_sorted']:,} | {r['padded_sorted']:,} "
                     f"({r['padding_sorted']:.1%}) | {r['computed_naive']:,} | "
                     f"{r['padded_naive']:,} ({r['padding_naive']:.1%}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--skills", default="gsm8k,humaneval,xquad-en")
    p.add_argument("--n", type=int, default=24, help="eval items per skill (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generation", action="store_true", help="also run generation metrics")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--padding-only", action="store_true",
                   help="only count padding (tokenizer only: fast, no forward pass)")
    p.add_argument("--out", default="eval_harness.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    samples = {s: sample_skill(load_skill(s, part="eval"), args.n, args.seed)
               for s in args.skills.split(",")}
    tok = _tokenizer(args.model) if args.padding_only else None
    lm = None if args.padding_only else skilllens.load_model(args.model)
    shots = sample_skill(load_skill("gsm8k", part="probe"), 2, args.seed).items
    pad_rows = padding_rows(tok or lm.tokenizer, samples, args.batch_size, args.max_length,
                            shots)
    print(padding_table(pad_rows), flush=True)
    meta = {"n": args.n, "seed": args.seed, "batch_size": args.batch_size,
            "max_length": args.max_length, "machine": platform.machine(),
            "torch": torch.__version__, "threads": args.threads, "padding": pad_rows}
    if args.padding_only:
        write_json(args.out, {"model": args.model, **meta})
        return
    rows = []

    def record(skill, metric, res, t0, **extra):
        row = {"skill": skill, "metric": metric, "score": round(res.score, 4),
               "n_truncated": res.n_truncated,
               "accuracy": round(res.accuracy, 4), "nll": round(res.nll, 4), "n": res.n_items,
               "seconds": round(time.time() - t0, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

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
    write_json(args.out, {"model": lm.name, "fingerprint": lm.fingerprint["id"], **meta,
                          "rows": rows})


def _tokenizer(model: str):
    """The tokenizer of ``model`` without loading its weights (the embedded SmolLM2: from the
    de-quantized cache folder)."""
    from transformers import AutoTokenizer

    from skilllens.core.models import _gguf_cached, find_smollm2_gguf
    if model == "smollm2-135m":
        return AutoTokenizer.from_pretrained(str(_gguf_cached(find_smollm2_gguf())))
    return skilllens.load_model(model).tokenizer


if __name__ == "__main__":
    main()
