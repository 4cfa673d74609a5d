"""``lm_eval --model skilllens`` and the offline ``skilllens_*`` tasks on lm-eval's own command line.

lm-evaluation-harness 0.4 has no plugin mechanism: its command line finds model types only in
its registry and tasks only in its own folder and ``--include_path``. ``skilllens-lmeval.pth``,
installed with skilllens, calls :func:`install` when Python starts. That adds one finder to
``sys.meta_path`` and imports nothing (no torch, no skilllens, no lm_eval); it acts only when
lm-eval itself is imported:

* after ``lm_eval.models``: the model type ``skilllens`` is registered as a lazy placeholder
  for ``skilllens.lmeval.model:SkillLensLM`` (imported on first use);
* after ``lm_eval.tasks.manager``: every ``TaskManager`` that includes lm-eval's default tasks
  also indexes skilllens's task folder (``skilllens/lmeval/tasks``: ``skilllens_gsm8k``,
  ``skilllens_mmlu_redux``, ``skilllens_xquad_en``, ``skilllens_xquad_de``).

``SKILLLENS_NO_LMEVAL_PLUGIN=1`` switches it off; ``python -S`` / ``-I`` skip ``.pth`` files (then
use ``skilllens lm-eval ...``, which registers both itself).
"""
from __future__ import annotations

import os
import sys

MODEL_TARGET = "skilllens.lmeval.model:SkillLensLM"


def tasks_dir() -> str | None:
    """skilllens's lm-eval task folder, found without importing skilllens."""
    import importlib.util

    spec = importlib.util.find_spec("skilllens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "lmeval", "tasks")
    return os.path.realpath(path) if os.path.isdir(path) else None


def _register_model(module) -> None:
    from lm_eval.api import registry

    if not hasattr(registry, "model_registry"):  # lm-eval < 0.4.9: no lazy entries; the
        import importlib                          # module registers itself by decorator
        importlib.import_module(MODEL_TARGET.split(":")[0])
    elif "skilllens" not in registry.model_registry:
        registry.model_registry.register("skilllens", target=MODEL_TARGET)


def _add_task_folder(module) -> None:
    import functools
    import inspect

    cls = module.TaskManager
    init = cls.__init__
    if getattr(init, "_skilllens_tasks", False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        folder = tasks_dir()
        if folder and bound.arguments.get("include_defaults", True):
            given = bound.arguments.get("include_path") or []
            given = list(given) if isinstance(given, (list, tuple)) else [given]
            if folder not in {os.path.realpath(str(p)) for p in given}:
                bound.arguments["include_path"] = given + [folder]
        init(*bound.args, **bound.kwargs)

    __init__._skilllens_tasks = True
    cls.__init__ = __init__


AFTER_IMPORT = {"lm_eval.models": _register_model, "lm_eval.tasks.manager": _add_task_folder}


class _Loader:
    """A module's own loader, then the skilllens step for that module."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._after(module)
        except Exception as e:  # never break lm-eval itself
            import warnings
            warnings.warn(f"skilllens could not register with lm-eval ({e!r}); use "
                          f"'skilllens lm-eval ...' instead", RuntimeWarning, stacklevel=2)


class AfterImportFinder:
    """``sys.meta_path`` entry: finds nothing itself; wraps the loader of the modules in
    :data:`AFTER_IMPORT` so that their step runs right after they are executed."""

    def find_spec(self, name, path=None, target=None):
        after = AFTER_IMPORT.get(name)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, after)
                return spec
        return None


def install() -> None:
    """Add the finder (once; not when ``SKILLLENS_NO_LMEVAL_PLUGIN`` is set). If lm-eval's
    modules are already imported, apply the steps now."""
    if os.environ.get("SKILLLENS_NO_LMEVAL_PLUGIN"):
        return
    if not any(isinstance(f, AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImportFinder())
    for name, after in AFTER_IMPORT.items():
        if name in sys.modules:
            after(sys.modules[name])
