"""The flat import paths of skilllens 0.1 (``skilllens.models``, ``skilllens.evaluation``...) as
deprecated aliases of their new homes, for one release.

An import of an old path gets a thin module that forwards attribute access to the new module
and raises a :class:`DeprecationWarning` naming the new path. Patching through an alias does not
reach the real module: patch the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module under ``skilllens`` -> its new home
ALIASES = {
    "architectures": "core.architectures", "models": "core.models",
    "tokenizers": "core.tokenizers", "cache": "core.cache", "hooks": "core.hooks",
    "batching": "core.batching", "collect": "core.collect", "artifacts": "core.artifacts", "distributed": "core.distributed",
    "partials": "stats.partials", "quantiles": "stats.quantiles",
    "neuron_stats": "stats.neuron_stats", "kernels": "stats.kernels",
    "data_formats": "data.formats", "evaluation": "eval", "scoring": "eval.scoring",
    "neuron_adjust": "unlearning.neuron_adjust",
    "key_space": "unlearning.key_space", "selective_pruning": "unlearning.selective_pruning",
    "audit": "unlearning.audit", "report": "unlearning.report", "figures": "unlearning.figures",
    "finetune": "grafting.finetune", "graft_tasks": "grafting.tasks",
    "graft_metrics": "grafting.metrics",
}
RELEASE = "0.3"


def new_name(old: str) -> str | None:
    """``skilllens.models`` -> ``skilllens.core.models`` (None if ``old`` is no alias)."""
    if not old.startswith("skilllens."):
        return None
    head, _, tail = old[len("skilllens."):].partition(".")
    if head not in ALIASES:
        return None
    return "skilllens." + ALIASES[head] + ("." + tail if tail else "")


class AliasModule(types.ModuleType):
    """A forwarding module; callable where the package attribute it shadows was a function
    (``import skilllens.collect`` rebinds ``skilllens.collect``, which must stay callable)."""

    def __call__(self, *args, **kwargs):
        fn = self.__dict__.get("_shadowed")
        if fn is None:
            raise TypeError(f"module {self.__name__!r} is not callable")
        return fn(*args, **kwargs)


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds old paths; loads each as a forwarding module."""

    def find_spec(self, name, path=None, target=None):
        if new_name(name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module = AliasModule(spec.name)
        parent, _, child = spec.name.rpartition(".")
        shadowed = getattr(sys.modules.get(parent), "__dict__", {}).get(child)
        if isinstance(shadowed, AliasModule):  # imported before: keep what it forwarded to
            shadowed = shadowed.__dict__.get("_shadowed")
        if callable(shadowed) and not isinstance(shadowed, types.ModuleType):
            module._shadowed = shadowed
        return module

    def exec_module(self, module):
        new = new_name(module.__name__)
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes away in skilllens "
                      f"{RELEASE}", DeprecationWarning, stacklevel=2)  # importlib frames are skipped
        target = importlib.import_module(new)
        module.__doc__ = f"Deprecated alias of :mod:`{new}`."
        module.__dict__["__getattr__"] = lambda attr: getattr(target, attr)
        module.__dict__["__dir__"] = lambda: dir(target)
        module.__dict__["__all__"] = list(getattr(target, "__all__", [
            n for n in dir(target) if not n.startswith("_")]))
        if hasattr(target, "__path__"):
            module.__path__ = []  # old subpackages (skilllens.kernels.triton_stats) resolve too


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())


class DeprecatedAlias:
    """Class attribute: an old attribute name kept as a deprecated alias of ``new`` (reads and
    writes go to ``new`` and raise a :class:`DeprecationWarning` naming it). Used for fitted
    attributes renamed to scikit-learn's trailing-underscore convention
    (``NeuronAdjuster.params`` -> ``params_``)."""

    def __init__(self, new: str):
        self.new, self.old = new, None

    def __set_name__(self, owner, name):
        self.old = name

    def _warn(self, obj):
        warnings.warn(f"{type(obj).__name__}.{self.old} is deprecated; use .{self.new} (fitted "
                      f"attributes end in '_'; the old name goes in {RELEASE})",
                      DeprecationWarning, stacklevel=3)

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        self._warn(obj)
        return getattr(obj, self.new)

    def __set__(self, obj, value):
        self._warn(obj)
        setattr(obj, self.new, value)
