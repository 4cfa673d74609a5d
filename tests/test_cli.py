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
