"""Artifacts: safetensors files whose header carries JSON metadata (no pickle anywhere).

The metadata holds the artifact ``kind``, the skilllens version, the arguments, data hashes and
the model fingerprint; loading onto a model with another fingerprint raises
:class:`~skilllens.errors.FingerprintMismatchError` (so does a fingerprint of the retired scheme
1; :func:`restamp` upgrades such a file after checking the model as far as scheme 1 can). Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from skilllens.core.moe import adapter_for
from skilllens.core.fingerprint import (_VOLATILE, FINGERPRINT_SCHEME, STRUCTURE,
                                        fingerprints_match, model_fingerprint)
from skilllens.core.loaded_model import LoadedModel
from skilllens.errors import ArtifactError, FingerprintMismatchError
from skilllens.io import atomic_path

META_KEY = "skilllens"


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict,
                  kind: str, fingerprint: dict | None = None) -> Path:
    """Write ``tensors`` + JSON ``meta`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    from skilllens._version import __version__

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


def _model_fp(model) -> dict:

    if isinstance(model, LoadedModel):
        return model.fingerprint
    return model if isinstance(model, dict) else model_fingerprint(model)


def check_fingerprint(meta: dict, model, path="artifact") -> None:
    """Raise if ``meta['fingerprint']`` does not match ``model`` (a LoadedModel, module or
    fingerprint dict); see :func:`skilllens.core.fingerprint.fingerprints_match`."""
    expected = meta.get("fingerprint")
    if expected is None or model is None:
        return

    if expected.get("scheme") != FINGERPRINT_SCHEME:
        raise FingerprintMismatchError(
            f"{path} carries a fingerprint of scheme {expected.get('scheme', 1)}, which sampled "
            f"a few weights and cannot tell a fine-tuned copy from its base; this skilllens "
            f"checks scheme {FINGERPRINT_SCHEME} (every weight). Re-fit and save it again, or, "
            f"if you are sure this is the model it was made on, re-stamp it once with "
            f"skilllens.core.artifacts.restamp({str(path)!r}, model)")
    fp = _model_fp(model)
    if not fingerprints_match(fp, expected):
        diff = [k for k in STRUCTURE + ("dtype", "weights") if fp.get(k) != expected.get(k)]
        raise FingerprintMismatchError(
            f"{path} was made on another model (fingerprint {expected.get('id')}, "
            f"{expected.get('architecture')}, {expected.get('n_layers')} layers, "
            f"{expected.get('dtype')}) than this one ({fp.get('id')}, {fp.get('architecture')}, "
            f"{fp.get('n_layers')} layers, {fp.get('dtype')}); differs in {diff}. Load it onto "
            f"the model it was fitted on, or re-fit on this model.")


def _legacy_id(model) -> str:
    """The scheme-1 fingerprint id (bf16 samples of three tensors); only for :func:`restamp`."""
    import hashlib


    m, ad = (model.model, model.adapter) if isinstance(model, LoadedModel) else (model, None)
    ad = ad or adapter_for(m)

    def digest(t):
        flat = t.detach().reshape(-1)
        x = torch.cat([flat[:4096], flat[-4096:]]).to("cpu", torch.bfloat16).to(torch.float32)
        return hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]

    cfg = {k: v for k, v in m.config.to_dict().items() if k not in _VOLATILE}
    last = ad.n_layers - 1
    fp = {"architecture": ad.arch.name, "model_type": m.config.model_type,
          "n_layers": ad.n_layers, "d_model": ad.d_model, "d_ff": ad.d_ff,
          "config_hash": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str)
                                        .encode()).hexdigest()[:16],
          "weights": {"value.0": digest(ad.value_weight(0)),
                      f"value.{last}": digest(ad.value_weight(last)),
                      "unembed": digest(ad.unembedding())}}
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def restamp(path: str | os.PathLike, model) -> Path:
    """Rewrite an artifact saved with the scheme-1 fingerprint with ``model``'s current one,
    after checking ``model`` against the old fingerprint (as far as scheme 1 can tell).
    Atomic; tensors and other metadata are kept."""
    from safetensors.torch import load_file, save_file


    path = Path(path)
    meta = read_metadata(path)
    old = meta.get("fingerprint")
    if old is None or old.get("scheme") == FINGERPRINT_SCHEME:
        raise ArtifactError(f"{path} needs no re-stamping (fingerprint scheme "
                            f"{FINGERPRINT_SCHEME} or none)")
    if _legacy_id(model) != old.get("id"):
        raise FingerprintMismatchError(f"{path} was made on another model (old fingerprint "
                                       f"{old.get('id')}); re-stamp it with that model")
    meta["fingerprint"] = _model_fp(model)
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, default=str)})
    return path


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
