"""Skill data: prompt/answer items with stable ids, from built-in names, ``NAME=PATH``, hub ids.

Built-in names (resolved in a data folder: ``data_dir=``, ``$SKILLLENS_DATA``, else ``./data`` or
``../shared/data``): ``gsm8k``, ``humaneval``, ``xquad-en`` ... ``xquad-hi`` (also ``xquad-xx`` for
any ``xquad.xx.json``), and ``mbpp`` / ``mmlu`` when ``mbpp/mbpp.jsonl`` / ``mmlu/`` exist there.
``NAME=PATH`` loads a local file (or an MMLU folder) in the upstream format of ``NAME``'s family
(``xquad-ru=/data/xquad.ru.json``, ``mbpp=mbpp.jsonl``, ``mmlu=data/test``, ``mlqa-de=x.json``).
A ``.txt`` (one item per non-empty line) or ``.jsonl``/``.json`` file (fields ``prompt``/``answer``,
``question``/``answer`` or ``text``) is loaded as is. ``hub:ORG/NAME[:config][@split]`` (or
``NAME=hub:...``) loads a Hugging Face data set through the ``datasets`` library; only then is
the network used.

Probe and eval parts never overlap: upstream train/test files where they exist (GSM8K, MBPP's
official task ranges, MMLU dev+val/test, hub splits), else a hash of each item's group (XQuAD
paragraph, aligned across languages; HumanEval task); eval items whose id or prompt also occurs
in the probe part are dropped.

>>> from skilllens.data import Skill, Item
>>> Skill("demo", [Item("a", "1+1=", "2")]).items[0].text
'1+1=2'
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DataError

XQUAD_LANGS = ("en", "de", "es", "ar", "zh", "vi", "hi")
BUILTIN_SKILLS = ("gsm8k", "humaneval") + tuple(f"xquad-{l}" for l in XQUAD_LANGS)
HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class Item:
    """One example: the model reads ``prompt`` and should continue with ``answer``."""

    id: str
    prompt: str
    answer: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass
class Skill:
    """A named list of items; ``group`` of an item keeps related items on one side of a split,
    ``part`` (``"probe"``/``"eval"``) pins an item to an upstream split."""

    name: str
    items: list[Item]
    source: str = ""
    family: str = "text"

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def head(self, n: int | None) -> "Skill":
        return self if n is None else replace(self, items=self.items[: int(n)])

    def digest(self) -> str:
        """sha256 over ids and texts (goes into artifact metadata)."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.id.encode())
            h.update(b"\0")
            h.update(it.text.encode())
            h.update(b"\1")
        return h.hexdigest()[:16]


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the data folder (argument, ``$SKILLLENS_DATA``, ``./data``, ``../shared/data``)."""
    candidates = [path, os.environ.get("SKILLLENS_DATA"), "data", "../shared/data"]
    for c in candidates:
        if c and Path(c).expanduser().is_dir():
            return Path(c).expanduser()
    raise DataError("no data folder found: pass --data-dir DIR (Python: data_dir=DIR) or set "
                    "SKILLLENS_DATA to the folder holding gsm8k/, humaneval/, xquad/")


#: user-registered families: name -> loader(path, name) -> list[Item]
LOADERS = {}


def __getattr__(attr):  # ``skilllens.data.FAMILIES`` etc. live in data_formats (lazy: no cycle)
    if attr in ("FAMILIES", "load_hub", "mbpp_prompt", "mmlu_prompt"):
        from . import data_formats
        return getattr(data_formats, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _family(name: str) -> str:
    from .data_formats import FAMILIES
    base = name.split("-")[0]
    if base in FAMILIES or base in LOADERS:
        return base
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise DataError(f"unknown skill {name!r}; use a built-in name ({', '.join(BUILTIN_SKILLS)}), "
                    f"NAME=PATH (NAME one of {', '.join(sorted(set(FAMILIES) | set(LOADERS)))}), "
                    f"hub:ORG/NAME[:config][@split], or a .txt/.jsonl file")


def _load_file(family: str, path: Path, name: str) -> list[Item]:
    from .data_formats import FAMILIES
    loader = LOADERS.get(family) or FAMILIES[family][0]
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path (NAME=PATH) or the data "
                        f"folder (--data-dir / $SKILLLENS_DATA)")
    return loader(path, name)


def load_skill(spec: str, data_dir_: str | os.PathLike | None = None, part: str = "all") -> Skill:
    """Load a skill by spec; ``part`` is ``"all"``, ``"probe"`` or ``"eval"`` (disjoint)."""
    if part not in ("all", "probe", "eval"):
        raise DataError(f"unknown part {part!r}; use all, probe or eval")
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty skill spec; give a built-in name, NAME=PATH or a file")
    from .data_formats import FAMILIES, load_hub
    if spec.startswith(HUB_PREFIX):
        skill = load_hub(spec[len(HUB_PREFIX):])
    elif "=" in spec:
        name, path = spec.split("=", 1)
        if path.startswith(HUB_PREFIX):
            skill = load_hub(path[len(HUB_PREFIX):], name)
        else:
            family = _family(name)
            skill = Skill(name, _load_file(family, Path(path).expanduser(), name), str(path),
                          family)
    elif spec.endswith((".txt", ".jsonl", ".jsonl.gz")) or Path(spec).is_file():
        family = _family(spec if not Path(spec).is_file() else Path(spec).name)
        name = Path(spec).name.split(".")[0]
        skill = Skill(name, _load_file(family, Path(spec), name), spec, family)
    else:
        family = _family(spec)
        if family not in FAMILIES or FAMILIES[family][1] is None:
            raise DataError(f"{spec!r} is not a built-in skill; give a path: {spec}=PATH")
        root = data_dir(data_dir_)
        _, probe_file, eval_file = FAMILIES[family]
        lang = spec.split("-", 1)[1] if family == "xquad" and "-" in spec else "en"
        rel = probe_file.format(lang=lang)
        if not (root / rel).exists():
            raise DataError(f"built-in skill {spec!r} needs {root / rel}, which does not exist; "
                            f"put the upstream file there or pass {spec}=PATH")
        items = _load_file(family, root / rel, spec)
        if eval_file:
            items += _load_file(family, root / eval_file, spec)
        skill = Skill(spec, items, str(root / rel), family)
    skill = _nonempty(skill)
    return skill if part == "all" else split_skill(skill)[0 if part == "probe" else 1]


def _nonempty(skill: Skill) -> Skill:
    if not skill.items:
        raise DataError(f"skill {skill.name!r} from {skill.source or 'memory'} has no items; "
                        f"check the file (it is empty or holds no usable rows)")
    return skill


def split_skill(skill: Skill, probe_fraction: float = 0.5) -> tuple[Skill, Skill]:
    """Disjoint (probe, eval) parts. Items pinned by ``meta["part"]`` (upstream train/test) keep
    their side when both sides are present; otherwise a deterministic hash of each item's group
    (paragraph, task) decides, so related items never fall on both sides and the same ids split
    the same way in every language of XQuAD. Eval items whose id or prompt text also occurs in
    the probe part are dropped."""
    if not 0 < probe_fraction < 1:
        raise DataError(f"probe_fraction must be in (0, 1), got {probe_fraction}")

    def key(it: Item) -> float:
        g = it.meta.get("group") or it.id.split("/")[-1]
        return int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 16 ** 8

    pinned = {it.meta.get("part") for it in skill.items}
    if pinned == {"probe", "eval"}:
        probe = [it for it in skill.items if it.meta["part"] == "probe"]
        evals = [it for it in skill.items if it.meta["part"] == "eval"]
    else:
        probe = [it for it in skill.items if key(it) < probe_fraction]
        evals = [it for it in skill.items if key(it) >= probe_fraction]
    seen_ids, seen_prompts = {it.id for it in probe}, {it.prompt for it in probe}
    evals = [it for it in evals if it.id not in seen_ids and it.prompt not in seen_prompts]
    if not probe or not evals:
        raise DataError(f"skill {skill.name!r} has too few distinct items ({len(skill)}) to split "
                        f"into probe and eval parts; give at least a few dozen items")
    return (replace(skill, items=probe, name=skill.name), replace(skill, items=evals))


def as_skill(data, data_dir_=None, part: str = "all") -> Skill:
    """Accept a Skill, a spec string, a list of Items or a list of strings."""
    if isinstance(data, Skill):
        return _nonempty(data)
    if isinstance(data, str):
        return load_skill(data, data_dir_, part)
    data = list(data)
    if not data:
        raise DataError("the data set is empty; pass at least one text or item")
    if isinstance(data[0], Item):
        return Skill("items", data)
    return Skill("texts", [Item(f"text/{i}", str(t)) for i, t in enumerate(data)])


def sample_skill(skill: Skill, n: int | None, seed: int = 0) -> Skill:
    """``n`` items drawn without replacement by a seeded shuffle (all items if ``n`` is None)."""
    if n is None or n >= len(skill):
        return skill
    import random
    idx = sorted(random.Random(seed).sample(range(len(skill)), int(n)))
    return replace(skill, items=[skill.items[i] for i in idx])
