"""The package layout stays as ARCHITECTURE.md draws it: layered subpackages, no import cycle
(function-level imports included), no module over 400 lines, few top-level modules, and the old
flat import paths still work (with a DeprecationWarning)."""
from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import skilllens
from skilllens import _compat

ROOT = Path(skilllens.__file__).resolve().parent
#: lower number = lower layer; a module may import its own subpackage and lower layers only
#: (display: HTML/figure helpers above io, below everything that renders with them)
LAYERS = {"errors": 0, "_version": 0, "_compat": 0, "io": 1, "display": 1.5, "stats": 2, "data": 2,
          "sandbox": 2, "core": 3, "eval": 4, "unlearning": 5, "grafting": 5, "concepts": 5,
          "lmeval": 6, "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("skilllens",) + (rel[:-1] if rel[-1] == "__init__" else rel))
        out[name] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    return _compat.new_name(name) or name


def _imports(name: str, path: Path) -> set[str]:
    """Every skilllens module ``name`` imports, at any depth of the file (lazy ones too)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names if a.name.startswith("skilllens")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("skilllens"):
                continue
            mod = _resolve(mod)
            for a in node.names:  # ``from pkg import submodule``
                sub = _resolve(f"{mod}.{a.name}")
                out.add(sub if sub in MODULES else mod)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> tuple[str, int] | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package root re-exports everything
    return parts[1], LAYERS.get(parts[1], -1)


def test_every_subpackage_has_a_layer():
    assert {n.split(".")[1] for n in MODULES if n.count(".")} <= set(LAYERS)


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodules while they import siblings is no cycle
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name, deps in GRAPH.items():
        me = _layer(name)
        for dep in deps:
            other = _layer(dep)
            if me is None or other is None:
                if other is None and me is not None and dep == "skilllens":
                    bad.append((name, dep))
                continue
            if other[0] != me[0] and other[1] >= me[1]:
                bad.append((name, dep))
    assert bad == []


def test_no_module_over_400_lines_and_a_small_top_level():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize("old", sorted(_compat.ALIASES))
def test_old_import_paths_still_work_with_a_deprecation_warning(old):
    new = importlib.import_module(_compat.new_name(f"skilllens.{old}"))
    public = [n for n in getattr(new, "__all__", dir(new)) if not n.startswith("_")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        importlib.import_module(f"skilllens.{old}")
        import sys
        sys.modules.pop(f"skilllens.{old}", None)
        mod = importlib.import_module(f"skilllens.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message)
               for w in seen)
    for n in public[:20]:
        assert getattr(mod, n) is getattr(new, n)


def test_public_api_paths_named_by_the_docs():
    from skilllens.data import as_skill  # noqa: F401
    from skilllens.sandbox import run_python  # noqa: F401
    assert callable(skilllens.load_skill) and callable(skilllens.evaluate)
    for name in skilllens.__all__:
        assert getattr(skilllens, name) is not None


def test_importing_the_old_collect_module_keeps_skilllens_collect_callable():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import skilllens.collect as old
    assert old.StatsCollection is importlib.import_module("skilllens.core.collect").StatsCollection
    import sys
    sys.modules.pop("skilllens.collect")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import skilllens.collect  # noqa: F401  (a second import, as after a module reload)
    lm = skilllens.load_model("tiny-llama")
    assert skilllens.collect(lm, ["a b", "c d"], sites="gate", progress=False).layers("gate")
