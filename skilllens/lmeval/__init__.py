"""lm-evaluation-harness bridge: the ``skilllens`` model type and offline ``skilllens_*`` tasks.

lm-eval's own command line sees both once skilllens is installed (``skilllens-lmeval.pth`` and
``skilllens_lmeval_hook``: the model type is registered, and the task folder indexed, when lm-eval
imports its registry and task manager)::

    lm_eval --model skilllens --model_args pretrained=smollm2-135m,edits=na.safetensors \
        --tasks skilllens_gsm8k,skilllens_mmlu_redux --limit 20

``skilllens lm-eval ARGS`` / ``python -m skilllens.lmeval ARGS`` do the same registration
themselves (for ``python -S``/``-I`` or ``SKILLLENS_NO_LMEVAL_PLUGIN=1``). Importing this package
registers the model type too.

From Python::

    from skilllens.lmeval import SkillLensLM, task_manager
    import lm_eval
    res = lm_eval.simple_evaluate(model=SkillLensLM(lm=lm, methods=[na, ksd]),
                                  tasks=["skilllens_mmlu_redux"], task_manager=task_manager())

Modules: :mod:`~skilllens.lmeval.model` (``SkillLensLM``, abstention rule), ``edits``
(artifacts by kind), ``docs`` (the offline tasks' data and scoring), ``tasks/`` (YAML).
"""
from skilllens.lmeval.edits import KINDS, load_edit, parse_edits
from skilllens.lmeval.model import TASKS_DIR, SkillLensLM, task_manager

__all__ = ["SkillLensLM", "task_manager", "TASKS_DIR", "load_edit", "parse_edits", "KINDS",
           "main"]


def main(argv=None) -> int:
    """``lm_eval``'s command line with the ``skilllens`` model registered and the offline tasks'
    folder added to ``--include_path``; returns lm-eval's exit status."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        parser = HarnessCLI()
        args = parser.parse_args()
        if hasattr(args, "include_path"):  # run, ls, validate: our tasks first, then the user's
            args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path
                                                    else [])
        parser.execute(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
