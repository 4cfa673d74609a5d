"""Where skilllens caches converted weights: ``$SKILLLENS_CACHE`` or the user cache dir."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("SKILLLENS_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "skilllens"
    path.mkdir(parents=True, exist_ok=True)
    return path
