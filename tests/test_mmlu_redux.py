"""MMLU-Redux: the upstream files' quirks, keep options, built-in names and their splits."""
from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from skilllens.data import is_spec, load_skill
from skilllens.data.mmlu import load_mmlu_redux, read_redux_csv, redux_prompt
from skilllens.errors import DataError

SHARED = next((p / "shared" / "data" / "mmlu-redux" for p in Path(__file__).resolve().parents
               if (p / "shared" / "data" / "mmlu-redux").is_dir()), Path("/nonexistent"))
HEAD = "question,choices,answer,error_type,source,correct_answer,potential_reason"


def _write(path: Path, text: str, encoding="utf-8", newline="\r\n"):
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "redux"
    d.mkdir()
    # ',' with CRLF, the usual header order, error_type spelled three ways
    _write(d / "mmlu_anatomy.csv", HEAD + "\n"
           '"Which bone?","[\'femur\', \'ulna\', \'skull\', \'rib\']",0,OK,,,\n'
           'Which organ pumps?,"[\'liver\', \'heart\', \'lung\', \'skin\']",1,Ok ,,,\n'
           'Bad one?,"[\'a\', \'b\', \'c\', \'d\']",2,wrong_groundtruth,,D,\n'
           'Unclear?,"[\'a\', \'b\', \'c\', \'d\']",3,Bad Question Clarity,,,\n')
    # ';' delimiter, another column order, trailing empty columns
    _write(d / "mmlu_virology.csv",
           "question;choices;answer;correct_answer;error_type;source;potential_reason;;\n"
           "What is a virion?;['a particle'; 'b'; 'c'; 'd'];0;;ok;;;;\n".replace(
               "['a particle'; 'b'; 'c'; 'd']", "\"['a particle', 'b', 'c', 'd']\""), newline="\n")
    # cp1252 with a curly apostrophe (0xd5 in upstream's moral_scenarios is cp1252 too)
    _write(d / "mmlu_moral_scenarios.csv", HEAD + "\n"
           "I took my neighbor\u2019s paper.,\"['Wrong', 'Not wrong', 'x', 'y']\",0,ok,,,\n",
           encoding="cp1252")
    return d


def test_every_quirk_is_read(tmp_path):
    d = _folder(tmp_path)
    items = load_mmlu_redux(d, keep="all")
    by = {it.id: it for it in items}
    assert set(by) == {"mmlu-redux/anatomy/1", "mmlu-redux/anatomy/2", "mmlu-redux/anatomy/3",
                       "mmlu-redux/anatomy/4", "mmlu-redux/moral_scenarios/1",
                       "mmlu-redux/virology/1"}
    assert by["mmlu-redux/anatomy/2"].meta["error_type"] == "ok"           # "Ok " -> ok
    assert by["mmlu-redux/anatomy/3"].meta["error_type"] == "wrong groundtruth"
    assert by["mmlu-redux/virology/1"].meta["choices"][0] == "a particle"
    assert "neighbor\u2019s" in by["mmlu-redux/moral_scenarios/1"].prompt
    assert by["mmlu-redux/anatomy/2"].answer == " B. heart"


def test_keep_ok_all_and_corrected(tmp_path):
    d = _folder(tmp_path)
    ok = {it.id for it in load_mmlu_redux(d)}
    assert ok == {"mmlu-redux/anatomy/1", "mmlu-redux/anatomy/2",
                  "mmlu-redux/moral_scenarios/1", "mmlu-redux/virology/1"}
    corr = {it.id: it for it in load_mmlu_redux(d, keep="corrected")}
    assert set(corr) == ok | {"mmlu-redux/anatomy/3"}
    assert corr["mmlu-redux/anatomy/3"].meta["gold"] == 3 and \
        corr["mmlu-redux/anatomy/3"].answer == " D. d"      # the annotators' answer, not 2
    assert len(load_mmlu_redux(d, keep="all")) == 6
    with pytest.raises(DataError, match="keep"):
        load_mmlu_redux(d, keep="some")


@pytest.mark.parametrize("row, what", [
    ('Q?,"[\'a\', \'b\']",0,ok,,,', "choices"),
    ('Q?,"[\'a\', \'b\', \'c\', \'d\']",7,ok,,,', "answer"),
    ('Q?,"not a list",0,ok,,,', "choices"),
    ('Q?,"[\'a\', \'b\', \'c\', \'d\']"', "cells"),
])
def test_an_unreadable_row_names_file_and_row(tmp_path, row, what):
    p = _write(tmp_path / "mmlu_law.csv", HEAD + "\n" + 'Fine?,"[\'a\', \'b\', \'c\', \'d\']",'
               '1,ok,,,\n' + row + "\n")
    with pytest.raises(DataError, match=rf"mmlu_law\.csv row 2 .*{what}"):
        read_redux_csv(p)


def test_a_header_without_the_columns_is_an_error(tmp_path):
    p = _write(tmp_path / "mmlu_law.csv", "q|c|a\n1|2|3\n")
    with pytest.raises(DataError, match=r"mmlu_law\.csv:1: header"):
        read_redux_csv(p)


def test_prompt_is_lm_evals_mmlu_template():
    p = redux_prompt("high_school_biology", " What? ", ["x", "y", "z", "w"])
    assert p == ("The following are multiple choice questions (with answers) about high school "
                 "biology.\n\nWhat?\nA. x\nB. y\nC. z\nD. w\nAnswer:")


def test_builtin_names_and_split_guarantees():
    assert is_spec("mmlu-redux") and is_spec("mmlu-redux:anatomy")
    probe, evals = load_skill("mmlu-redux"), load_skill("mmlu-redux", part="eval")
    assert probe.source.startswith("packaged:mmlu-redux") and probe.family == "mmlu-redux"
    assert not {it.id for it in probe} & {it.id for it in evals}
    assert not {it.prompt for it in probe} & {it.prompt for it in evals}
    assert len(probe) + len(evals) <= 5330 and len(evals) > 2000
    # a subject's parts are exactly its items in the all-subject parts (same side everywhere)
    sp, se = load_skill("mmlu-redux:virology"), load_skill("mmlu-redux:virology", part="eval")
    assert [it.id for it in sp] == [it.id for it in probe if it.meta["subject"] == "virology"]
    assert [it.id for it in se] == [it.id for it in evals if it.meta["subject"] == "virology"]
    both = load_skill("mmlu-redux:virology+anatomy", part="all")
    assert {it.meta["subject"] for it in both} == {"virology", "anatomy"}
    with pytest.raises(DataError, match="unknown MMLU-Redux subject.*anatomy"):
        load_skill("mmlu-redux:anatomyy")


@pytest.mark.skipif(not SHARED.is_dir(), reason="upstream copy not present")
def test_upstream_folder_and_packaged_copy_read_alike(tmp_path):
    up = load_skill(f"mmlu-redux={SHARED}", part="all")
    assert len(up) == 5330 and len(load_mmlu_redux(SHARED, keep="all")) == 5700
    assert [it.text for it in up] == [it.text for it in load_skill("mmlu-redux", part="all")]
    d = tmp_path / "data" / "mmlu-redux"
    d.mkdir(parents=True)
    f = SHARED / "mmlu_moral_scenarios.csv"           # the cp1252 file, compressed
    (d / (f.name + ".xz")).write_bytes(lzma.compress(f.read_bytes()))
    one = load_skill("mmlu-redux:moral_scenarios", tmp_path / "data", part="all")
    assert len(one) == len([it for it in up if it.meta["subject"] == "moral_scenarios"])
