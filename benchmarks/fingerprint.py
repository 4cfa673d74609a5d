"""Cost of the model fingerprint (scheme 2: SHA-256 of every parameter's bytes).

    python benchmarks/fingerprint.py [--layers 8] [--no-append]

Times :func:`skilllens.model_fingerprint` on SmolLM2-135M (float32: the exact pass plus the
bfloat16-rounded pass; bfloat16: one pass), a cached second call, and the weight digest of
``--layers`` transformer blocks with Llama-3-8B's bf16 shapes (q/o 4096x4096, k/v 1024x4096,
gate/up/down 14336x4096) plus its embedding and LM head, extrapolated linearly to the 8.03B
parameters of the full model (SHA-256 time does not depend on the values, so the blocks are
filled with a constant). Prints a table and appends it to ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import skilllens  # noqa: E402
from skilllens.core.fingerprint import _weight_digests, model_fingerprint  # noqa: E402

LLAMA3_8B_PARAMS = 8_030_261_248
BLOCK = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
         "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _llama3_slice(n_layers: int) -> nn.Module:
    m = nn.Module()
    m.embed = nn.Parameter(torch.empty(128256, 4096, dtype=torch.bfloat16).fill_(0.5), False)
    m.head = nn.Parameter(torch.empty(128256, 4096, dtype=torch.bfloat16).fill_(0.25), False)
    m.layers = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.Module()
        for name, shape in BLOCK.items():
            setattr(block, name, nn.Parameter(torch.empty(shape, dtype=torch.bfloat16)
                                              .fill_(0.125), False))
        m.layers.append(block)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        lm = skilllens.load_model("smollm2-135m", dtype=dtype)
        n = sum(p.numel() for p in lm.model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        first = _timed(lambda: model_fingerprint(lm.model, lm.adapter))
        cached = _timed(lambda: model_fingerprint(lm.model, lm.adapter))
        rows.append((f"SmolLM2-135M {dtype}", n, nbytes, first, cached, None))
        del lm
    big = _llama3_slice(args.layers)
    n = sum(p.numel() for p in big.parameters())
    nbytes = 2 * n
    t = _timed(lambda: _weight_digests(big))
    rows.append((f"Llama-3-8B shapes, embed+head+{args.layers} blocks, bf16", n, nbytes, t, None,
                 t * LLAMA3_8B_PARAMS / n))
    lines = ["| weights | params | GB | first call (s) | GB/s | cached call (ms) | "
             "full 8B bf16, extrapolated (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, n, nbytes, first, cached, full in rows:
        lines.append(f"| {name} | {n / 1e6:.0f}M | {nbytes / 1e9:.2f} | {first:.2f} | "
                     f"{nbytes / 1e9 / first:.2f} | "
                     f"{'-' if cached is None else f'{cached * 1e3:.1f}'} | "
                     f"{'-' if full is None else f'{full:.0f}'} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        cores = os.cpu_count()
        head = (f"\n## Model fingerprint cost, {_dt.date.today().isoformat()}, CPU "
                f"({platform.machine()}, {cores} cores, shared)\n\n"
                f"Command: `nice python benchmarks/fingerprint.py --layers {args.layers}`. "
                f"Scheme 2 hashes every parameter (SHA-256 over 64 MiB pieces on a "
                f"{min(16, cores or 1)}-thread pool; float32 models pay a second pass over the "
                f"bfloat16-rounded weights); the digest is cached per model until a weight "
                f"changes, so later calls cost the cached-call column.\n\n")
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(head + table + "\n")


if __name__ == "__main__":
    main()
