"""Atomic file writes: write to a temp file in the same folder, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from skilllens.errors import ArtifactError


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create folder {parent}: {e.strerror}; choose a writable "
                            f"output path") from None
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"output folder {parent} is not writable; choose another output path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    _check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system call is not available (then the caller falls back to two renames)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp folder beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is swapped with the new folder in one atomic exchange (Linux), so a
    reader always sees either the old or the new folder, never none; elsewhere the old folder is
    first renamed aside, then replaced (a window of two renames). On error ``path`` is untouched."""
    path = Path(path)
    _check_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists() and path.is_dir() and not path.is_symlink():
            if not _exchange(tmp, path):
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
                os.rename(old, tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old contents
        else:
            if path.exists() or path.is_symlink():
                path.unlink()
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, path: str | os.PathLike, formats=("png", "svg"), dpi: int = 120,
                close: bool = True) -> list[Path]:
    """The one figure writer: ``fig`` saved as ``path`` with each suffix in ``formats``, each file
    written to a temp file and renamed (a reader never sees half a PNG). Returns the paths."""
    path = Path(path)
    out = []
    for ext in formats:
        known = path.suffix[1:].lower() in ("png", "svg", "pdf", "jpg", "jpeg")
        target = path.with_suffix(f".{ext}") if known else path.with_name(f"{path.name}.{ext}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
        out.append(target)
    if close:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return out


class JsonRecord:
    """Mixin for result dataclasses: :meth:`to_dict` is their plain, JSON-ready form."""

    def to_dict(self) -> dict:
        import dataclasses
        return dataclasses.asdict(self)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _jsonable(o):
    import numpy as np
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
