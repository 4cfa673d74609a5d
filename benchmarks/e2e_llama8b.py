"""End-to-end overhead of full statistics collection on a Llama-3-8B-shaped model (issue 3).

Random-initialised LlamaConfig with Llama-3-8B shapes (d_model 4096, d_ff 14336, 32 layers,
GQA 32/8 heads, vocab 128256) in bf16, batch 16 x 512 tokens: forward alone vs forward + every
statistic (moments, extrema, |x|, positive, 256-bin histogram) at sites gate and key of all
layers. Appends a table to benchmarks/RESULTS.md. Needs a GPU with >= 40 GB; on a CPU use
``--layers 1 --batch 2 --seq 64`` for a smoke run (numbers then mean little).

    python benchmarks/e2e_llama8b.py                # on an H100/H200
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import skilllens
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.stats.neuron_stats import NeuronStats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stats", default="moments,extrema,abs,positive,histogram")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    from skilllens.core.tokenizers import byte_tokenizer
    lm = skilllens.load_model((model, byte_tokenizer()))
    ids = torch.randint(0, 128000, (args.batch, args.seq), device=dev)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=dev)
    stats = tuple(args.stats.split(","))
    coll = {(s, l): NeuronStats(14336, stats, hist_range=(-8.0, 8.0), device=dev)
            for l in range(args.layers) for s in ("gate", "key")}
    hooks = [Hook(s, l, lambda a, k=(s, l): coll[k].update(a, mask)) for (s, l) in coll]

    def run(with_stats: bool) -> float:
        times = []
        for _ in range(args.repeats + 1):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                if with_stats:
                    with hooks_applied(lm, hooks):
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                else:
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[len(times[1:]) // 2]

    t_fwd, t_all = run(False), run(True)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    kernel = "Triton fused kernel" if dev == "cuda" else "torch path"
    text = (f"\n## Llama-3-8B-shaped end-to-end — {datetime.date.today()} — {name}\n\n"
            f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`; "
            f"{args.layers} layers, batch {args.batch} x {args.seq}, {dtype}, stats {stats} at gate+key "
            f"of every layer ({kernel}); median of {args.repeats}.\n\n"
            f"| forward alone (s) | forward + statistics (s) | overhead |\n|---:|---:|---:|\n"
            f"| {t_fwd:.4f} | {t_all:.4f} | {100 * (t_all / t_fwd - 1):.1f}% |\n")
    print(text)
    if not args.no_append:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
