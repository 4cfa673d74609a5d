"""Where data files come from: the resolution order ``--data-dir``, ``$SKILLLENS_DATA``, the data
packaged with skilllens (``skilllens/data/packaged``), then the hub only when allowed.

This is the one place the order is defined (see :mod:`skilllens.data.skills` for the spec syntax);
``skilllens info --data`` prints the result for each built-in name.
"""
from __future__ import annotations

import os
from pathlib import Path

from skilllens.errors import DataError

XQUAD_LANGS = ("en", "de", "es", "ar", "zh", "vi", "hi")
BUILTIN_SKILLS = ("gsm8k", "humaneval") + tuple(f"xquad-{l}" for l in XQUAD_LANGS) + \
    ("mmlu-redux",)
HUB_PREFIX = "hub:"
PACKAGED = Path(__file__).resolve().parent / "packaged"
COMPRESSED = (".xz", ".gz")
#: built-in family -> hub reference of the full upstream set (step 4 of the order)
HUB_REFS = {"gsm8k": "openai/gsm8k:main", "humaneval": "openai/openai_humaneval",
            "xquad": "google/xquad:xquad.{lang}@validation",
            "mbpp": "google-research-datasets/mbpp:full", "mmlu": "cais/mmlu:all"}
CHOICES = (f"a built-in name ({', '.join(BUILTIN_SKILLS)}, mbpp, mmlu), NAME=PATH, "
           f"hub:ORG/NAME[:config][@split], or a .txt/.jsonl file")


def _is_file(s: str) -> bool:
    try:
        return "\n" not in s and Path(s).is_file()
    except (OSError, ValueError):  # a long text is no file name
        return False


def plain_name(path: str | os.PathLike) -> str:
    """The file name without a ``.gz``/``.xz`` compression suffix."""
    name = Path(path).name
    return name[:-3] if name.endswith(COMPRESSED) else name


def data_roots(data_dir_: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``(origin, folder)`` in resolution order: ``data_dir_``, ``$SKILLLENS_DATA``, the packaged
    data. A folder named but missing is an error (a typo must not fall back to other data)."""
    roots = []
    for origin, c in (("data-dir", data_dir_), ("SKILLLENS_DATA", os.getenv("SKILLLENS_DATA"))):
        if c is None or str(c) == "":
            continue
        folder = Path(c).expanduser()
        if not folder.is_dir():
            how = "--data-dir / data_dir=" if origin == "data-dir" else "$SKILLLENS_DATA"
            raise DataError(f"data folder {folder} ({how}) does not exist; fix the path or drop "
                            f"it to use the data packaged with skilllens")
        roots.append((origin, folder))
    if PACKAGED.is_dir():
        roots.append(("packaged", PACKAGED))
    return roots


def find_data_file(rel: str, data_dir_=None, roots=None) -> tuple[str, Path] | None:
    """``(origin, path)`` of the first folder holding ``rel`` (plain or ``.xz``/``.gz``)."""
    for origin, root in roots if roots is not None else data_roots(data_dir_):
        for cand in (rel, rel + ".xz", rel + ".gz"):
            if (root / cand).exists():
                return origin, root / cand
    return None


def hub_allowed() -> bool:
    """Step 4 of the order: ``SKILLLENS_ALLOW_HUB=1`` set and ``HF_HUB_OFFLINE`` unset."""
    opt_in = os.environ.get("SKILLLENS_ALLOW_HUB", "").lower() in ("1", "true", "yes")
    return opt_in and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0")


def describe_source(origin: str, path: Path) -> str:
    """``origin:path`` (packaged paths relative to the packaged folder)."""
    return f"{origin}:{path.relative_to(PACKAGED).as_posix() if origin == 'packaged' else path}"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The first data folder in the resolution order (the packaged data if none is given)."""
    return (data_roots(path) or [("packaged", PACKAGED)])[0][1]
