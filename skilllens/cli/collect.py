"""``skilllens collect``: per-neuron statistics of FFN sites over a skill's data."""
from __future__ import annotations

from skilllens.stats.neuron_stats import ALL_STATS, DEFAULT_STATS
from skilllens.cli.common import command, load

EXAMPLE = """examples:
  skilllens collect --data gsm8k --site gate --max-items 64 --out gsm8k_gate.safetensors
  skilllens collect --model tiny-llama --data notes.txt --site key --tokens last --out k.safetensors
  skilllens collect --data xquad-ru=/data/xquad.ru.json --site gate --layers 0,5,-1 --out ru.safetensors

Every item of --data is used unless --part probe|eval asks for one part of its split.
The output holds tensors named {site}.{layer}.{stat} (count, mean, var, std, m2, min, max,
mean_abs, frac_pos, n_nonfinite, ...) and JSON metadata (model fingerprint, arguments, data hash)."""


def add_parser(sub):
    p = command(sub, "collect", "collect per-neuron activation statistics", __doc__, EXAMPLE)
    p.add_argument("--data", required=True,
                   help="skill: gsm8k, humaneval, xquad-en..xquad-hi, NAME=PATH, or a .txt/.jsonl file")
    p.add_argument("--part", default="all", choices=["all", "probe", "eval"],
                   help="which items of --data: all (default: every item given), or the probe or "
                        "eval part of its probe/eval split")
    p.add_argument("--site", default="gate", help="gate, up or key (comma-separated for several; "
                   "mixture-of-experts models also router, routing)")
    p.add_argument("--layers", default="all", help="all, or comma-separated indices (-1 = last)")
    p.add_argument("--tokens", default="all", choices=["all", "last", "answer"])
    p.add_argument("--backend", default="torch", choices=["torch", "lens", "nnsight"])
    p.add_argument("--stats", default=",".join(DEFAULT_STATS),
                   help=f"comma-separated subset of {','.join(ALL_STATS)}")
    p.add_argument("--bins", type=int, default=256, help="histogram bins (with --stats ...,histogram)")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file: resume an interrupted run with the same arguments")
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints")
    p.add_argument("--store-dir", default=None,
                   help="also store the selected vectors as safetensors shards here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output .safetensors file")
    return p


def run(args) -> int:
    from skilllens.core.collect import collect
    from skilllens.errors import ArtifactError

    if not args.out.endswith(".safetensors"):
        raise ArtifactError(f"--out {args.out} must end in .safetensors")
    lm = load(args)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    res = collect(lm, args.data, sites=args.site.split(","), layers=layers, tokens=args.tokens,
                  batch_size=args.batch_size, max_length=args.max_length,
                  stats=tuple(args.stats.split(",")), bins=args.bins, backend=args.backend,
                  max_items=args.max_items, data_dir=args.data_dir, part=args.part,
                  progress=not args.no_progress, checkpoint=args.checkpoint,
                  checkpoint_every=args.checkpoint_every, store=bool(args.store_dir),
                  store_dir=args.store_dir)
    res.save(args.out)
    print(f"wrote {args.out}: {len(res.keys())} site/layer pairs, {res.meta['n_items']} items "
          f"({res.meta['data_part']}), {res.meta['n_tokens']} tokens")
    return 0
