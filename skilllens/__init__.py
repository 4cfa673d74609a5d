"""skilllens: find where a skill lives in a language model, and remove it.

The data flow, one subpackage each (see ARCHITECTURE.md): :mod:`skilllens.data` (skills) ->
:mod:`skilllens.core` (models, hooks, collect) -> :mod:`skilllens.stats` (per-neuron statistics)
-> a method's ``fit`` / ``applied`` (:mod:`skilllens.unlearning`, :mod:`skilllens.grafting`,
:mod:`skilllens.concepts`) -> :mod:`skilllens.eval` (scores; :mod:`skilllens.sandbox` runs code)
-> reports and figures drawn from saved results.
"""
from skilllens import _compat
from skilllens._version import __version__
from skilllens.core.architectures import (Architecture, ModelAdapter, register_architecture,
                                          supported_architectures)
from skilllens.core.collect import StatsCollection, collect
from skilllens.core.fingerprint import model_fingerprint
from skilllens.core.hooks import Hook, hooks_applied, run_with_hooks
from skilllens.core.loaded_model import LoadedModel
from skilllens.core.models import load_model
from skilllens.data import Item, Skill, load_skill
from skilllens.errors import SkillLensError
from skilllens.stats import NeuronStats
from skilllens.core import distributed  # noqa: F401  (skilllens.distributed.all_merge)

_compat.install()

#: the method modules import lazily (``import skilllens`` stays fast)
_LAZY = {"NeuronAdjuster": "unlearning.neuron_adjust", "KeySpaceDetector": "unlearning.key_space",
         "SelectivePruner": "unlearning.selective_pruning", "GraftLocalizer": "grafting.localizer",
         "evaluate": "eval.evaluation", "AuditConfig": "unlearning.audit",
         "run_audit": "unlearning.audit", "FineTuneConfig": "grafting.finetune",
         "show_neuron": "core.neuron_view", "NeuronView": "core.neuron_view",

         "ExpertDeactivator": "unlearning.experts", "ExpertHook": "core.moe_hooks",
         "RouterHook": "core.moe_hooks"}

__all__ = ["Architecture", "ModelAdapter", "register_architecture", "supported_architectures",
           "SkillLensError", "LoadedModel", "load_model", "model_fingerprint", "__version__",
           "StatsCollection", "collect", "Item", "Skill", "load_skill", "Hook", "hooks_applied",
           "run_with_hooks", "NeuronStats", *_LAZY]


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f"skilllens.{_LAZY[name]}"), name)
    if name in _compat.ALIASES:  # old module paths: skilllens.evaluation etc. (deprecated)
        return importlib.import_module(f"skilllens.{name}")
    raise AttributeError(f"module 'skilllens' has no attribute {name!r}")
