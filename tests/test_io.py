"""Atomic writes: the final file has the usual permissions, and failures leave nothing behind."""
import os
import stat

import pytest

from skilllens.io import atomic_path, write_json


def test_written_files_get_umask_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- grafting artifacts (defect 8)
def test_graft_artifact_rejects_swapped_pretrained_and_finetuned(tmp_path):
    """A graft holds both fingerprints: loading or applying it on the fine-tuned model, or a
    graft fitted with the two roles swapped onto the pre-trained one, is a clear error. The
    fine-tune touches only attention matrices, which the old sampled fingerprint never saw."""
    import torch

    from skilllens import load_model
    from skilllens.errors import FingerprintMismatchError
    from skilllens.grafting.finetune import FineTuneConfig, finetune
    from skilllens.grafting.tasks import build_task
    from skilllens.grafting import GraftLocalizer

    pre = load_model("tiny-llama")
    task = build_task("synthetic", n_train=8, n_dev=4, n_test=4)
    ft = finetune(pre, task, FineTuneConfig(steps=2, lr=1e-3, include=("*self_attn.q_proj*",),
                                            progress=False))
    assert pre.fingerprint["id"] != ft.lm.fingerprint["id"]
    loc = GraftLocalizer(sparsity=0.05, steps=0, progress=False).fit(pre, ft, task)
    path = tmp_path / "graft.safetensors"
    loc.save(path)
    with pytest.raises(FingerprintMismatchError, match="fine-tuned model"):
        GraftLocalizer.load(path, ft.lm)
    with pytest.raises(FingerprintMismatchError, match="fine-tuned model"):
        with loc.grafted(ft.model):
            pass
    back = GraftLocalizer.load(path, pre)  # the right model loads
    assert set(back.masks_) == set(loc.masks_)
    swapped = GraftLocalizer(sparsity=0.05, steps=0, progress=False).fit(ft.lm, pre, task)
    swapped.save(tmp_path / "swapped.safetensors")
    with pytest.raises(FingerprintMismatchError, match="fine-tuned model"):
        GraftLocalizer.load(tmp_path / "swapped.safetensors", pre)
    with torch.no_grad():
        before = {n: p.clone() for n, p in pre.model.named_parameters()}
    with loc.grafted(pre.model):
        pass
    assert all(torch.equal(p, before[n]) for n, p in pre.model.named_parameters())


def _spy_fs(monkeypatch, target):
    """Record, at every rename/remove call, whether ``target`` exists as a folder."""
    import os
    import shutil
    seen = []
    for mod, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
        orig = getattr(mod, name)

        def spy(*a, _orig=orig, _name=name, **k):
            out = _orig(*a, **k)
            seen.append((_name, target.is_dir()))
            return out
        monkeypatch.setattr(mod, name, spy)
    return seen


def test_atomic_dir_never_leaves_a_moment_without_the_folder(tmp_path, monkeypatch):
    from skilllens.io import atomic_dir
    target = tmp_path / "results"
    target.mkdir()
    (target / "old.json").write_text("old")
    seen = _spy_fs(monkeypatch, target)
    with atomic_dir(target) as tmp:
        (tmp / "new.json").write_text("new")
    monkeypatch.undo()
    assert all(exists for _, exists in seen), seen
    assert sorted(p.name for p in target.iterdir()) == ["new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no temp folder left


def test_atomic_dir_fallback_and_failure_keep_the_old_folder(tmp_path, monkeypatch):
    import skilllens.io as sio
    target = tmp_path / "results"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with sio.atomic_dir(target) as tmp:
            (tmp / "half.json").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["old.json"]
    monkeypatch.setattr(sio, "_exchange", lambda a, b: False)  # no renameat2: two renames
    with sio.atomic_dir(target) as tmp:
        (tmp / "new.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_save_figure_is_atomic_and_writes_each_format(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skilllens.io import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "curve")
    assert [p.name for p in paths] == ["curve.png", "curve.svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()
    fig, ax = plt.subplots()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "curve.svg"]
