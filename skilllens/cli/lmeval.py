"""``skilllens lm-eval``: lm-evaluation-harness with the ``skilllens`` model type and the offline
``skilllens_*`` tasks (arguments exactly as ``lm_eval``'s; needs ``pip install skilllens[lmeval]``).
lm-eval's own ``lm_eval --model skilllens ...`` works the same once skilllens is installed
(``skilllens-lmeval.pth``: ``skilllens_lmeval_hook``); this command (or ``python -m
skilllens.lmeval``) registers the model type and the tasks itself, for ``python -S``/``-I`` or
with ``SKILLLENS_NO_LMEVAL_PLUGIN=1``."""
from __future__ import annotations

import argparse

EXAMPLE = """examples:
  skilllens lm-eval --model skilllens --model_args pretrained=smollm2-135m \\
      --tasks skilllens_gsm8k,skilllens_mmlu_redux --limit 20
  skilllens lm-eval --model skilllens \\
      --model_args pretrained=smollm2-135m,edits=audit/na.safetensors+audit/ksd.safetensors \\
      --tasks skilllens_mmlu_redux,skilllens_xquad_en --batch_size 8 --output_path runs/lmeval
  skilllens lm-eval ls tasks            # the hub tasks and the offline skilllens_* ones

edits: skilllens artifacts joined by '+' (NA, KSD, Selective Pruning, concept ablation, graft
mask); their fingerprints must match the model. KSD abstains: generate_until returns the refusal,
loglikelihood is -inf for every continuation (an abstained question scores as wrong)."""


def add_parser(sub):
    from skilllens.cli.common import formatter
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness on a model with skilllens "
                       "edits", description=__doc__, epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                   help="arguments for lm_eval (see: skilllens lm-eval --help)")
    return p


def run(args) -> int:
    from skilllens.errors import SkillLensError
    try:
        from skilllens.lmeval import main
    except ImportError as e:
        raise SkillLensError(f"skilllens lm-eval needs lm-evaluation-harness 0.4 ({e}): pip "
                             f"install 'skilllens[lmeval]'") from None
    rest = [a for a in args.lm_eval_args]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return main(rest or ["--help"])
