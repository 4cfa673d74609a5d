"""What every benchmark records beside its table: the command that ran it, and the append to
``benchmarks/RESULTS.md`` (append only: earlier entries are never rewritten)."""
from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def command(script: str, argv=None) -> str:
    """``python benchmarks/<script> <args>`` as it was run (``argv`` when called from Python)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args]).strip()


def record(text: str, append: bool = True) -> None:
    """Print ``text``; unless ``append`` is False, append it to RESULTS.md."""
    print(text)
    if append:
        with RESULTS.open("a") as f:
            f.write(text)
