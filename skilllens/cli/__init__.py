"""``skilllens`` command line. Each subcommand lives in its own module with ``add_parser`` and
``run``; add a module name to ``COMMANDS`` to register one."""
from __future__ import annotations

import argparse
import importlib
import sys

from skilllens.errors import SkillLensError

COMMANDS = ["info", "collect", "audit", "localize", "concepts", "lmeval"]


def build_parser() -> argparse.ArgumentParser:
    from skilllens._version import __version__

    parser = argparse.ArgumentParser(
        prog="skilllens", description="Find where a skill lives in a language model, and remove it.",
        epilog="Run 'skilllens COMMAND --help' for examples.")
    parser.add_argument("--version", action="version", version=f"skilllens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"] and not {"-h", "--help"} >= set(argv[1:2]):
        # lm_eval's own options pass through untouched (argparse would claim them)
        argv = ["lm-eval", "--", *argv[1:]] if len(argv) > 1 else argv
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return args._run(args) or 0
    except SkillLensError as e:
        print(f"skilllens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
