"""The command line: every command has --help with an example; info and collect work."""
import json

import pytest
from safetensors import safe_open

from skilllens.cli import COMMANDS, build_parser, main


def test_every_command_has_help_with_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"info", "collect"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out.lower(), name


def test_info_json(capsys):
    assert main(["info", "--model", "tiny-gpt2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gpt2" and info["d_ff"] == 64 and "up" not in info["sites"]


def test_collect_writes_named_tensors(tmp_path, data_dir):
    out = tmp_path / "gsm.safetensors"
    rc = main(["collect", "--model", "tiny-llama", "--data", "gsm8k", "--data-dir", str(data_dir),
               "--site", "gate,key", "--tokens", "answer", "--max-items", "4", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["skilllens"])
    for stat in ("count", "mean", "var", "std", "min", "max"):
        assert f"gate.0.{stat}" in keys and f"key.1.{stat}" in keys
    assert meta["fingerprint"]["architecture"] == "llama" and meta["args"]["tokens"] == "answer"


def test_collect_local_file_and_errors(tmp_path, capsys, data_file):
    out = tmp_path / "de.safetensors"
    spec = f"xquad-xx={data_file('xquad/xquad.de.json')}"
    assert main(["collect", "--model", "tiny-llama", "--data", spec, "--max-items", "3",
                 "--layers", "-1", "--no-progress", "--out", str(out)]) == 0
    assert out.exists()
    capsys.readouterr()
    assert main(["collect", "--model", "tiny-llama", "--data", "nope", "--out", str(out)]) == 2
    assert "unknown skill" in capsys.readouterr().err
    assert main(["collect", "--model", "no/such-model", "--data", "gsm8k", "--out", str(out)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["collect", "--model", "tiny-llama", "--data", "gsm8k", "--layers", "9",
                 "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.fixture
def no_data_folder(tmp_path, monkeypatch):
    """A fresh machine: cwd with no data folder anywhere near, no $SKILLLENS_DATA, offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SKILLLENS_DATA", raising=False)
    monkeypatch.delenv("SKILLLENS_ALLOW_HUB", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not (tmp_path / "data").exists() and not (tmp_path.parent / "shared").exists()
    return tmp_path


def test_info_data_prints_the_order_and_sources(no_data_folder, capsys):
    assert main(["info", "--data", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["order"].index("--data-dir") < info["order"].index("$SKILLLENS_DATA") < \
        info["order"].index("packaged") < info["order"].index("hub")
    assert info["sources"]["gsm8k"] == "packaged:gsm8k/train.jsonl.xz"
    assert info["sources"]["xquad-hi"] == "packaged:xquad/xquad.hi.json.xz"
    assert info["sources"]["mbpp"].startswith("not found") and not info["hub_allowed"]
    (no_data_folder / "mine" / "xquad").mkdir(parents=True)
    (no_data_folder / "mine" / "xquad" / "xquad.hi.json").write_text("{}")
    assert main(["info", "--data", "--data-dir", "mine"]) == 0
    out = capsys.readouterr().out
    assert "xquad-hi  data-dir:mine/xquad/xquad.hi.json" in out and \
        "xquad-en  packaged:xquad/xquad.en.json.xz" in out


def test_audit_and_concepts_run_with_no_data_folder(no_data_folder, capsys):
    """Issue 16: the default commands read the packaged data on a fresh machine."""
    out = no_data_folder / "audit"
    assert main(["audit", "--model", "tiny-llama", "--probe-items", "3", "--eval-items", "2",
                 "--max-length", "64", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    data = res["manifest"]["data"]
    assert data["gsm8k"]["source"] == "packaged:gsm8k/train.jsonl.xz,gsm8k/test.jsonl.xz"
    assert data["xquad-en"]["source"] == "packaged:xquad/xquad.en.json.xz"
    assert len(data["humaneval"]["probe_hash"]) == 16 and data["humaneval"]["eval_items"] == 2
    assert (out / "report.md").exists()
    cv = no_data_folder / "cv"
    assert main(["concepts", "--model", "tiny-llama", "--max-concepts", "1", "--max-new-tokens",
                 "2", "--unrelated", "2", "--questions", "2", "--candidates", "1", "--validate",
                 "1", "--method", "zero", "--no-progress", "--out", str(cv)]) == 0
    assert [r["concept"] for r in json.loads((cv / "results.json").read_text())["concepts"]] == \
        ["Poland"]


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "skilllens.cli", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
