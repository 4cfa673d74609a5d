"""Skill data: prompt/answer items with stable ids, from built-in names, ``NAME=PATH`` or files.

Built-in names (resolved in a data folder: ``data_dir=``, ``$SKILLLENS_DATA``, else ``./data`` or
``../shared/data``): ``gsm8k``, ``humaneval``, ``xquad-en`` ... ``xquad-hi`` (also ``xquad-xx`` for
any ``xquad.xx.json``). ``NAME=PATH`` loads a local file in the upstream format of ``NAME``'s
family (``xquad-ru=/data/xquad.ru.json``). A ``.txt`` (one item per non-empty line) or ``.jsonl``
file (fields ``prompt``/``answer``, ``question``/``answer`` or ``text``) is loaded as is.

>>> from skilllens.data import Skill, Item
>>> Skill("demo", [Item("a", "1+1=", "2")]).items[0].text
'1+1=2'
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DataError

XQUAD_LANGS = ("en", "de", "es", "ar", "zh", "vi", "hi")
BUILTIN_SKILLS = ("gsm8k", "humaneval") + tuple(f"xquad-{l}" for l in XQUAD_LANGS)


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
    """A named list of items; ``group`` of an item keeps related items on one side of a split."""

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


def _need(obj: dict, keys, where: str):
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; expected fields {list(keys)}")


def _read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}); expected one "
                                        f"JSON object per line") from None
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None


def _gsm8k(path: Path, name: str) -> list[Item]:
    items = []
    for i, row in _read_jsonl(path):
        _need(row, ("question", "answer"), f"{path}:{i + 1} (GSM8K format)")
        items.append(Item(f"{name}/{path.stem}/{i}", f"Question: {row['question']}\nAnswer:",
                          " " + row["answer"], {"final": row["answer"].split("####")[-1].strip()}))
    return items


def _humaneval(path: Path, name: str) -> list[Item]:
    items = []
    for i, row in _read_jsonl(path):
        _need(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
              f"{path}:{i + 1} (HumanEval format)")
        items.append(Item(row["task_id"], row["prompt"], row["canonical_solution"],
                          {"test": row["test"], "entry_point": row["entry_point"],
                           "group": row["task_id"]}))
    return items


def _squad(path: Path, name: str) -> list[Item]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}); expected SQuAD v1.1 format") from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise DataError(f"{path}: expected SQuAD v1.1 JSON with data[].paragraphs[].qas[] "
                        f"(fields context, qas[].id, qas[].question, qas[].answers[].text)")
    items = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            _need(para, ("context", "qas"), f"{path} paragraph (SQuAD format)")
            group = hashlib.sha256(para["qas"][0]["id"].encode()).hexdigest()[:12] \
                if para["qas"] else ""
            for qa in para["qas"]:
                _need(qa, ("id", "question", "answers"), f"{path} question (SQuAD format)")
                answers = [a["text"] for a in qa["answers"]]
                if not answers:
                    continue
                items.append(Item(f"{name}/{qa['id']}",
                                  f"{para['context']}\n\nQuestion: {qa['question']}\nAnswer:",
                                  " " + answers[0], {"answers": answers, "group": group}))
    return items


def _jsonl(path: Path, name: str) -> list[Item]:
    items = []
    for i, row in _read_jsonl(path):
        if "prompt" in row:
            items.append(Item(str(row.get("id", f"{name}/{i}")), row["prompt"],
                              row.get("answer", row.get("completion", ""))))
        elif "question" in row and "answer" in row:
            items.append(Item(str(row.get("id", f"{name}/{i}")),
                              f"Question: {row['question']}\nAnswer:", " " + str(row["answer"])))
        elif "text" in row:
            items.append(Item(str(row.get("id", f"{name}/{i}")), row["text"]))
        else:
            raise DataError(f"{path}:{i + 1}: expected fields 'prompt' (+ 'answer'), "
                            f"'question' + 'answer', or 'text'; found {sorted(row)}")
    return items


def _txt(path: Path, name: str) -> list[Item]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    return [Item(f"{name}/{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


#: family -> (loader, files inside the data folder for the probe part, for the eval part)
FAMILIES = {
    "gsm8k": (_gsm8k, "gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    "humaneval": (_humaneval, "humaneval/HumanEval.jsonl.gz", None),
    "xquad": (_squad, "xquad/xquad.{lang}.json", None),
    "jsonl": (_jsonl, None, None),
    "txt": (_txt, None, None),
}
#: user-registered families: name -> loader(path, name) -> list[Item]
LOADERS = {}


def _family(name: str) -> str:
    base = name.split("-")[0]
    if base in FAMILIES or base in LOADERS:
        return base
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise DataError(f"unknown skill {name!r}; use a built-in name ({', '.join(BUILTIN_SKILLS)}), "
                    f"NAME=PATH (NAME one of {', '.join(sorted(set(FAMILIES) | set(LOADERS)))}), "
                    f"or a .txt/.jsonl file")


def _load_file(family: str, path: Path, name: str) -> list[Item]:
    loader = LOADERS.get(family) or FAMILIES[family][0]
    return loader(path, name)


def load_skill(spec: str, data_dir_: str | os.PathLike | None = None, part: str = "all") -> Skill:
    """Load a skill by spec; ``part`` is ``"all"``, ``"probe"`` or ``"eval"`` (disjoint)."""
    if part not in ("all", "probe", "eval"):
        raise DataError(f"unknown part {part!r}; use all, probe or eval")
    if "=" in spec:
        name, path = spec.split("=", 1)
        family = _family(name)
        items = _load_file(family, Path(path).expanduser(), name)
        skill = Skill(name, items, str(path), family)
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
        if family == "gsm8k" and part != "all":
            rel = probe_file if part == "probe" else eval_file
            return _nonempty(Skill(spec, _load_file(family, root / rel, spec), str(root / rel),
                                   family))
        rel = probe_file.format(lang=lang)
        items = _load_file(family, root / rel, spec)
        if family == "gsm8k":
            items += _load_file(family, root / eval_file, spec)
        skill = Skill(spec, items, str(root / rel), family)
    skill = _nonempty(skill)
    return skill if part == "all" else split_skill(skill)[0 if part == "probe" else 1]


def _nonempty(skill: Skill) -> Skill:
    if not skill.items:
        raise DataError(f"skill {skill.name!r} from {skill.source} has no items; check the file")
    return skill


def split_skill(skill: Skill, probe_fraction: float = 0.5) -> tuple[Skill, Skill]:
    """Deterministic disjoint probe/eval split by a hash of each item's group (paragraph, task)
    so that related items never fall on both sides; the same ids split the same way in every
    language of XQuAD."""
    def key(it: Item) -> float:
        g = it.meta.get("group") or it.id.split("/")[-1]
        return int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 16 ** 8

    probe = [it for it in skill.items if key(it) < probe_fraction]
    evals = [it for it in skill.items if key(it) >= probe_fraction]
    if not probe or not evals:
        raise DataError(f"skill {skill.name!r} has too few items ({len(skill)}) to split into "
                        f"probe and eval parts")
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
