"""Skill data: prompt/answer items with stable ids, from built-in names, ``NAME=PATH``, hub ids.

Built-in names: ``gsm8k``, ``humaneval``, ``xquad-en`` ... ``xquad-hi`` (``xquad-xx`` for any
``xquad.xx.json``), ``mbpp``, ``mmlu`` (not packaged). Their files are looked up in this order (the
one place it is defined; ``skilllens info --data`` prints the result for each name):
1. ``data_dir=`` / ``--data-dir DIR`` (a folder holding ``gsm8k/``, ``humaneval/``, ``xquad/``...),
2. ``$SKILLLENS_DATA``, 3. the data packaged with skilllens (``skilllens/data/packaged``: upstream
files, xz-compressed, with LICENSEs and a sha256 manifest), 4. the Hugging Face hub (full sets,
via ``datasets``) only with ``SKILLLENS_ALLOW_HUB=1`` and ``HF_HUB_OFFLINE`` unset, never otherwise.

A folder that holds the file wins; all files of one skill come from the same place. Plain
upstream files and ``.gz``/``.xz``-compressed copies are read alike. ``Skill.source`` records where
the items came from (``packaged:gsm8k/train.jsonl.xz``, ``SKILLLENS_DATA:/data/gsm8k/train.jsonl``,
``hub:openai/gsm8k:main``, or a user path) and ``Skill.digest()`` their hash.

``NAME=PATH`` loads a local file (or an MMLU folder) in the upstream format of ``NAME``'s family
(``xquad-ru=/data/xquad.ru.json``, ``mbpp=mbpp.jsonl``, ``mmlu=data/test``, ``mlqa-de=x.json``).
A ``.txt`` (one item per non-empty line) or ``.jsonl``/``.json`` file (fields ``prompt``/``answer``,
``question``/``answer`` or ``text``) is loaded as is. ``hub:ORG/NAME[:config][@split]`` (or
``NAME=hub:...``) loads a Hugging Face data set through the ``datasets`` library (network).

Probe and eval parts never overlap: upstream train/test files where they exist (GSM8K, MBPP's
official task ranges, MMLU dev+val/test, hub splits), else a hash of each item's group (XQuAD
paragraph, aligned across languages; HumanEval task); eval items whose id or prompt also occurs
in the probe part are dropped. Every caller names the part it needs (:func:`resolve_skills`'s
``part``): fits and calibrations ask for ``"probe"`` (they never see evaluation items),
evaluation entry points (``evaluate``, ``KeySpaceDetector.evaluate_detection``,
``abstains``) for ``"eval"``, and statistics (``collect``, ``skilllens collect``) for ``"all"``:
every item of what the user gave, unless a part is asked for. The returned ``Skill`` records
its part and the part sizes (``Skill.part``, ``Skill.counts``, ``Skill.describe()``:
``"probe part: 9 of 12 items; eval: 3"``) so that outputs can say which items were used.

Lists (``retain=[...]``, :func:`resolve_skills`): ``Skill`` objects and ``Item`` lists are used as
they are (whatever ``part`` says: they are the items the caller chose). A bare string is always
one spec (``"gsm8k"``, ``"humaneval,xquad-en"``), never a sequence of characters. A list of strings is a list of specs when every string is one (a known name,
``NAME=PATH``, ``hub:...``, an existing file); it is a list of literal texts when none is one and
none resembles one (``["The cat sat.", "2+2=4", "a"]``). A list mixing specs and other strings,
or holding a near-miss name (``"humaneval2"``, ``"gsm8"``, ``"mbpp=x"``), is an error listing the
choices; wrap such texts with :func:`from_texts`.

"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

from skilllens.data.formats import FAMILIES, load_hub
from skilllens.data.items import Item, Skill
from skilllens.data.sources import (BUILTIN_SKILLS, CHOICES, HUB_PREFIX, HUB_REFS, _is_file,
                                    data_roots, describe_source, find_data_file, hub_allowed,
                                    plain_name)
from skilllens.errors import DataError

#: user-registered families: name -> loader(path, name) -> list[Item]
LOADERS = {}



def _family(name: str) -> str:
    head = name.split(":", 1)[0]  # a family named in full (mmlu-redux, mmlu-redux:SUBJECT)
    if head in FAMILIES or head in LOADERS:
        return head
    base = name.split("-")[0]
    if base in FAMILIES or base in LOADERS:
        return base
    plain = plain_name(name)
    if plain.endswith((".jsonl", ".json", ".parquet")):
        return "jsonl"
    if plain.endswith(".txt"):
        return "txt"
    raise DataError(f"unknown skill {name!r}; use {CHOICES} "
                    f"(NAME=PATH: NAME one of {', '.join(sorted(set(FAMILIES) | set(LOADERS)))})")


def _load_file(family: str, path: Path, name: str) -> list[Item]:
    loader = LOADERS.get(family) or FAMILIES[family][0]
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path (NAME=PATH) or the data "
                        f"folder (--data-dir / $SKILLLENS_DATA)")
    return loader(path, name)


def _builtin(spec: str, family: str, data_dir_) -> Skill:
    """A built-in name through the resolution order (module docstring)."""
    _, probe_file, eval_file = FAMILIES[family]
    lang = spec.split("-", 1)[1] if family == "xquad" and "-" in spec else "en"
    rel = probe_file.format(lang=lang)
    roots = data_roots(data_dir_)
    found = find_data_file(rel, roots=roots)
    if found is None:
        if hub_allowed() and family in HUB_REFS:
            ref = HUB_REFS[family].format(lang=lang)
            return replace(load_hub(ref, spec), name=spec)
        where = ", ".join(f"{o} {r}" for o, r in roots) or "no data folder"
        raise DataError(f"built-in skill {spec!r} needs {rel}, found in none of: {where}; put the "
                        f"upstream file in --data-dir DIR (or $SKILLLENS_DATA), pass {spec}=PATH, "
                        f"or allow the hub with SKILLLENS_ALLOW_HUB=1 (HF_HUB_OFFLINE unset)")
    origin, path = found
    items, sources = _load_file(family, path, spec), [describe_source(origin, path)]
    if eval_file:
        root = dict(roots)[origin]
        ev = find_data_file(eval_file, roots=[(origin, root)])
        if ev is None:
            raise DataError(f"built-in skill {spec!r}: {path} exists but {root / eval_file} does "
                            f"not; put both upstream files in that folder")
        items += _load_file(family, ev[1], spec)
        sources.append(describe_source(origin, ev[1]).split(":", 1)[1])
    return Skill(spec, items, ",".join(sources), family)


def load_skill(spec: str, data_dir_: str | os.PathLike | None = None,
               part: str = "probe") -> Skill:
    """Load a skill by spec; ``part`` is ``"probe"`` (default: what fits may see), ``"eval"``
    or ``"all"`` (both; probe and eval are disjoint)."""
    if part not in ("all", "probe", "eval"):
        raise DataError(f"unknown part {part!r}; use all, probe or eval")
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty skill spec; give {CHOICES}")
    spec = spec.strip()
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
    elif plain_name(spec).endswith((".txt", ".jsonl")) or _is_file(spec):
        family = _family(plain_name(spec))
        name = Path(spec).name.split(".")[0]
        skill = Skill(name, _load_file(family, Path(spec), name), spec, family)
    else:
        family = _family(spec)
        if family not in FAMILIES or FAMILIES[family][1] is None:
            raise DataError(f"{spec!r} is not a built-in skill; give a path: {spec}=PATH")
        skill = _builtin(spec, family, data_dir_)
    skill = replace(_nonempty(skill), part="all", counts={"all": len(skill)})
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
                        f"into probe and eval parts; give a few dozen items or use part='all'")
    counts = {"all": len(skill), "probe": len(probe), "eval": len(evals)}
    return (replace(skill, items=probe, part="probe", counts=counts),
            replace(skill, items=evals, part="eval", counts=dict(counts)))


_NAME_LIKE = re.compile(r"^[A-Za-z][\w\-]*$")


def _known_name(s: str) -> bool:
    if s.split(":", 1)[0] in BUILTIN_SKILLS:  # mmlu-redux:SUBJECT
        return True
    fam = s.split("-")[0]
    return s in BUILTIN_SKILLS or (fam in FAMILIES and FAMILIES[fam][1] is not None and
                                   (fam == "xquad") == bool(re.fullmatch(r"xquad-\w{2,}", s)))


def is_spec(s: str) -> bool:
    """True for a known built-in name, ``NAME=PATH`` (``NAME`` a known family), ``hub:...``
    or an existing file: the strings a list of skill names may hold."""
    s = s.strip()
    if s.startswith(HUB_PREFIX) or _known_name(s):
        return True
    if "=" in s:
        name, path = s.split("=", 1)
        try:
            return bool(path.strip()) and bool(_NAME_LIKE.match(name)) and bool(_family(name))
        except DataError:
            return False
    return _is_file(s)


def _near_name(s: str) -> bool:
    """A bare word close to a known name (``humaneval2``, ``gsm8``), or ``NAME=PATH``-shaped:
    meant as a name, not as a text."""
    import difflib
    s = s.strip()
    if "=" in s and " " not in s and _NAME_LIKE.match(s.split("=", 1)[0]):
        return True
    names = [*BUILTIN_SKILLS, *FAMILIES, *LOADERS]
    return bool(_NAME_LIKE.match(s)) and bool(difflib.get_close_matches(s.lower(), names, 1, 0.75))


def from_texts(texts, name: str = "texts") -> Skill:
    """A skill of literal texts (one item each), never read as skill names; a bare string is
    one text."""
    texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
    if not texts:
        raise DataError("the data set is empty; pass at least one text or item")
    return Skill(name, [Item(f"{name}/{i}", t) for i, t in enumerate(texts)],
                 counts={"all": len(texts)})


def _pool(parts: list[Skill], name: str | None = None) -> Skill:
    if len(parts) == 1 and name is None:
        return parts[0]
    kinds = {p.part for p in parts}
    keys = set.intersection(*(set(p.counts) for p in parts)) if len(kinds) == 1 else set()
    return Skill(name or "+".join(p.name for p in parts), [it for p in parts for it in p.items],
                 ";".join(p.source for p in parts), parts[0].family
                 if len({p.family for p in parts}) == 1 else "text",
                 parts[0].part if len(kinds) == 1 else "all",
                 {k: sum(p.counts[k] for p in parts) for k in keys})


PARTS = ("all", "probe", "eval")


def resolve_skills(data, data_dir_=None, part: str = "probe", name: str | None = None) -> Skill:
    """The one resolution of skill input (used by every estimator, ``collect``, ``evaluate``
    and the CLI): a ``Skill`` (as is), a spec string (``"humaneval,xquad-en"`` pools several;
    never iterated character by character), a list of specs, ``Skill``s, ``Item``s or literal
    texts (rule in the module docstring), or one ``Item``. Specs give their ``part``:
    ``"probe"`` (the default, what fits may see), ``"eval"`` (held-out items, for evaluation
    entry points) or ``"all"`` (both, for statistics); ``Skill``s, items and texts are used as
    given. Several skills are pooled into one. The result records its part and the part sizes
    (``Skill.describe()``). Raises ``DataError`` for an unknown part, an empty input or a
    string that is neither a spec nor (in a list) clearly a text."""
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; use all, probe or eval")
    if isinstance(data, Skill):
        return _nonempty(data)
    if isinstance(data, Item):
        data = [data]
    if isinstance(data, bytes):
        raise DataError("data is bytes; decode it to a spec string, or pass a list of texts")
    if isinstance(data, str):
        specs = [s.strip() for s in data.split(",") if s.strip()] \
            if "," in data and not is_spec(data) else [data]
        if len(specs) > 1 and not all(is_spec(s) for s in specs):
            bad = [s for s in specs if not is_spec(s)]
            raise DataError(f"{bad} in {data!r} are not skills; use {CHOICES}")
        return _pool([load_skill(s, data_dir_, part) for s in specs], name)
    data = list(data)
    if not data:
        raise DataError("the data set is empty; pass at least one skill, text or item")
    if all(isinstance(d, Item) for d in data):
        return Skill(name or "items", data, counts={"all": len(data)})
    if any(isinstance(d, Skill) for d in data):
        return _pool([resolve_skills(d, data_dir_, part) for d in data], name)
    strs = [d for d in data if isinstance(d, str)]
    if len(strs) != len(data):
        raise DataError(f"a data list must hold only skill names, Skills, Items or texts; got "
                        f"{sorted({type(d).__name__ for d in data})}")
    specs = [is_spec(s) for s in strs]
    if all(specs):
        return _pool([load_skill(s, data_dir_, part) for s in strs], name)
    if any(specs) or any(_near_name(s) for s in strs):
        bad = [s for s, ok in zip(strs, specs) if not ok]
        raise DataError(f"cannot tell skill names from texts in this list: {bad[:5]} "
                        f"{'are' if len(bad) > 1 else 'is'} no known skill; use {CHOICES} for "
                        f"every entry, or pass literal texts with skilllens.data.from_texts([...])")
    return from_texts(strs, name or "texts")


def as_skill(data, data_dir_=None, part: str = "probe") -> Skill:
    """Accept a Skill, a spec string, a list of specs, Items or texts (the same as
    :func:`resolve_skills`); a spec gives its ``part`` (default ``"probe"``)."""
    return resolve_skills(data, data_dir_, part)


def combine_skills(skills, data_dir=None, name: str | None = None) -> Skill:
    """Pool retain skills into one ``Skill`` (:func:`resolve_skills`, probe parts)."""
    if skills is None or (not isinstance(skills, (str, Skill)) and not list(skills)) or \
            (isinstance(skills, str) and not skills.strip(", ")):
        raise DataError("no retain skill given; name at least one skill to keep")
    return resolve_skills(skills, data_dir, "probe", name)


def sample_skill(skill: Skill, n: int | None, seed: int = 0) -> Skill:
    """``n`` items drawn without replacement by a seeded shuffle (all items if ``n`` is None)."""
    if n is None or n >= len(skill):
        return skill
    import random
    idx = sorted(random.Random(seed).sample(range(len(skill)), int(n)))
    return replace(skill, items=[skill.items[i] for i in idx])
