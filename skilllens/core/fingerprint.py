"""Model fingerprints: architecture, config hash and an exact SHA-256 of every weight.

Artifacts store the fingerprint of the model they were fitted on; loading one onto another model
is a :class:`~skilllens.errors.FingerprintMismatchError` (see :mod:`skilllens.core.artifacts`).
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from skilllens.core.architectures import ModelAdapter
from skilllens.core.moe import adapter_for
from skilllens.errors import ModelSpecError

#: 2: SHA-256 of every parameter (1: a bf16-rounded sample of three tensors, retired: it could
#: not tell a fine-tuned copy from its base). Artifacts with another scheme are rejected.
FINGERPRINT_SCHEME = 2
PIECE_BYTES = 1 << 26
_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
             "quantization_config", "use_cache", "_attn_implementation_autoset",
             "attn_implementation", "_attn_implementation", "output_attentions",
             "output_hidden_states", "return_dict"}


def _pieces(n_bytes: int, itemsize: int) -> list[tuple[int, int]]:
    step = max(1, PIECE_BYTES // itemsize)
    n = n_bytes // itemsize
    return [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]


def _hash_piece(flat: torch.Tensor, start: int, stop: int, to_bf16: bool) -> bytes:
    x = flat[start:stop]
    if to_bf16:
        x = x.to(torch.bfloat16)
    return hashlib.sha256(x.contiguous().view(torch.uint8).cpu().numpy()).digest()


def _weight_digests(model: nn.Module) -> tuple[str, str]:
    """``(exact, bf16)``: SHA-256 over every parameter's bytes (name, dtype and shape included)
    and over the parameters rounded to bfloat16 (non-float tensors: their own bytes). Tensors
    are hashed in 64 MiB pieces on a thread pool (hashlib releases the GIL); GPU pieces are
    copied to the host one at a time, so host memory stays bounded."""
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    workers = max(1, min(16, os.cpu_count() or 1))
    exact, rounded = hashlib.sha256(), hashlib.sha256()
    with ThreadPoolExecutor(workers) as pool:
        def submit(name, p, flat, dt):
            item = torch.empty((), dtype=dt).element_size()
            head = f"{name}|{dt}|{tuple(p.shape)}".encode()
            return head, [pool.submit(_hash_piece, flat, a, b, dt != p.dtype)
                          for a, b in _pieces(flat.numel() * item, item)]

        queued = []
        for name, p in params:
            if p.device.type == "meta":
                raise ModelSpecError(f"parameter {name!r} is on the meta device (offloaded); "
                                     f"the fingerprint needs every weight in memory: load "
                                     f"without disk offload")
            flat = p.detach().reshape(-1)
            ex = submit(name, p, flat, p.dtype)
            rounds = p.is_floating_point() and p.dtype != torch.bfloat16
            queued.append((ex, submit(name, p, flat, torch.bfloat16) if rounds else ex))
        for ex, rd in queued:
            tensor = [hashlib.sha256(h + b"".join(f.result() for f in fs)).digest()
                      for h, fs in (ex, rd)]
            exact.update(tensor[0])
            rounded.update(tensor[1])
    return exact.hexdigest()[:32], rounded.hexdigest()[:32]


def _weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or edited in place (``_version`` counts in-place
    ops, also under ``no_grad``); edits through ``.data`` or numpy views bypass it."""
    return tuple((n, p.data_ptr(), p._version, p.dtype, tuple(p.shape), str(p.device))
                 for n, p in model.named_parameters())


def _dominant_dtype(model: nn.Module) -> str:
    count: dict[str, int] = {}
    for p in model.parameters():
        count[str(p.dtype)] = count.get(str(p.dtype), 0) + p.numel()
    return max(count, key=count.get).replace("torch.", "") if count else "none"


def model_fingerprint(model: nn.Module, adapter: ModelAdapter | None = None,
                      refresh: bool = False) -> dict:
    """Architecture, config hash and exact digests of every weight; ``fingerprint["id"]``
    summarises it and changes with any change of any parameter (one flipped bit suffices).

    The weight digests are computed on first use and cached per model object; any in-place
    edit of a parameter (or replacing one) makes the next call recompute them. Edits that
    bypass autograd's version counter (``p.data.add_``, numpy views) need ``refresh=True``.
    ``weights_bf16`` (the weights rounded to bfloat16) lets a bfloat16 copy match the model it
    was cast from: see :func:`fingerprints_match`. Cost: one SHA-256 pass over the weights
    (plus one over their bfloat16 rounding for non-bf16 models), ~1 GB/s per CPU core.
    """
    adapter = adapter or adapter_for(model)
    key = _weights_key(model)
    hit = None if refresh else _DIGESTS.get(model)
    if hit is None or hit[0] != key:
        hit = (key, _weight_digests(model))
        _DIGESTS[model] = hit
    exact, rounded = hit[1]
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    fp = {"scheme": FINGERPRINT_SCHEME, "architecture": adapter.arch.name,
          "model_type": model.config.model_type, "n_layers": adapter.n_layers,
          "d_model": adapter.d_model, "d_ff": adapter.d_ff, "config_hash": cfg_hash,
          "n_params": sum(p.numel() for p in model.parameters()),
          "dtype": _dominant_dtype(model), "weights": exact}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    fp["weights_bf16"] = rounded
    return fp


STRUCTURE = ("architecture", "model_type", "n_layers", "d_model", "d_ff", "config_hash", "n_params")


def fingerprints_match(a: dict, b: dict) -> bool:
    """Same model: equal ids, or one side is a bfloat16 model that equals the other side's
    weights rounded to bfloat16 (a fitted artifact then transfers to the bf16 cast)."""
    if a.get("id") == b.get("id"):
        return True
    if a.get("scheme") != FINGERPRINT_SCHEME or b.get("scheme") != FINGERPRINT_SCHEME:
        return False
    return (all(a.get(k) == b.get(k) for k in STRUCTURE)
            and "bfloat16" in (a.get("dtype"), b.get("dtype"))
            and a.get("weights_bf16") == b.get("weights_bf16"))
