"""Upstream data formats -> :class:`~skilllens.data.Item` lists: GSM8K, HumanEval, MBPP, MMLU,
SQuAD/XQuAD/MLQA, generic JSONL/JSON/parquet rows, plain text; and the Hugging Face hub loader.

Every parser names the fields it expected when a row does not fit. ``FAMILIES`` maps a family
name to ``(loader(path, name) -> list[Item], probe file, eval file)`` inside the data folder.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
from dataclasses import replace
from pathlib import Path

from skilllens.data.items import Item, Skill
from skilllens.data.mmlu import FOLDER as _REDUX_FOLDER, load_family as _mmlu_redux
from skilllens.data.sources import (BUILTIN_SKILLS, HUB_PREFIX, HUB_REFS, data_roots,
                                    describe_source, find_data_file, hub_allowed, plain_name)
from skilllens.errors import DataError


def open_text(path: str | Path):
    """Open a plain, ``.gz`` or ``.xz`` file for reading UTF-8 text."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".xz":
            return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None


def read_text(path: str | Path) -> str:
    """The whole text of a plain, ``.gz`` or ``.xz`` file."""
    with open_text(path) as f:
        return f.read()


def _need(obj: dict, keys, where: str):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with fields {list(keys)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; expected fields {list(keys)}")


def _read_jsonl(path: Path):
    try:
        with open_text(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}); expected one "
                                        f"JSON object per line") from None
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None


def _read_rows(path: Path):
    """(index, row) pairs from .jsonl[.gz], .json (a list of rows) or .parquet."""
    suffix = Path(plain_name(path)).suffix
    if suffix in (".parquet", ".json"):
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        if suffix == ".parquet":
            try:
                import pandas as pd
            except ImportError:
                raise DataError("reading .parquet files needs pandas and pyarrow: "
                                "pip install pandas pyarrow") from None
            return list(enumerate(pd.read_parquet(path).to_dict("records")))
        try:
            doc = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a JSON list of rows (or use .jsonl)")
        return list(enumerate(doc))
    return list(_read_jsonl(path))


# ---- one row -> one Item, per family (shared by file and hub loaders) ----------------------

def _gsm8k_row(row, i, name, split, where):
    _need(row, ("question", "answer"), f"{where} (GSM8K format)")
    return Item(f"{name}/{split}/{i}", f"Question: {row['question']}\nAnswer:",
                " " + row["answer"], {"final": row["answer"].split("####")[-1].strip(),
                                      "part": "eval" if split == "test" else "probe"})


def _humaneval_row(row, i, name, split, where):
    _need(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
          f"{where} (HumanEval format)")
    return Item(row["task_id"], row["prompt"], row["canonical_solution"],
                {"test": row["test"], "entry_point": row["entry_point"], "group": row["task_id"]})


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """MBPP prompt: the task and its tests in a docstring; the model continues with code."""
    return '"""\n' + text.strip() + "\nYour code should pass these tests:\n" + \
        "\n".join(tests) + '\n"""\n'


def _mbpp_row(row, i, name, split, where):
    text = row.get("text", row.get("prompt"))
    if text is None or not {"task_id", "code", "test_list"} <= set(row):
        raise DataError(f"{where} (MBPP format): expected fields ['task_id', 'text' (or 'prompt'), "
                        f"'code', 'test_list']; found {sorted(row)}")
    tid, tests = int(row["task_id"]), list(row["test_list"])
    part = "eval" if 11 <= tid <= 510 else "probe"   # the paper's split: 11-510 are test tasks
    return Item(f"{name}/{tid}", mbpp_prompt(text, tests), row["code"].replace("\r\n", "\n") + "\n",
                {"test_list": tests, "test_setup_code": row.get("test_setup_code") or "",
                 "group": str(tid), "part": part})


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """MMLU prompt: question, lettered choices, ``Answer:``; the answer is `` A`` ... `` D``."""
    subj = subject.replace("_", " ").strip()
    head = f"The following is a multiple choice question about {subj}.\n\n" if subj else ""
    return head + question.strip() + "\n" + "".join(
        f"{'ABCD'[k]}. {c}\n" for k, c in enumerate(choices)) + "Answer:"


