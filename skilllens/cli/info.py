"""``skilllens info``: architecture, layers, d_model, d_ff and sites of a model."""
from __future__ import annotations

import json

from .common import add_model_args, formatter, load

EXAMPLE = """example:
  skilllens info --model smollm2-135m
  skilllens info --model tiny-gpt2 --json"""


def add_parser(sub):
    p = sub.add_parser("info", help="describe a model's FFN sites", epilog=EXAMPLE,
                       formatter_class=formatter, description=__doc__)
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    lm = load(args)
    desc = {"model": lm.name, **lm.adapter.describe(), "fingerprint": lm.fingerprint["id"],
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "device": str(lm.device)}
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        for k, v in desc.items():
            print(f"{k:13s} {', '.join(v) if isinstance(v, list) else v}")
    return 0
