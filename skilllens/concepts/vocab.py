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
            raise SiteError(f"value indices must be in 0..{d_ff - 1}")
        vals = vals[idx.to(vals.device)]
    W = ad.unembedding()
    if through_norm:
        s = norm_scale(lm)
        if s is not None:
            vals = vals * s.to(vals.dtype)
    return vals.to(W.dtype) @ W.t()


@dataclass
class VocabProjection:
    """Top-k tokens of every value vector: ``top_ids``/``top_logits`` ``[n_layers, d_ff, k]``."""

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    layers: list[int]
    k: int
    through_norm: bool = False
    fingerprint: dict | None = None

    def tokens(self, tokenizer, layer: int, index: int, k: int | None = None) -> list[str]:
        li = self.layers.index(layer)
        ids = self.top_ids[li, index, : (k or self.k)].tolist()
        return decode_tokens(tokenizer, ids)

    def save(self, path: str | os.PathLike) -> Path:
        return save_artifact(path, {"top_ids": self.top_ids.to(torch.int32),
                                    "top_logits": self.top_logits.float()},
                             {"layers": self.layers, "k": self.k, "through_norm": self.through_norm},
                             kind="vocab_projection", fingerprint=self.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "VocabProjection":
        t, meta = load_artifact(path, kind="vocab_projection", model=model)
        return cls(t["top_ids"].long(), t["top_logits"], list(meta["layers"]), int(meta["k"]),
                   bool(meta["through_norm"]), meta.get("fingerprint"))


@torch.no_grad()
def project_values(lm, layers=None, k: int = 200, through_norm: bool = False,
                   chunk: int = 2048, progress: bool = True) -> VocabProjection:
    """Top-``k`` vocabulary tokens of every value vector of ``layers`` (all by default)."""
    ad = _adapter(lm)
    layers = ad.check_layers(layers)
    W = ad.unembedding()
    if not 1 <= k <= W.shape[0]:
        raise SiteError(f"k={k} must be between 1 and the vocabulary size {W.shape[0]}")
    widths = {ad.d_ff_at(l) for l in layers}
    if len(widths) > 1:
        raise SiteError(f"these layers have different d_ff {sorted(widths)} (a per-layer FFN "
                        f"width); project layers of one width at a time")
    ids_out, logit_out = [], []
    for layer in tqdm(layers, desc="vocab projection", disable=not progress, leave=False):
        ids_l, lg_l = [], []
        d_ff = ad.d_ff_at(layer)
        for start in range(0, d_ff, chunk):
            logits = value_logits(lm, layer, torch.arange(start, min(start + chunk, d_ff)),
                                  through_norm)
            top = logits.topk(k, dim=-1)
            ids_l.append(top.indices.cpu())
            lg_l.append(top.values.float().cpu())
        ids_out.append(torch.cat(ids_l))
        logit_out.append(torch.cat(lg_l))
    fp = lm.fingerprint if hasattr(lm, "fingerprint") else None
    return VocabProjection(torch.stack(ids_out), torch.stack(logit_out), layers, k, through_norm, fp)


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
