"""Throughput of statistics collection on the embedded SmolLM2-135M (issue: foundation, item 9).

Measures tokens/s (non-padding tokens) of
  (a) bare forward passes (full logits, and logits of the last position only),
  (b) forward + skilllens statistics at sites gate and key of all 30 layers (default statistics:
      count/mean/var/min/max/mean|x|/fraction positive), length-sorted batches,
  (c) a reference-style probe: batch size 1, every hooked output copied to numpy on the host and
      accumulated in Python (sum and sum of squares per neuron),
on the CPU, and on CUDA when available. Prints a markdown table and appends it to
benchmarks/RESULTS.md with the date, machine and command.

    python benchmarks/collect.py --items 48 [--device cuda] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import skilllens
from skilllens.batching import encode_items, iter_batches
from skilllens.data import load_skill, sample_skill
from skilllens.hooks import Hook, hooks_applied


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bare(lm, batches, **kw):
    with torch.no_grad():
        for b in batches:
            lm.model(**b.inputs, use_cache=False, **kw)


def reference_probe(lm, encoded, device):
    acc = {}

    def hook(key):
        def fn(a):
            arr = a[0].detach().float().cpu().numpy()
            s = acc.setdefault(key, [np.zeros(arr.shape[1]), np.zeros(arr.shape[1]), 0])
            s[0] += arr.sum(0)
            s[1] += (arr ** 2).sum(0)
            s[2] += arr.shape[0]
        return fn

    hooks = [Hook(s, l, hook((s, l))) for l in range(lm.adapter.n_layers) for s in ("gate", "key")]
    with torch.no_grad(), hooks_applied(lm, hooks):
        for e in encoded:
            lm.model(input_ids=torch.tensor([e.ids], device=device), use_cache=False)


def timed(fn, device, n_tokens, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return n_tokens / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    lm = skilllens.load_model("smollm2-135m", device=args.device, dtype=dtype)
    skill = sample_skill(load_skill("gsm8k", args.data_dir, part="eval"), args.items, seed=0)
    encoded = encode_items(skill.items, lm.tokenizer, 512)
    n_tok = sum(len(e.ids) for e in encoded)
    sorted_b = list(iter_batches(encoded, args.batch_size, lm.tokenizer.pad_token_id, args.device))
    naive_b = list(iter_batches(encoded, args.batch_size, lm.tokenizer.pad_token_id, args.device, sort=False))
    pad_sorted = 1 - n_tok / sum(b.input_ids.numel() for b in sorted_b)
    pad_naive = 1 - n_tok / sum(b.input_ids.numel() for b in naive_b)
    bare(lm, sorted_b[-1:])  # warm-up
    rows = []
    r = lambda name, tps: rows.append((name, tps))  # noqa: E731
    r("(a) bare forward, full logits, naive padded batches", timed(lambda: bare(lm, naive_b), args.device, n_tok, args.repeats))
    r("(a) bare forward, full logits, length-sorted batches", timed(lambda: bare(lm, sorted_b), args.device, n_tok, args.repeats))
    r("(a) bare forward, last-position logits, length-sorted", timed(lambda: bare(lm, sorted_b, logits_to_keep=1), args.device, n_tok, args.repeats))
    coll = lambda stats: skilllens.collect(lm, skill, sites=["gate", "key"], batch_size=args.batch_size,  # noqa: E731
                                           stats=stats, progress=False)
    r("(b) forward + stats gate,key x 30 layers (mean/var/min/max)", timed(lambda: coll(("moments", "extrema")), args.device, n_tok, args.repeats))
    r("(b) forward + stats gate,key x 30 layers (default: + mean|x|, frac>0)", timed(lambda: coll(skilllens.neuron_stats.DEFAULT_STATS), args.device, n_tok, args.repeats))
    r("(c) reference-style probe (bs 1, numpy on host)", timed(lambda: reference_probe(lm, encoded, args.device), args.device, n_tok, 1))
    fastest_bare = max(t for n, t in rows if n.startswith("(a)"))
    ref = rows[-1][1]
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    lines = [f"| configuration | tokens/s | vs fastest bare forward | vs (c) |", "|---|---:|---:|---:|"]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:,.0f} | {tps / fastest_bare:.2f}x | {tps / ref:.2f}x |")
    header = (f"\n## collect throughput — {datetime.date.today()} — {dev_name}, {dtype}\n\n"
              f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`; "
              f"{len(skill)} GSM8K test items, {n_tok} tokens, batch size {args.batch_size}; padding "
              f"waste {pad_naive:.0%} (naive batches) vs {pad_sorted:.0%} (length-sorted); best of "
              f"{args.repeats} runs; torch threads {torch.get_num_threads()}.\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
