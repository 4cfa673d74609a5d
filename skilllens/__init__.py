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
