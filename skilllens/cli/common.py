"""Shared CLI options."""
from __future__ import annotations

import argparse

from skilllens.core.models import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=f"model spec: {DEFAULT_MODEL} (embedded, default), tiny-llama, a hub id, "
                        f"a local folder or a .gguf file")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with gsm8k/, humaneval/, xquad/, conceptvectors/ (upstream "
                        "files); files it lacks come from $SKILLLENS_DATA, then the data packaged "
                        "with skilllens (see: skilllens info --data)")


def formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def command(sub, name: str, help: str, doc: str, example: str,
            model: bool = True) -> argparse.ArgumentParser:
    """A subcommand's parser: its help, description (the module docstring), examples and the
    shared ``--model/--device/--dtype`` (unless ``model=False``) and ``--data-dir`` options."""
    p = sub.add_parser(name, help=help, epilog=example, formatter_class=formatter,
                       description=doc)
    if model:
        add_model_args(p)
    add_data_args(p)
    return p


def load(args):
    import sys

    from skilllens.core.models import load_model
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"device: {lm.device}", file=sys.stderr)
    return lm
