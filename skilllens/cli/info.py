"""``skilllens info``: architecture, layers, d_model, d_ff and sites of a model; with ``--data``,
where each built-in skill's data is read from."""
from __future__ import annotations

import json

from skilllens.cli.common import command, load

EXAMPLE = """examples:
  skilllens info --model smollm2-135m
  skilllens info --model tiny-gpt2 --json
  skilllens info --data                      # where gsm8k, humaneval, xquad-* ... are read from
  skilllens info --data --data-dir ../shared/data
  skilllens info --architectures             # every model type: supported / refused (why)
  skilllens info --architectures --types phi3 opt gemma3"""

ORDER = ("--data-dir DIR, then $SKILLLENS_DATA, then the data packaged with skilllens, then "
         "(only with SKILLLENS_ALLOW_HUB=1 and HF_HUB_OFFLINE unset) the Hugging Face hub")


def add_parser(sub):
    p = command(sub, "info", "describe a model's FFN sites (or, with --data, the data)", __doc__, EXAMPLE)
    p.add_argument("--data", action="store_true",
                   help="print where each built-in skill's data comes from (loads no model)")
    p.add_argument("--architectures", action="store_true",
                   help="try a tiny random model of every language-model type of the installed "
                        "transformers and print which are supported, refused (and why) or "
                        "untested, as a Markdown table (docs/ARCHITECTURES.md is its output; "
                        "takes minutes)")
    p.add_argument("--types", nargs="+", metavar="TYPE",
                   help="with --architectures: only these model types")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def data_info(data_dir=None) -> dict:
    """The resolution order and the resolved source of each built-in skill."""
    from skilllens.data import data_roots, hub_allowed
    from skilllens.data.formats import data_sources
    return {"order": ORDER, "folders": [f"{o}: {r}" for o, r in data_roots(data_dir)],
            "hub_allowed": hub_allowed(), "sources": data_sources(data_dir)}


def run(args) -> int:
    if args.architectures:
        from skilllens.core.coverage import coverage, markdown_table
        rows = coverage(args.types)
        print(json.dumps(rows, indent=2) if args.json else markdown_table(rows), end="\n"
              if args.json else "")
        return 0
    if args.data:
        info = data_info(args.data_dir)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"order     {info['order']}")
            for folder in info["folders"]:
                print(f"folder    {folder}")
            print(f"hub       {'allowed' if info['hub_allowed'] else 'not allowed'}")
            for name, src in info["sources"].items():
                print(f"{name:9s} {src}")
        return 0
    lm = load(args)
    desc = {"model": lm.name, **lm.adapter.describe(), "fingerprint": lm.fingerprint["id"],
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "device": str(lm.device)}
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        for k, v in desc.items():
            print(f"{k:13s} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return 0
