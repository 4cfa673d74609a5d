"""skilllens: find where a skill lives in a language model, and remove it."""
__version__ = "0.1.0"

from .architectures import Architecture, ModelAdapter, register_architecture, supported_architectures
from .errors import SkillLensError
from .models import LoadedModel, load_model, model_fingerprint

__all__ = ["Architecture", "ModelAdapter", "register_architecture", "supported_architectures",
           "SkillLensError", "LoadedModel", "load_model", "model_fingerprint", "__version__"]

from .collect import StatsCollection, collect  # noqa: E402
from .data import Item, Skill, load_skill  # noqa: E402
from .hooks import Hook, hooks_applied, run_with_hooks  # noqa: E402
from .neuron_stats import NeuronStats  # noqa: E402

__all__ += ["StatsCollection", "collect", "Item", "Skill", "load_skill", "Hook", "hooks_applied",
            "run_with_hooks", "NeuronStats"]
from . import distributed  # noqa: E402,F401

_LAZY = {"NeuronAdjuster": "neuron_adjust", "KeySpaceDetector": "key_space",
         "SelectivePruner": "selective_pruning", "GraftLocalizer": "grafting",
         "evaluate": "evaluation", "AuditConfig": "audit", "run_audit": "audit",
         "FineTuneConfig": "finetune"}
__all__ += list(_LAZY)


def __getattr__(name):  # the method modules import lazily (``import skilllens`` stays fast)
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'skilllens' has no attribute {name!r}")
