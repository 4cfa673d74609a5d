"""Concepts: a name, its article (the forget corpus), questions, unrelated questions.

Sources: the ConceptVectors JSON format (``Concept``, ``Layer``, ``Dim``, ``QA``,
``unrelated_QA``, ``text_completion``, ``wikipedia_content``; the dev split lives in
``<data>/conceptvectors``) and user files (JSON or YAML) holding one concept or a list::

    - name: Harry Potter
      text: "Harry Potter is a series of seven fantasy novels ..."
      questions: ["Who wrote Harry Potter?"]
      unrelated_questions: ["What is the capital of France?"]
      completions: [{prefix: "Harry, Ron and", target: "Hermione ..."}]   # optional
      translated_questions: {de: ["Wer schrieb Harry Potter?"]}           # optional
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skilllens.io import JsonRecord
from skilllens.errors import DataError

DEV_FILE = "conceptvectors/llama2-7b_concepts_dev.json"
CV_FIELDS = ("Concept", "QA", "unrelated_QA", "wikipedia_content")
USER_FIELDS = ("name", "text", "questions", "unrelated_questions")


@dataclass
class Concept(JsonRecord):
    """One concept. ``reference`` holds the published (layer, index) when known (LLaMA-2-7B)."""

    name: str
    text: str
    questions: list[str]
    unrelated_questions: list[str]
    completions: list[dict] = field(default_factory=list)  # [{"prefix", "target"}]
    translated_questions: dict[str, list[str]] = field(default_factory=dict)
    reference: dict = field(default_factory=dict)

    def __post_init__(self):
        self.questions = [q.strip() for q in self.questions if q and q.strip()]
        self.unrelated_questions = [q.strip() for q in self.unrelated_questions if q and q.strip()]
        if not self.questions:
            raise DataError(f"concept {self.name!r} has no questions; give at least one in "
                            f"'questions' (ConceptVectors: 'QA')")
        if not self.unrelated_questions:
            raise DataError(f"concept {self.name!r} has no unrelated questions; give at least "
                            f"one in 'unrelated_questions' (ConceptVectors: 'unrelated_QA')")
        if not self.text or not self.text.strip():
            raise DataError(f"concept {self.name!r} has an empty 'text' (its article); the "
                            f"search and the unlearning methods need it")


def _need(obj, keys, where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON/YAML object with fields {list(keys)}, "
                        f"got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; expected fields {list(keys)}")


def from_conceptvectors_entry(entry: dict, where: str = "entry") -> Concept:
    """One ConceptVectors record -> :class:`Concept`."""
    _need(entry, CV_FIELDS, where)
    comps = [{"prefix": c["First_half"], "target": c.get("Second_half", "")}
             for c in entry.get("text_completion", []) if isinstance(c, dict) and "First_half" in c]
    ref = {k: entry[src] for k, src in (("layer", "Layer"), ("index", "Dim")) if src in entry}
    if ref:
        ref["model"] = "llama-2-7b-chat"
    return Concept(entry["Concept"], entry["wikipedia_content"], list(entry["QA"]),
                   list(entry["unrelated_QA"]), comps, {}, ref)


def from_user_entry(entry: dict, where: str = "concept") -> Concept:
    """One user concept (fields ``name``, ``text``, ``questions``, ``unrelated_questions``)."""
    if isinstance(entry, dict) and "Concept" in entry:
        return from_conceptvectors_entry(entry, where)
    _need(entry, USER_FIELDS, where)
    comps = []
    for c in entry.get("completions", []) or []:
        _need(c, ("prefix",), f"{where} completion")
        comps.append({"prefix": c["prefix"], "target": c.get("target", "")})
    return Concept(str(entry["name"]), str(entry["text"]), list(entry["questions"]),
                   list(entry["unrelated_questions"]), comps,
                   dict(entry.get("translated_questions", {}) or {}), dict(entry.get("reference", {}) or {}))


def _read(path: Path):
    if not path.exists():
        raise DataError(f"concept file {path} does not exist")
    from skilllens.data import plain_name, read_text
    raw = read_text(path)  # plain, .gz or .xz
    if Path(plain_name(path)).suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DataError("YAML concept files need PyYAML: pip install pyyaml "
                            "(or write the file as JSON)") from None
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML ({e})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a "
                        f"concept object or a list of them") from None


def load_concepts(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                  names: list[str] | None = None, limit: int | None = None) -> list[Concept]:
    """Load concepts from a ConceptVectors JSON, a user JSON/YAML file, or (``path=None``) the
    ConceptVectors dev split, found like every built-in data file (``--data-dir``,
    ``$SKILLLENS_DATA``, the packaged data; see :mod:`skilllens.data`). ``names`` keeps only
    those concepts (in that order)."""
    if path is None:
        from skilllens.data import find_data_file
        found = find_data_file(DEV_FILE, data_dir)
        if found is None:
            raise DataError(f"no concepts given and {DEV_FILE} is in no data folder: pass "
                            f"--concepts FILE or --data-dir DIR (holding conceptvectors/)")
        path = found[1]
    path = Path(path).expanduser()
    doc = _read(path)
    if isinstance(doc, dict) and "concepts" in doc:
        doc = doc["concepts"]
    entries = doc if isinstance(doc, list) else [doc]
    if not entries:
        raise DataError(f"{path} holds no concepts")
    concepts = [from_user_entry(e, f"{path} concept {i}") for i, e in enumerate(entries)]
    if names:
        by_name = {c.name.lower(): c for c in concepts}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise DataError(f"concept(s) {missing} not in {path}; available: "
                            f"{[c.name for c in concepts]}")
        concepts = [by_name[n.lower()] for n in names]
    return concepts[:limit] if limit else concepts
