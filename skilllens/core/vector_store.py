"""Stored activation vectors on disk: ``collect(store=..., store_dir=...)`` shards
(:func:`save_vectors`, :func:`load_vectors`) and the vector shards a checkpointed collection
writes beside its checkpoint. Every file is safetensors with the model fingerprint."""
from __future__ import annotations

from pathlib import Path

import torch

from skilllens.core.artifacts import load_artifact, save_artifact
from skilllens.errors import ArtifactError


def _vector_shard_path(checkpoint, i: int) -> Path:
    return Path(f"{checkpoint}.vectors-{i:05d}.safetensors")


def _save_vector_shard(checkpoint, vec: dict, buffers: dict, item_rows: list, fp) -> None:
    """Write the stored vectors of the batches since the last checkpoint as shard
    ``vec["shards"]`` (before the checkpoint that counts it: a crash in between leaves an
    uncounted shard that the next run overwrites)."""
    if not buffers or vec["flushed"] == len(item_rows):
        return
    new = slice(vec["flushed"], len(item_rows))
    tensors = {f"{s}.{l}": torch.cat([c.cpu() for c in chunks[new]])
               for (s, l), chunks in buffers.items()}
    tensors["item"] = torch.cat(item_rows[new])
    save_artifact(_vector_shard_path(checkpoint, vec["shards"]), tensors, {},
                  kind="checkpoint-vectors", fingerprint=fp)
    vec["shards"] += 1
    vec["flushed"] = len(item_rows)


def _load_vector_shards(checkpoint, n: int, buffers: dict, item_rows: list) -> None:
    """Read the ``n`` shards a checkpoint counts back into ``buffers``/``item_rows``."""
    for i in range(n if buffers else 0):
        tensors, _ = load_artifact(_vector_shard_path(checkpoint, i), kind="checkpoint-vectors")
        for (s, l), chunks in buffers.items():
            chunks.append(tensors[f"{s}.{l}"])
        item_rows.append(tensors["item"])


def save_vectors(result, store_dir, shard_rows: int = 65536) -> list[Path]:
    """Write ``result.vectors`` as safetensors shards ``vectors-00000.safetensors`` ..., each
    with tensors ``{site}.{layer}`` ``[rows, d]`` and ``item`` ``[rows]`` (item indices)."""
    store_dir = Path(store_dir)
    n = int(result.vector_items.shape[0]) if result.vector_items is not None else 0
    paths = []
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        sl = slice(start, start + shard_rows)
        tensors = {f"{s}.{l}": v[sl] for (s, l), v in result.vectors.items()}
        tensors["item"] = result.vector_items[sl]
        paths.append(save_artifact(store_dir / f"vectors-{i:05d}.safetensors", tensors,
                                   {"data": result.meta.get("data")}, kind="vectors",
                                   fingerprint=result.meta.get("fingerprint")))
    return paths


def load_vectors(store_dir, model=None) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor]:
    """Read the shards written by :func:`save_vectors`: ``({(site, layer): [rows, d]}, item)``."""
    files = sorted(Path(store_dir).glob("vectors-*.safetensors"))
    if not files:
        raise ArtifactError(f"no vectors-*.safetensors shards in {store_dir}")
    parts: dict[str, list[torch.Tensor]] = {}
    for f in files:
        tensors, _ = load_artifact(f, kind="vectors", model=model)
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
    item = torch.cat(parts.pop("item"))
    return {(k.split(".")[0], int(k.split(".")[1])): torch.cat(v) for k, v in parts.items()}, item
