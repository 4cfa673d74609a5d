"""MMLU-Redux (Gema et al. 2024, github.com/aryopg/mmlu-redux, CC BY 4.0): 57 MMLU subjects x 100
re-annotated questions, one ``mmlu_{subject}.csv`` per subject, read in the upstream format.

Built-in names: ``mmlu-redux`` (all subjects in the data folder) and ``mmlu-redux:SUBJECT``
(``mmlu-redux:anatomy``; several: ``mmlu-redux:anatomy+virology``); ``mmlu-redux=PATH`` reads a
folder or one file. Columns are read by name: ``question``, ``choices`` (a Python-literal list
of 4 strings), ``answer`` (0-3, the MMLU ground truth), ``error_type``, ``correct_answer``
(the annotators' answer for ``Wrong Groundtruth`` rows), ``source``, ``potential_reason``.

The upstream files are not uniform, and each quirk is handled here: ``,`` or ``;`` delimiters
(the one whose header holds every required column), any header order, extra empty columns,
UTF-8 with or without BOM and one cp1252 file (UTF-8 is tried first), CRLF line ends, and
``error_type`` spelled ``ok``/``OK``/``Ok ``/``wrong_groundtruth``... (compared after
lower-casing, stripping and ``_`` -> space). A row that cannot be read (a column missing, a
``choices`` cell that is no list of 4 strings, an ``answer`` outside 0-3/A-D) raises
:class:`~skilllens.errors.DataError` naming the file and the row.

``keep`` (:func:`load_mmlu_redux`): ``"ok"`` (default; the ~5,330 rows whose ground truth the
annotators confirmed), ``"all"`` (every row with its MMLU ground truth), or ``"corrected"``
(the ``ok`` rows plus the ``Wrong Groundtruth`` rows whose ``correct_answer`` is a readable
0-3/A-D, scored against that answer).

Items use lm-evaluation-harness's MMLU prompt (``lm_eval/tasks/mmlu/default``, 0-shot): ::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:

The item's ``answer`` is ``" {letter}. {choice text}"`` (the letter lm-eval scores, then the
text, so teacher-forced token accuracy is graded beyond one token); ``meta`` carries
``choices``, ``gold`` (index), ``subject`` and ``error_type`` for multiple-choice scoring
(:mod:`skilllens.eval.multiple_choice`). MMLU-Redux has no train split: probe and eval parts are
split by a hash of the question text (``meta["group"]``), so the same question always falls on
the same side, in ``mmlu-redux`` and in ``mmlu-redux:SUBJECT`` alike.
"""
from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import lzma
import re
from pathlib import Path

from skilllens.data.items import Item
from skilllens.data.sources import plain_name
from skilllens.errors import DataError

FAMILY = "mmlu-redux"
FOLDER = "mmlu-redux"
KEEP = ("ok", "all", "corrected")
LETTERS = "ABCD"
REQUIRED = ("question", "choices", "answer", "error_type")
CHANCE = 0.25
_FILE = re.compile(r"^mmlu_(\w+)\.csv$")


def subject_title(subject: str) -> str:
    """``high_school_biology`` -> ``high school biology`` (as lm-eval writes it)."""
    return subject.replace("_", " ").strip()


def redux_prompt(subject: str, question: str, choices: list[str]) -> str:
    """lm-eval's 0-shot MMLU prompt (description + ``doc_to_text``); the choices are
    `` A`` ... `` D`` after ``Answer:``."""
    head = f"The following are multiple choice questions (with answers) about " \
           f"{subject_title(subject)}.\n\n" if subject else ""
    return head + question.strip() + "\n" + "".join(
        f"{LETTERS[k]}. {c}\n" for k, c in enumerate(choices)) + "Answer:"


def normalize_error_type(value) -> str:
    """``"OK "``, ``"Ok"`` -> ``"ok"``; ``"wrong_groundtruth"`` -> ``"wrong groundtruth"``."""
    return " ".join(str(value or "").strip().lower().replace("_", " ").split())


def _raw_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".xz":
            return lzma.open(path, "rb").read()
        if path.suffix == ".gz":
            return gzip.open(path, "rb").read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except (lzma.LZMAError, OSError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected an MMLU-Redux CSV "
                        f"(plain, .xz or .gz)") from None


