"""Per-run overhead of :func:`skilllens.sandbox.run_python` over a bare ``python -I`` start.

    python benchmarks/sandbox.py [--repeats 30] [--no-append]

Times, for a trivial program (``pass``), the wall clock of each configuration (median and 90th
percentile of ``--repeats`` runs after 3 warm-up runs, configurations interleaved so that load
from other processes spreads over all of them):

* ``bare``: ``subprocess.run([sys.executable, "-I", "-c", "pass"])``, the floor;
* ``sandbox, no kernel layers``: ``run_python`` with Landlock and seccomp turned off (temp
  folder, rlimits, audit hook, status pipe);
* ``sandbox, kernel layers``: the default minus the network namespace;
* ``sandbox, default``: as ``run_python`` runs by default (with ``unshare --user --net`` where
  it works).

The overhead column is the median minus the bare median (target: under 100 ms). The table is
printed and appended to ``benchmarks/RESULTS.md`` (date, machine, command).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from skilllens.sandbox import network_namespace_available, run_python  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def configurations() -> dict:
    """Name -> zero-argument callable that runs ``pass`` once and checks it passed."""
    def bare():
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)

    def sandboxed(**kw):
        def go():
            res = run_python("pass", timeout=20, **kw)
            if not res.passed:
                raise RuntimeError(f"the sandbox failed on 'pass': {res}")
            return res.isolation
        return go

    return {"bare python -I": bare,
            "sandbox, no kernel layers": sandboxed(network_namespace=False,
                                                   layers_off=("landlock", "seccomp")),
            "sandbox, kernel layers": sandboxed(network_namespace=False),
            "sandbox, default": sandboxed()}


def measure(repeats: int) -> tuple[dict, dict]:
    confs = configurations()
    times = {k: [] for k in confs}
    layers = {}
    for k, fn in confs.items():
        for _ in range(3):
            layers[k] = fn()
    for _ in range(repeats):
        for k, fn in confs.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1000)
    return times, layers


def table(times: dict, layers: dict) -> str:
    base = statistics.median(times["bare python -I"])
    rows = ["| configuration | layers | median ms | p90 ms | overhead ms |",
            "|---|---|---:|---:|---:|"]
    for k, ts in times.items():
        med = statistics.median(ts)
        p90 = statistics.quantiles(ts, n=10)[-1]
        over = "-" if k.startswith("bare") else f"{med - base:.1f}"
        rows.append(f"| {k} | {layers[k] or '-'} | {med:.1f} | {p90:.1f} | {over} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-append", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.repeats < 2:
        ap.error("--repeats must be at least 2")
    times, layers = measure(args.repeats)
    tab = table(times, layers)
    print(tab)
    if args.no_append:
        return
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"Python {platform.python_version()}, netns "
               f"{'available' if network_namespace_available() else 'unavailable'}")
    cmd = "python benchmarks/sandbox.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with RESULTS.open("a") as f:  # append only, never rewrite
        f.write(f"\n## Sandbox overhead per run, {_dt.date.today()}, {machine}\n\n"
                f"Command: `{cmd.strip()}` ({args.repeats} runs of `pass` per configuration, "
                f"interleaved, after 3 warm-up runs; shared 2-core machine).\n\n{tab}\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
