"""Where built-in data comes from: --data-dir, $SKILLLENS_DATA, the packaged data, the opt-in hub;
the packaged files are the unchanged upstream files (manifest, licenses)."""
import hashlib
import json
import lzma
import sys
import types
from pathlib import Path, PurePosixPath

import pytest

import skilllens.data.sources as sd
from skilllens.data import PACKAGED, load_skill
from skilllens.errors import DataError

GSM = [{"question": f"How much is {i} plus 1?", "answer": f"It is {i + 1}.\n#### {i + 1}"}
       for i in range(6)]


def _gsm8k_folder(root: Path, compress: bool = False) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    for split, rows in (("train", GSM[:4]), ("test", GSM[4:])):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if compress:
            (root / "gsm8k" / f"{split}.jsonl.xz").write_bytes(lzma.compress(text.encode()))
        else:
            (root / "gsm8k" / f"{split}.jsonl").write_text(text)
    return root


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("SKILLLENS_DATA", raising=False)
    assert load_skill("gsm8k").source.startswith("packaged:gsm8k/train.jsonl.xz")
    mine, env = _gsm8k_folder(tmp_path / "mine"), _gsm8k_folder(tmp_path / "env", compress=True)
    monkeypatch.setenv("SKILLLENS_DATA", str(env))
    from_env = load_skill("gsm8k", part="all")
    assert from_env.source == f"SKILLLENS_DATA:{env / 'gsm8k/train.jsonl.xz'},{env / 'gsm8k/test.jsonl.xz'}"
    assert [it.meta["final"] for it in from_env] == ["1", "2", "3", "4", "5", "6"]
    given = load_skill("gsm8k", mine, part="eval")  # the folder given wins over the variable
    assert given.source.startswith(f"data-dir:{mine / 'gsm8k/train.jsonl'}")
    assert [it.id for it in given] == ["gsm8k/test/0", "gsm8k/test/1"]
    assert given.digest() == load_skill("gsm8k", env, part="eval").digest()  # .xz reads alike
    # a skill the folders lack comes from the packaged data
    assert load_skill("humaneval", mine).source == "packaged:humaneval/HumanEval.jsonl.gz"
    (mine / "gsm8k" / "test.jsonl").unlink()
    with pytest.raises(DataError, match="put both upstream files in that folder"):
        load_skill("gsm8k", mine)
    with pytest.raises(DataError, match="does not exist; fix the path"):
        load_skill("gsm8k", tmp_path / "typo")
    monkeypatch.setenv("SKILLLENS_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$SKILLLENS_DATA\) does not exist"):
        load_skill("humaneval")


def test_plain_upstream_file_reads_like_the_packaged_one(tmp_path):
    (tmp_path / "xquad").mkdir()
    raw = lzma.decompress((PACKAGED / "xquad" / "xquad.en.json.xz").read_bytes())
    (tmp_path / "xquad" / "xquad.en.json").write_bytes(raw)
    for part in ("probe", "eval"):
        assert load_skill("xquad-en", tmp_path, part).digest() == \
            load_skill("xquad-en", part=part).digest()


def test_packaged_files_match_the_manifest_and_carry_licenses():
    doc = json.loads((PACKAGED / "MANIFEST.json").read_text())
    shipped = {p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*")
               if p.is_file() and p.name not in ("MANIFEST.json", "README.md", "LICENSE")}
    listed = {}
    for name, ds in doc["datasets"].items():
        assert (PACKAGED / ds["license_file"]).stat().st_size > 500 and ds["source"].startswith(
            "https://github.com/") and ds["license"] in ds["attribution"], name
        listed.update(ds["files"])
    assert set(listed) == shipped
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"  # upstream copy, if present
    for rel, m in listed.items():
        data = (PACKAGED / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"], rel
        raw = lzma.decompress(data) if rel.endswith(".xz") else data
        assert hashlib.sha256(raw).hexdigest() == m["upstream_sha256"], rel
        if (shared / m["upstream_file"]).is_file():
            assert (shared / m["upstream_file"]).read_bytes() == raw, rel
    assert sum(m["bytes"] for m in listed.values()) < 3_000_000


def test_hub_only_when_allowed_and_online(tmp_path, monkeypatch):
    calls = []
    mod = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return {"train": GSM[:4], "test": GSM[4:]}
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    monkeypatch.setattr(sd, "PACKAGED", tmp_path / "no-packaged-data")
    monkeypatch.delenv("SKILLLENS_DATA", raising=False)
    for allow, offline in (("", None), ("1", "1"), ("", "0")):
        monkeypatch.setenv("SKILLLENS_ALLOW_HUB", allow)
        if offline is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        with pytest.raises(DataError, match="SKILLLENS_ALLOW_HUB=1"):
            load_skill("gsm8k")
    assert calls == []
    monkeypatch.setenv("SKILLLENS_ALLOW_HUB", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    sk = load_skill("gsm8k", part="eval")
    assert calls == [("openai/gsm8k", "main", None)] and sk.source == "hub:openai/gsm8k:main"
    assert [it.meta["final"] for it in sk] == ["5", "6"]
    from skilllens.data.formats import data_sources
    assert data_sources()["xquad-de"] == "hub:google/xquad:xquad.de@validation"


def test_package_data_ships_every_packaged_file():
    """pyproject's package-data globs cover each file in skilllens/data/packaged (so a wheel and a
    non-editable install carry the data)."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((PACKAGED.parents[2] / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["skilllens"]
    files = [p.relative_to(PACKAGED.parents[1]).as_posix() for p in PACKAGED.rglob("*") if p.is_file()]
    def shipped(f: str) -> bool:  # setuptools globs: "*" stays within one folder
        return any(len(PurePosixPath(g).parts) == len(PurePosixPath(f).parts) and
                   PurePosixPath(f).match(g) for g in globs)
    assert files and [f for f in files if not shipped(f)] == []