def decode(raw: bytes) -> str:
    """UTF-8 (a BOM dropped), else cp1252 (one upstream file is cp1252)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="strict")


def _header(text: str, path: Path) -> tuple[str, list[str]]:
    first = text.splitlines()[0] if text.strip() else ""
    for delim in (",", ";", "\t"):
        names = [c.strip().lower() for c in next(csv.reader([first], delimiter=delim))]
        if all(r in names for r in REQUIRED):
            return delim, names
    raise DataError(f"{path}:1: header {first[:120]!r} does not name the MMLU-Redux columns "
                    f"{list(REQUIRED)} (delimiter ',' or ';')")


def _index(value, what: str, where: str) -> int:
    s = str(value).strip()
    if s.upper() in LETTERS and s:
        return LETTERS.index(s.upper())
    try:
        f = float(s)
    except ValueError:
        f = -1.0
    if f != int(f) or not 0 <= int(f) <= 3:
        raise DataError(f"{where}: {what} {s[:40]!r} is not an index 0-3 or a letter A-D")
    return int(f)


def read_redux_csv(path: str | Path) -> list[dict]:
    """Rows of one upstream file as dicts (lower-cased column names; ``choices`` a list of 4
    strings, ``answer`` an int, ``error_type`` normalised, ``row`` the 1-based data row).
    Raises DataError naming the file and row for a row that cannot be read."""
    path = Path(path)
    text = decode(_raw_bytes(path))
    delim, names = _header(text, path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    next(reader)
    rows = []
    for i, cells in enumerate(reader, start=1):
        if not any(c.strip() for c in cells):
            continue
        where = f"{path} row {i} (line {reader.line_num})"
        if len(cells) < len(names) and any(n in REQUIRED for n in names[len(cells):]):
            raise DataError(f"{where}: {len(cells)} cells for the {len(names)} header columns "
                            f"{names}; check the quoting of that row")
        if len(cells) > len(names) and any(c.strip() for c in cells[len(names):]):
            raise DataError(f"{where}: {len(cells)} cells for the {len(names)} header columns "
                            f"{names}; check the quoting of that row")
        row = {n: cells[k] for k, n in enumerate(names) if n and k < len(cells)}
        try:
            choices = ast.literal_eval(row["choices"].strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            choices = None
        if not isinstance(choices, (list, tuple)) or len(choices) != 4 or \
                not all(isinstance(c, (str, int, float)) for c in choices):
            raise DataError(f"{where}: choices {row['choices'][:80]!r} is not a Python list of "
                            f"4 strings")
        row["choices"] = [str(c) for c in choices]
        row["answer"] = _index(row["answer"], "answer", where)
        row["error_type"] = normalize_error_type(row.get("error_type"))
        row["row"] = i
        rows.append(row)
    return rows


def _corrected(row: dict) -> int | None:
    try:
        return _index(row.get("correct_answer", ""), "correct_answer", "")
    except DataError:
        return None


def rows_to_items(rows: list[dict], subject: str, name: str, keep: str = "ok") -> list[Item]:
    """Items of one subject's rows under ``keep`` (module docstring)."""
    if keep not in KEEP:
        raise DataError(f"unknown keep={keep!r} for MMLU-Redux; use one of {', '.join(KEEP)}")
    items = []
    for r in rows:
        gold, et = r["answer"], r["error_type"]
        if keep == "ok" and et != "ok":
            continue
        if keep == "corrected" and et != "ok":
            gold = _corrected(r) if et == "wrong groundtruth" else None
            if gold is None:
                continue
        group = hashlib.sha256(r["question"].strip().encode()).hexdigest()[:12]
        items.append(Item(f"{FAMILY}/{subject}/{r['row']}",
                          redux_prompt(subject, r["question"], r["choices"]),
                          f" {LETTERS[gold]}. {r['choices'][gold]}",
                          {"subject": subject, "choices": r["choices"], "gold": gold,
                           "answer": LETTERS[gold], "error_type": et, "group": group}))
    return items


def subject_of(path: Path) -> str:
    m = _FILE.match(plain_name(path))
    return m.group(1) if m else Path(plain_name(path)).stem


def redux_files(folder: Path) -> dict[str, Path]:
    """``{subject: file}`` of the ``mmlu_*.csv[.xz|.gz]`` files in ``folder``."""
    out = {}
    for p in sorted(folder.iterdir()):
        if _FILE.match(plain_name(p)):
            out.setdefault(subject_of(p), p)
    return out


def parse_spec(name: str) -> list[str] | None:
    """``mmlu-redux:anatomy+virology`` -> ``["anatomy", "virology"]``; None for all subjects."""
    _, _, subj = name.partition(":")
    subs = [s.strip() for s in subj.split("+") if s.strip()]
    return subs or None


def load_mmlu_redux(path: str | Path, name: str = FAMILY, keep: str = "ok",
                    subjects: list[str] | None = None) -> list[Item]:
    """Items of an MMLU-Redux folder (``mmlu_{subject}.csv``, plain or ``.xz``/``.gz``) or one
    file; ``subjects`` (default: from ``name``'s ``:SUBJECT`` part, else all) and ``keep``
    as in the module docstring. Raises DataError for an unknown subject or an unreadable row."""
    path = Path(path)
    subjects = subjects if subjects is not None else parse_spec(name)
    if path.is_dir():
        files = redux_files(path)
        if not files:
            raise DataError(f"{path}: no MMLU-Redux files mmlu_SUBJECT.csv in this folder")
        if subjects:
            unknown = [s for s in subjects if s not in files]
            if unknown:
                raise DataError(f"unknown MMLU-Redux subject(s) {unknown}; choose from "
                                f"{', '.join(files)}")
            files = {s: files[s] for s in subjects}
    else:
        files = {subject_of(path): path}
    return [it for s, f in files.items()
            for it in rows_to_items(read_redux_csv(f), s, FAMILY, keep)]


def load_family(path: Path, name: str) -> list[Item]:
    """The ``FAMILIES`` loader: ``load_mmlu_redux`` with the default ``keep="ok"``."""
    return load_mmlu_redux(path, name)
