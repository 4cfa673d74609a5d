"""Throughput of the fused statistics kernel vs a device copy and the plain-torch path.

    python benchmarks/stats_kernel.py [--repeats 20] [--warmup 3] [--no-append]

With CUDA: for ``[8192 x 14336]`` and ``[65536 x 1536]`` bf16 blocks it times (CUDA events,
median of the repeats after warm-up)

* ``copy``: ``y.copy_(x)`` (reads and writes the block: bytes moved = 2 x size),
* ``triton``: ``fused_partials`` (moments, extrema, |x|, n_pos, non-finite; one read of x),
* ``triton+hist``: the same with a 256-bin histogram,
* ``torch`` / ``torch+hist``: :func:`skilllens.stats.batch_partials` (masked var_mean, aminmax,
  bucketize-style floor + bincount histogram),

and reports GB/s as bytes moved / time and as a fraction of the copy bandwidth. Without CUDA it
times only the torch path on a small CPU block (a sanity check; the GPU table needs a GPU). The
table is printed and appended to ``benchmarks/RESULTS.md`` (date, machine, command).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from skilllens.stats import HistogramSpec, batch_partials  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GPU_SHAPES = [(8192, 14336), (65536, 1536)]
CPU_SHAPES = [(1024, 1536), (256, 14336)]


def time_cuda(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_gpu(warmup: int, repeats: int) -> list[tuple]:
    from skilllens.stats.kernels import fused_partials
    rows = []
    for n, d in GPU_SHAPES:
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        spec = HistogramSpec(torch.full((d,), -4.0, device="cuda"),
                             torch.full((d,), 4.0, device="cuda"), 256)
        size = x.numel() * x.element_size()
        fused_partials(x, None, spec)  # compile outside the timing
        cases = [("copy", lambda: y.copy_(x), 2 * size),
                 ("triton", lambda: fused_partials(x), size),
                 ("triton+hist", lambda: fused_partials(x, None, spec), size),
                 ("torch", lambda: batch_partials(x), size),
                 ("torch+hist", lambda: batch_partials(x, None, spec), size)]
        copy_bw = None
        for name, fn, moved in cases:
            ms = time_cuda(fn, warmup, repeats)
            bw = moved / ms / 1e6
            copy_bw = copy_bw or bw
            rows.append((f"{n} x {d}", name, ms, bw, bw / copy_bw))
        del x, y
        torch.cuda.empty_cache()
    return rows


def bench_cpu(warmup: int, repeats: int) -> list[tuple]:
    rows = []
    for n, d in CPU_SHAPES:
        x = torch.randn(n, d, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        spec = HistogramSpec(torch.full((d,), -4.0), torch.full((d,), 4.0), 256)
        size = x.numel() * x.element_size()
        cases = [("copy", lambda: y.copy_(x), 2 * size), ("torch", lambda: batch_partials(x), size),
                 ("torch+hist", lambda: batch_partials(x, None, spec), size)]
        copy_bw = None
        for name, fn, moved in cases:
            ms = time_cpu(fn, warmup, repeats)
            bw = moved / ms / 1e6
            copy_bw = copy_bw or bw
            rows.append((f"{n} x {d}", name, ms, bw, bw / copy_bw))
    return rows


def table(rows: list[tuple]) -> str:
    lines = ["| shape (bf16) | variant | time (ms) | GB/s | vs copy |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {s} | {v} | {ms:.3f} | {bw:.3g} | {frac:.0%} |" for s, v, ms, bw, frac in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-append", action="store_true", help="print only")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        machine = torch.cuda.get_device_name()
        rows = bench_gpu(args.warmup, args.repeats)
        note = "GB/s = bytes moved / time (copy moves 2 x the block, the others read it once)."
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}, " \
                  f"{torch.get_num_threads()} threads)"
        rows = bench_cpu(args.warmup, max(3, args.repeats // 4))
        note = ("No CUDA device: CPU sanity timing of the torch path only; the kernel-vs-copy "
                "table needs a GPU.")
    text = table(rows)
    print(text)
    print(note)
    if args.no_append:
        return
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    entry = (f"\n## Statistics kernel, {stamp}, {machine}\n\n"
             f"torch {torch.__version__}; command: `{cmd}`\n\n{text}\n\n{note}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    with RESULTS.open("a") as f:  # append only, never rewrite
        f.write(entry)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