def _mmlu_row(row, i, name, split, where):
    _need(row, ("question", "choices", "answer"), f"{where} (MMLU format)")
    ans, choices = row["answer"], list(row["choices"])
    letter = "ABCD"[int(ans)] if not isinstance(ans, str) else ans.strip().upper()
    if len(choices) != 4 or letter not in ("A", "B", "C", "D"):
        raise DataError(f"{where} (MMLU format): expected 4 choices and answer 0-3 or A-D")
    subject = str(row.get("subject", ""))
    return Item(f"{name}/{subject or 'all'}/{split}/{i}", mmlu_prompt(subject, row["question"],
                choices), " " + letter, {"subject": subject, "answer": letter,
                                         "part": "eval" if split == "test" else "probe"})


def _generic_row(row, i, name, split, where):
    rid = str(row.get("id", f"{name}/{split + '/' if split else ''}{i}"))
    if "prompt" in row:
        return Item(rid, row["prompt"], str(row.get("answer", row.get("completion", ""))))
    if "question" in row and "answer" in row:
        return Item(rid, f"Question: {row['question']}\nAnswer:", " " + str(row["answer"]))
    if "text" in row:
        return Item(rid, row["text"])
    raise DataError(f"{where}: expected fields 'prompt' (+ 'answer'), 'question' + 'answer', or "
                    f"'text'; found {sorted(row)}")


def _squad_qa(name, context, qa, group, where):
    _need(qa, ("id", "question", "answers"), f"{where} question (SQuAD format)")
    answers = qa["answers"]
    answers = list(answers["text"]) if isinstance(answers, dict) else [a["text"] for a in answers]
    if not answers:
        return None
    lang = name.split("-", 1)[1] if "-" in name else ""
    return Item(f"{name}/{qa['id']}", f"{context}\n\nQuestion: {qa['question']}\nAnswer:",
                " " + answers[0], {"answers": answers, "group": group, "lang": lang})


def _group_of(first_id: str) -> str:
    return hashlib.sha256(first_id.encode()).hexdigest()[:12]


ROWS = {"gsm8k": _gsm8k_row, "humaneval": _humaneval_row, "mbpp": _mbpp_row, "mmlu": _mmlu_row,
        "jsonl": _generic_row}


def _rows_loader(family):
    def load(path: Path, name: str) -> list[Item]:
        split = path.name.split(".")[0] if family in ("gsm8k", "mmlu") else ""
        return [ROWS[family](row, i, name, split, f"{path}:{i + 1}")
                for i, row in _read_rows(path)]
    return load


_gsm8k, _humaneval, _mbpp, _jsonl = (_rows_loader(f) for f in ("gsm8k", "humaneval", "mbpp",
                                                                  "jsonl"))


def _squad(path: Path, name: str) -> list[Item]:
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}); expected SQuAD v1.1 format") from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise DataError(f"{path}: expected SQuAD v1.1 JSON with data[].paragraphs[].qas[] "
                        f"(fields context, qas[].id, qas[].question, qas[].answers[].text)")
    items = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            _need(para, ("context", "qas"), f"{path} paragraph (SQuAD format)")
            group = _group_of(para["qas"][0]["id"]) if para["qas"] else ""
            items += [it for qa in para["qas"]
                      if (it := _squad_qa(name, para["context"], qa, group, str(path)))]
    return items


def _mmlu(path: Path, name: str) -> list[Item]:
    """Upstream MMLU CSV (question,A,B,C,D,answer; no header), a folder of them (``*_dev.csv``,
    ``*_val.csv`` -> probe, ``*_test.csv`` -> eval), or the hub layout (.parquet/.json/.jsonl)."""
    if path.is_dir():
        files = sorted(path.rglob("*.csv")) or sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no MMLU .csv or .parquet files found in this folder")
        return [it for f in files for it in _mmlu(f, name)]
    if Path(plain_name(path)).suffix != ".csv":
        return _rows_loader("mmlu")(path, name)
    stem = Path(plain_name(path)).stem
    split = next((s for s in ("test", "dev", "val") if stem.endswith("_" + s)), "test")
    subject = stem[: -len(split) - 1] if stem.endswith("_" + split) else stem
    with open_text(path) as f:
        rows = list(csv.reader(f))
    items = []
    for i, r in enumerate(rows):
        if len(r) != 6:
            raise DataError(f"{path}:{i + 1} (MMLU format): expected 6 columns "
                            f"question,A,B,C,D,answer with no header; found {len(r)}")
        items.append(_mmlu_row({"question": r[0], "choices": r[1:5], "answer": r[5],
                                "subject": subject}, i, name, split, f"{path}:{i + 1}"))
    return items


