"""skilllens: find where a skill lives in a language model, and remove it."""
__version__ = "0.1.0"

from .architectures import Architecture, ModelAdapter, register_architecture, supported_architectures
from .errors import SkillLensError
from .models import LoadedModel, load_model, model_fingerprint

__all__ = ["Architecture", "ModelAdapter", "register_architecture", "supported_architectures",
           "SkillLensError", "LoadedModel", "load_model", "model_fingerprint", "__version__"]
