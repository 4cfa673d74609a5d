"""Throughput of statistics collection vs bare forward passes (issue 15), side by side.

On 48 GSM8K question+answer texts (the eval part, seed 0) with SmolLM2-135M, every repetition
times, one after the other (interleaved, so a load change hits all variants alike):

* ``bare bs1 full``: one forward per text, no padding, full logits;
* ``bare bs1 last``: the same with ``logits_to_keep=1`` (the fastest bare batch-1 forward);
* ``no-op hooks bs1``: hooks at gate and key of all 30 layers that do nothing, stopping after the
  last hooked layer (what ``collect`` runs, minus the statistics);
* ``collect bs1``: ``skilllens.core.collect`` with the default statistics (count, mean, M2, min, max,
  mean |x|, fraction positive) at gate and key of all 30 layers, batch size 1;
* ``collect bs16``: the same with batch size 16 (padded, length-sorted batches);
* ``collect bs1 +hist``: batch size 1 with a 256-bin histogram as well.

Reports the median and best tokens/s (non-padding tokens) over the repetitions and the ratios
to the fastest bare batch-1 forward, with the load average before and after; also tokens per
second of process CPU time (with ``--threads 1`` a load-robust measure of the work done, since
time spent waiting for a shared core is not counted). Prints a markdown
table and appends it to benchmarks/RESULTS.md (date, machine, command).

    python benchmarks/collect.py --repeats 5            # re-time on an idle machine
    python benchmarks/collect.py --only bare1,collect1  # a subset
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import skilllens  # noqa: E402
from skilllens.core.batching import encode_items  # noqa: E402
from skilllens.data import load_skill, sample_skill  # noqa: E402
from skilllens.core.hooks import Hook, run_with_hooks  # noqa: E402
from skilllens.stats.neuron_stats import DEFAULT_STATS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import command, record  # noqa: E402



def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def variants(lm, skill, encoded):
    dev = lm.device
    ids = [torch.tensor([e.ids], device=dev) for e in encoded]
    sites = ["gate", "key"]
    noop = [Hook(s, l, lambda a: None) for l in range(lm.adapter.n_layers) for s in sites]

    def bare(**kw):
        with torch.no_grad():
            for t in ids:
                lm.model(input_ids=t, use_cache=False, **kw)

    def hooks_only():
        with torch.no_grad():
            for t in ids:
                run_with_hooks(lm, {"input_ids": t}, noop, stop_after_last=True, use_cache=False)

    def coll(bs, stats=DEFAULT_STATS):
        return lambda: skilllens.collect(lm, skill, sites=sites, batch_size=bs, stats=stats,
                                         progress=False)

    return {"bare1full": ("bare bs1, full logits", bare),
            "bare1": ("bare bs1, last-position logits", lambda: bare(logits_to_keep=1)),
            "hooks1": ("no-op hooks bs1 (stop after last layer)", hooks_only),
            "collect1": ("collect bs1, default stats", coll(1)),
            "collect16": ("collect bs16, default stats", coll(16)),
            "collect1hist": ("collect bs1, default stats + histogram",
                             coll(1, DEFAULT_STATS + ("histogram",)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", default=None, help="comma-separated variant keys")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = skilllens.load_model("smollm2-135m", device=args.device,
                              dtype=args.dtype or "float32")
    if args.dtype is None and lm.device.type == "cuda":
        lm.model.to(torch.bfloat16)
    skill = sample_skill(load_skill("gsm8k", args.data_dir, part="eval"), args.items, seed=0)
    encoded = encode_items(skill.items, lm.tokenizer, 512)
    n_tok = sum(len(e.ids) for e in encoded)
    all_v = variants(lm, skill, encoded)
    keys = args.only.split(",") if args.only else list(all_v)
    for k in keys:  # warm-up (workspaces, caches) outside the timing
        all_v[k][1]() if k.startswith("collect") else None
    all_v["bare1"][1]()
    load0 = os.getloadavg()
    times = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    for _ in range(args.repeats):
        for k in keys:
            _sync(lm.device)
            t0, c0 = time.perf_counter(), time.process_time()
            all_v[k][1]()
            _sync(lm.device)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    load1 = os.getloadavg()
    med = {k: n_tok / statistics.median(v) for k, v in times.items()}
    best = {k: n_tok / min(v) for k, v in times.items()}
    cpu_best = {k: n_tok / min(v) for k, v in cpu.items()}
    base = [k for k in ("bare1", "bare1full") if k in keys]
    ref_k = max(base, key=lambda k: med[k]) if base else None
    lines = ["| variant | tokens/s (median) | tokens/s (best) | median vs fastest bare bs1 | "
             "best vs best bare bs1 | tokens per CPU-s (best) | vs bare bs1 (CPU time) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        rm = f"{med[k] / med[ref_k]:.3f}x" if ref_k else "-"
        rb = f"{best[k] / max(best[b] for b in base):.3f}x" if base else "-"
        rc = f"{cpu_best[k] / max(cpu_best[b] for b in base):.3f}x" if base else "-"
        lines.append(f"| {all_v[k][0]} | {med[k]:,.0f} | {best[k]:,.0f} | {rm} | {rb} | "
                     f"{cpu_best[k]:,.0f} | {rc} |")
    machine = (torch.cuda.get_device_name() if lm.device.type == "cuda" else
               f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})")
    cmd = command(__file__, argv)
    text = (f"\n## Statistics throughput vs bare forward, {datetime.datetime.now():%Y-%m-%d %H:%M}"
            f", {machine}\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{next(lm.model.parameters()).dtype}; command: `{cmd}`; {len(skill)} GSM8K "
            f"question+answer texts, {n_tok} tokens; sites gate and key at all "
            f"{lm.adapter.n_layers} layers; {args.repeats} interleaved repetitions; load average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after.\n\n" + "\n".join(lines) + "\n")
    record(text, append=not args.no_append)


if __name__ == "__main__":
    main()