def _txt(path: Path, name: str) -> list[Item]:
    lines = read_text(path).splitlines()
    return [Item(f"{name}/{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


#: family -> (loader, files inside the data folder for the probe part, for the eval part)
FAMILIES = {
    "gsm8k": (_gsm8k, "gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    "humaneval": (_humaneval, "humaneval/HumanEval.jsonl.gz", None),
    "xquad": (_squad, "xquad/xquad.{lang}.json", None),
    "mbpp": (_mbpp, "mbpp/mbpp.jsonl", None),
    "mmlu": (_mmlu, "mmlu", None),
    "mmlu-redux": (_mmlu_redux, _REDUX_FOLDER, None),
    "mlqa": (_squad, None, None),
    "squad": (_squad, None, None),
    "jsonl": (_jsonl, None, None),
    "txt": (_txt, None, None),
}
def _hub_family(columns: set, name: str) -> str:
    fam = name.split("-")[0]
    if fam in ROWS or fam in ("xquad", "mlqa", "squad"):
        return fam
    if {"task_id", "canonical_solution", "test", "entry_point"} <= columns:
        return "humaneval"
    if {"code", "test_list"} <= columns:
        return "mbpp"
    if {"question", "choices", "answer"} <= columns:
        return "mmlu"
    if {"context", "question", "answers"} <= columns:
        return "squad"
    return "jsonl"


def load_hub(ref: str, name: str | None = None) -> Skill:
    """``ORG/NAME[:config][@split]`` from the Hugging Face hub via ``datasets`` (network!).
    Without ``@split``: ``test`` -> eval part, other splits (not ``auxiliary_train``) -> probe."""
    try:
        import datasets
    except ImportError:
        raise DataError("hub data sets need the datasets package: pip install datasets") from None
    path, _, split = ref.partition("@")
    path, _, config = path.partition(":")
    name = name or path.rstrip("/").split("/")[-1].lower()
    try:
        ds = datasets.load_dataset(path, config or None, split=split or None)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise DataError(f"cannot load hub data set {ref!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the id, config and "
                        f"split, or download it and use {name}=PATH") from None
    tables = {split: ds} if split else {k: v for k, v in dict(ds).items()
                                         if k != "auxiliary_train"}
    items = []
    for sp, table in tables.items():
        rows = [dict(r) for r in table]
        if not rows:
            continue
        family = _hub_family(set(rows[0]), name)
        where = f"hub:{path}@{sp}"
        if family in ("xquad", "mlqa", "squad"):
            first = {}
            for r in rows:
                first.setdefault(r["context"], r["id"])
            new = [_squad_qa(name, r["context"], r, _group_of(first[r["context"]]), where)
                   for r in rows]
            new = [it for it in new if it]
        else:
            new = [ROWS[family](r, i, name, sp, f"{where} row {i}") for i, r in enumerate(rows)]
        if not split:
            new = [replace(it, meta={**it.meta, "part": "eval" if sp == "test" else "probe"})
                   for it in new]
        items += new
    return Skill(name, items, HUB_PREFIX + ref, family if tables else "jsonl")


def data_sources(data_dir_=None) -> dict:
    """Where each built-in skill (and the concepts file) resolves to: ``{name: source}``."""
    roots = data_roots(data_dir_)
    out = {}
    for name in (*BUILTIN_SKILLS, "mbpp", "mmlu"):
        fam = name if name in FAMILIES else name.split("-")[0]
        rel = FAMILIES[fam][1].format(lang=name.split("-", 1)[-1])
        found = find_data_file(rel, roots=roots)
        out[name] = describe_source(*found) if found else \
            ("hub:" + HUB_REFS[fam].format(lang=name.split("-", 1)[-1]) if hub_allowed() and fam in HUB_REFS
             else f"not found ({rel}; pass {name}=PATH or --data-dir)")
    found = find_data_file("conceptvectors/llama2-7b_concepts_dev.json", roots=roots)
    out["concepts"] = describe_source(*found) if found else "not found"
    return out
