"""Artifacts: safetensors files whose header carries JSON metadata (no pickle anywhere).

The metadata holds the artifact ``kind``, the skilllens version, the arguments, data hashes and
the model fingerprint; loading onto a model with another fingerprint raises
:class:`~skilllens.errors.FingerprintMismatchError`. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .errors import ArtifactError, FingerprintMismatchError
from .io import atomic_path

META_KEY = "skilllens"


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict,
                  kind: str, fingerprint: dict | None = None) -> Path:
    """Write ``tensors`` + JSON ``meta`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ArtifactError(f"artifact path {path} must end in .safetensors")
    full = {"kind": kind, "skilllens_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": fingerprint, **meta}
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={META_KEY: json.dumps(full, default=str)})
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an artifact, without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path} is not a safetensors file ({e}); skilllens artifacts are "
                            f"written by .save()") from None
    if raw is None:
        raise ArtifactError(f"{path} has no skilllens metadata; it was not written by skilllens")
    return json.loads(raw)


def check_fingerprint(meta: dict, model, path="artifact") -> None:
    """Raise if ``meta['fingerprint']`` does not match ``model`` (a LoadedModel or module)."""
    expected = meta.get("fingerprint")
    if expected is None or model is None:
        return
    from .models import LoadedModel, model_fingerprint

    fp = model.fingerprint if isinstance(model, LoadedModel) else (
        model if isinstance(model, dict) else model_fingerprint(model))
    if fp.get("id") != expected.get("id"):
        diff = [k for k in ("architecture", "n_layers", "d_model", "d_ff", "config_hash", "weights")
                if fp.get(k) != expected.get(k)]
        raise FingerprintMismatchError(
            f"{path} was made on another model (fingerprint {expected.get('id')}, "
            f"{expected.get('architecture')}, {expected.get('n_layers')} layers) than this one "
            f"({fp.get('id')}, {fp.get('architecture')}, {fp.get('n_layers')} layers); differs "
            f"in {diff}. Load it onto the model it was fitted on, or re-fit on this model.")


def load_artifact(path: str | os.PathLike, kind: str | None = None, model=None,
                  device=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(tensors, meta)``; checks ``kind`` and the model fingerprint when given."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if kind is not None and meta.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {meta.get('kind')!r} artifact, not {kind!r}")
    check_fingerprint(meta, model, path)
    tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    return tensors, meta
