"""Vocabulary projection of FFN value vectors: logits ``W_U v`` and their top-k tokens.

One matrix product per layer: ``[d_ff, d_model] @ [d_model, vocab]`` (optionally through the
final norm's scale), then ``topk`` — all 30 x 1536 SmolLM2 vectors in seconds on a free CPU.
Works with tied and untied unembeddings (the adapter returns ``W_U`` either way).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skilllens.core.artifacts import load_artifact, save_artifact
from skilllens.errors import SiteError


def _adapter(lm):
    return lm.adapter if hasattr(lm, "adapter") else lm


def check_index(lm, layer: int, index: int, what: str | None = None) -> tuple[int, int]:
    """Validate a (layer, neuron index) pair; negative layers count from the end. On a
    mixture-of-experts layer ``index`` is a flattened expert neuron (``core/moe.py``); ``what``
    names an edit that does not support expert value vectors (refused there)."""
    ad = _adapter(lm)
    layer = ad.check_layers([layer])[0]
    moe = getattr(ad, "moe_layer", None)
    if what is not None and moe is not None and moe(layer) is not None:
        raise SiteError(f"layer {layer} is a mixture-of-experts layer: {what} of expert value "
                        f"vectors is not supported yet (noise and zero ablation and concept "
                        f"search are); pick a dense layer")
    d_ff = ad.d_ff_at(layer)
    if not 0 <= int(index) < d_ff:
        raise SiteError(f"value index {index} is out of range: layer {layer} has {d_ff} value "
                        f"vectors (0..{d_ff - 1})")
    return layer, int(index)


def norm_scale(lm) -> torch.Tensor | None:
    """The final norm's elementwise scale ``[d_model]`` (None when it has none).

    ``norm_offset + weight``: Gemma, VaultGemma, Qwen3.5 and Nemotron (LayerNorm1P) scale by
    ``1 + weight``. The architecture's declared ``norm_offset`` is checked against the norm's
    own output (:meth:`ModelAdapter.norm_scale`), so a wrong declaration raises instead of
    giving a silently wrong scale."""
    return _adapter(lm).norm_scale()


@torch.no_grad()
def value_logits(lm, layer: int, indices=None, through_norm: bool = False) -> torch.Tensor:
    """Logits ``[n, vocab]`` of value vectors ``indices`` (all when None) of ``layer``."""
    ad = _adapter(lm)
    layer = ad.check_layers([layer])[0]
    vals = ad.value_vectors(layer)
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        d_ff = ad.d_ff_at(layer)
        if idx.numel() and (idx.min() < 0 or idx.max() >= d_ff):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise SiteError(f"value index {bad} is out of range: layer {layer} has {d_ff} value "
                            f"vectors (0..{d_ff - 1})")
        vals = vals[idx.to(vals.device)]
    W = ad.unembedding()
    if through_norm:
        s = norm_scale(lm)
        if s is not None:
            vals = vals * s.to(vals.dtype)
    return vals.to(W.dtype) @ W.t()


@dataclass
class VocabProjection:
    """Top-k tokens of every value vector: ``top_ids``/``top_logits`` ``[n_layers, max d_ff, k]``.

    A layer narrower than the widest (a per-layer ``d_ff``) is padded: its rows past
    ``d_ffs[i]`` hold id ``-1`` and logit NaN. ``d_ffs``: the number of value vectors of each
    of ``layers`` (read from the padding when not given)."""

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    layers: list[int]
    k: int
    through_norm: bool = False
    fingerprint: dict | None = None
    d_ffs: list[int] | None = None

    def __post_init__(self):
        if self.d_ffs is None:  # rows past a layer's width are padding (id -1)
            self.d_ffs = [int(n) for n in (self.top_ids[:, :, 0] >= 0).sum(1).tolist()]

    def tokens(self, tokenizer, layer: int, index: int, k: int | None = None) -> list[str]:
        """Top tokens of value vector ``index`` of ``layer``; raises ``SiteError`` when the
        layer was not projected or the index is past that layer's ``d_ff``."""
        if layer not in self.layers:
            raise SiteError(f"layer {layer} is not in this projection (layers {self.layers}); "
                            f"project it with project_values(lm, layers=[{layer}])")
        li = self.layers.index(layer)
        if not 0 <= int(index) < self.d_ffs[li]:
            raise SiteError(f"value index {index} is out of range: layer {layer} has "
                            f"{self.d_ffs[li]} value vectors (0..{self.d_ffs[li] - 1})")
        ids = self.top_ids[li, int(index), : (k or self.k)].tolist()
        return decode_tokens(tokenizer, ids)

    def save(self, path: str | os.PathLike) -> Path:
        return save_artifact(path, {"top_ids": self.top_ids.to(torch.int32),
                                    "top_logits": self.top_logits.float()},
                             {"layers": self.layers, "k": self.k, "through_norm": self.through_norm,
                              "d_ffs": self.d_ffs},
                             kind="vocab_projection", fingerprint=self.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "VocabProjection":
        t, meta = load_artifact(path, kind="vocab_projection", model=model)
        return cls(t["top_ids"].long(), t["top_logits"], list(meta["layers"]), int(meta["k"]),
                   bool(meta["through_norm"]), meta.get("fingerprint"), meta.get("d_ffs"))


@torch.no_grad()
def project_values(lm, layers=None, k: int = 200, through_norm: bool = False,
                   chunk: int = 2048, progress: bool = True) -> VocabProjection:
    """Top-``k`` vocabulary tokens of every value vector of ``layers`` (all by default):
    ``top_ids``/``top_logits`` ``[n_layers, max d_ff, k]``, each layer projecting its own
    ``d_ff_at(layer)`` value vectors (narrower layers padded with id -1 / NaN; see
    :class:`VocabProjection`). Raises ``SiteError`` for ``k`` outside 1..vocabulary size or an
    unknown layer."""
    ad = _adapter(lm)
    layers = ad.check_layers(layers)
    W = ad.unembedding()
    if not 1 <= k <= W.shape[0]:
        raise SiteError(f"k={k} must be between 1 and the vocabulary size {W.shape[0]}")
    d_ffs = [ad.d_ff_at(l) for l in layers]
    width = max(d_ffs)
    top_ids = torch.full((len(layers), width, k), -1, dtype=torch.long)
    top_logits = torch.full((len(layers), width, k), float("nan"), dtype=torch.float32)
    for li, layer in enumerate(tqdm(layers, desc="vocab projection", disable=not progress,
                                    leave=False)):
        for start in range(0, d_ffs[li], chunk):
            stop = min(start + chunk, d_ffs[li])
            logits = value_logits(lm, layer, torch.arange(start, stop), through_norm)
            top = logits.topk(k, dim=-1)
            top_ids[li, start:stop] = top.indices.cpu()
            top_logits[li, start:stop] = top.values.float().cpu()
    fp = lm.fingerprint if hasattr(lm, "fingerprint") else None
    return VocabProjection(top_ids, top_logits, layers, k, through_norm, fp, d_ffs)


def decode_tokens(tokenizer, ids) -> list[str]:
    """Readable token strings (BPE space markers shown as a leading space)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def top_tokens(lm, layer: int, index: int, k: int = 20, through_norm: bool = False,
               vector: torch.Tensor | None = None) -> list[str]:
    """Top-``k`` tokens of one value vector (or of ``vector`` [d_model] when given)."""
    layer, index = check_index(lm, layer, index)
    ids = top_token_ids(lm, layer, index, k, through_norm, vector)
    return decode_tokens(lm.tokenizer, ids.tolist())


@torch.no_grad()
def top_token_ids(lm, layer: int, index: int, k: int = 200, through_norm: bool = False,
                  vector: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``k`` token ids ``[k]`` of value vector (layer, index) or of ``vector``."""
    if vector is None:
        return value_logits(lm, layer, [index], through_norm)[0].topk(k).indices
    W = _adapter(lm).unembedding()
    v = vector.to(W.device, W.dtype)
    if through_norm:
        s = norm_scale(lm)
        v = v * s if s is not None else v
    return (W @ v).topk(k).indices
