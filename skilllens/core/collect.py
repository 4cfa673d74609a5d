"""Streaming collection of per-neuron statistics at FFN sites.

>>> import skilllens
>>> res = skilllens.collect("tiny-llama", ["hello world", "skills live in neurons"],
...                         sites=["gate", "key"], layers=[0, 1], progress=False)
>>> res["gate", 0].mean.shape
torch.Size([64])
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from skilllens.core.artifacts import load_artifact, read_metadata, save_artifact
from skilllens.core.batching import (TOKEN_MODES, clamp_length, encode_items, iter_batches,
                                     n_batches, pad_id)
from skilllens.data import resolve_skills
from skilllens.errors import DataError, SiteError
from skilllens.core.hooks import Hook, run_with_hooks
from skilllens.core.loaded_model import eval_mode
from skilllens.core.models import load_model
from skilllens.core.moe import ROUTER_SITES, layer_experts_meta
from skilllens.core.moe_collect import is_moe_key, moe_plan
from skilllens.core.prompt_vectors import (_check_store_tokens, add_prompt_vectors,
                                           mismatched_prompts, prompt_items, store_mask)
from skilllens.core.vector_store import (_load_vector_shards, _save_vector_shard,  # noqa: F401
                                         load_vectors, save_vectors)  # noqa: F401
from skilllens.stats.neuron_stats import DEFAULT_STATS, NeuronStats


class StatsCollection:
    """``NeuronStats`` per ``(site, layer)`` plus metadata; saved as ``{site}.{layer}.{stat}``."""

    def __init__(self, stats: dict[tuple[str, int], NeuronStats] | None = None,
                 meta: dict | None = None):
        self.stats = dict(stats or {})
        self.meta = dict(meta or {})
        self.vectors: dict[tuple[str, int], torch.Tensor] = {}
        self.vector_items: torch.Tensor | None = None

    def __getitem__(self, key: tuple[str, int]) -> NeuronStats:
        if key not in self.stats:
            raise SiteError(f"no statistics for {key}; collected: {sorted(self.stats)}")
        return self.stats[key]

    def __contains__(self, key) -> bool:
        return key in self.stats

    def keys(self):
        return sorted(self.stats)

    def layers(self, site: str) -> list[int]:
        return sorted(l for s, l in self.stats if s == site)

    def stacked(self, site: str, stat: str = "mean") -> torch.Tensor:
        """``[n_layers_collected, d]`` tensor of one statistic (float64) over the site's layers.

        Layers with fewer neurons than the widest (a per-layer ``d_ff``, Gemma-4's double-wide
        MLP, dense layers of a mixture-of-experts model) are padded with NaN, which every
        selection ranks last."""
        layers = self.layers(site)
        if not layers:
            raise SiteError(f"site {site!r} was not collected; collected: {sorted(self.stats)}")
        rows = [getattr(self.stats[(site, l)], stat).to("cpu") for l in layers]
        width = max(r.shape[-1] for r in rows)
        return torch.stack([torch.nn.functional.pad(r.double(), (0, width - r.shape[-1]),
                                                    value=float("nan"))
                            if r.shape[-1] < width else r for r in rows])

    def widths(self, site: str) -> list[int]:
        """Number of neurons of each collected layer of ``site`` (the rows of :meth:`stacked`
        before NaN padding), in :meth:`layers` order."""
        return [self.stats[(site, l)].d for l in self.layers(site)]

    def merge(self, other: "StatsCollection") -> "StatsCollection":
        if set(other.stats) != set(self.stats):
            raise SiteError("cannot merge collections over different sites/layers")
        for k in self.stats:
            self.stats[k].merge(other.stats[k])
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s}.{l}.{k}": v for (s, l), st in self.stats.items()
                for k, v in st.export().items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic safetensors file; tensors ``{site}.{layer}.{stat}`` (count, mean, var, std...)."""
        return save_artifact(path, self.state_dict(), self.meta, kind="stats",
                             fingerprint=self.meta.get("fingerprint"))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "StatsCollection":
        groups: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            site, layer, stat = name.split(".", 2)
            groups.setdefault((site, int(layer)), {})[stat] = t
        return cls({k: NeuronStats.from_export(v) for k, v in groups.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "StatsCollection":
        """Load statistics; with ``model`` the fingerprint is checked."""
        tensors, meta = load_artifact(path, kind="stats", model=model)
        return cls.from_state(tensors, meta)

    def to(self, device) -> "StatsCollection":
        for st in self.stats.values():
            for c in st.components:
                c.to(device)
        return self

    def display(self, stat: str = "mean", site: str | None = None):
        """A display (``_repr_html_``, ``save``): sites x layers summary and one panel per layer
        of the per-neuron ``stat`` at ``site``."""
        from skilllens.core.display import stats_display
        return stats_display(self, stat, site)

    def __repr__(self) -> str:
        from skilllens.core.display import stats_display
        return stats_display(self, figure=False).text

    def _repr_html_(self) -> str:
        return self.display()._repr_html_()


def _args_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _range_key(hist_range):
    """JSON-ready identity of a histogram range (None, floats, or per-neuron tensors by a hash
    of their float32 values), so a checkpoint written with another range is not resumed."""
    if hist_range is None:
        return None

    def one(v):
        t = torch.as_tensor(v, dtype=torch.float32).detach().cpu().contiguous()
        if t.numel() == 1:
            return float(t)
        return f"{tuple(t.shape)}:{hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}"
    return [one(v) for v in hist_range]


def collect(model, data, sites=("gate",), layers=None, tokens: str = "all",
            batch_size: int = 16, max_length: int = 512, *, stats=DEFAULT_STATS, bins: int = 256,
            hist_range=None, backend: str = "torch", stats_backend: str = "auto",
            store: bool | list = False, store_dir: str | os.PathLike | None = None,
            store_tokens: str | None = None,
            max_items: int | None = None, data_dir=None, part: str = "all",
            progress: bool = True,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50,
            rank: int = 0, world_size: int = 1) -> StatsCollection:
    """Run batched forward passes over ``data`` and accumulate per-neuron statistics.

    ``model``: a spec or ``LoadedModel``; ``data``: a skill spec, ``Skill``, items or texts;
    ``part``: which part of a spec's items (default ``"all"``: every item of what was given;
    ``"probe"``/``"eval"``: that part of the probe/eval split, ``skilllens.data.split_skill``),
    recorded with the counts in ``result.meta["data_part"]`` (``"probe part: 9 of 12 items;
    eval: 3"``); ``max_items`` keeps the first items of that;
    ``sites`` from ``gate``/``up``/``key``; ``layers``: indices (default all); ``tokens``:
    ``all`` (every non-padding token), ``last`` (last prompt token) or ``answer``.
    ``store``: also keep the selected vectors (True = every site/layer, or a list of
    ``(site, layer)``), in ``result.vectors`` and, with ``store_dir``, as safetensors shards.
    ``store_tokens``: which tokens' vectors ``store`` keeps (default ``tokens``); ``"last"``
    with ``tokens="all"`` keeps one vector per item, the one a prompt-only pass gives at the
    last prompt token (``collect(prompts, tokens="last")``, as KSD queries), read from this
    pass where the item's ids start with the prompt's own ids, else from a prompt-only pass
    over those items (``meta["n_store_prompt_passes"]``): statistics and queries in one pass.
    ``checkpoint``: a file written every ``checkpoint_every`` batches; a rerun with the same
    arguments resumes from it without counting any batch twice. ``rank``/``world_size`` shard
    the items for data-parallel runs (merge with :func:`skilllens.core.distributed.all_merge`).
    ``max_length`` is clamped to the model's context; ``meta["max_length"]`` is the length
    used, ``meta["n_truncated"]`` the items cut to it (:mod:`skilllens.core.batching`). With
    ``tokens="all"`` an item is plain text (no prompt/answer split is needed).
    """
    lm = load_model(model)
    adapter = lm.adapter
    if tokens not in TOKEN_MODES:
        raise DataError(f"unknown token selection {tokens!r}; use one of {TOKEN_MODES}")
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise SiteError("no sites given; choose from gate, up, key (MoE: also router, routing)")
    for s in sites:
        if s in ROUTER_SITES and not hasattr(adapter, "layers_info"):
            raise SiteError(f"site {s!r} exists on mixture-of-experts models only")
        adapter.arch.site(s)
    layers = adapter.check_layers(layers)
    skill = resolve_skills(data, data_dir, part).head(max_items)  # all items unless asked
    if tokens == "answer" and not any(it.answer for it in skill.items):
        raise DataError(f"tokens='answer' needs prompt/answer items; {skill.name!r} has no answers")
    device = lm.device
    used_length = clamp_length(max_length, lm.model, lm.tokenizer)
    encoded = encode_items(skill.items, lm.tokenizer, used_length, split=tokens != "all")
    store_tokens = _check_store_tokens(tokens, store_tokens)
    n_truncated = sum(e.truncated for e in encoded)
    n_merged = sum(e.merged for e in encoded)
    if world_size > 1:
        encoded = encoded[rank::world_size]
    keys = [(s, l) for l in layers for s in sites]
    store_keys = set(keys if store is True else (store or []))
    fp = lm.fingerprint
    args = {"sites": sites, "layers": layers, "tokens": tokens, "batch_size": batch_size,
            "max_length": max_length, "stats": list(stats), "bins": bins, "max_items": max_items,
            "rank": rank, "world_size": world_size, "store": sorted(store_keys),
            "store_tokens": store_tokens,
            "hist_range": _range_key(hist_range)}
    meta = {"model": lm.name, "fingerprint": fp, "data": skill.name, "data_source": skill.source,
            "data_hash": skill.digest(), "n_items": len(skill), "data_part": skill.describe(), "args": args,
            "max_length": used_length, "n_truncated": n_truncated, "n_merged_boundary": n_merged}
    experts_meta = layer_experts_meta(adapter, layers)
    if experts_meta:  # flat neuron j of a MoE layer = neuron j - offsets[e] of expert e
        meta["experts"] = experts_meta
    result = StatsCollection({}, meta)
    prompt_pass = []  # items whose last-prompt vector needs a prompt-only pass
    if store_keys and store_tokens != tokens:
        prompt_pass = mismatched_prompts(encoded, skill.items, lm.tokenizer, used_length)
        result.meta["n_store_prompt_passes"] = len(prompt_pass)
    current: dict = {}
    stats_args = dict(stats=stats, bins=bins, hist_range=hist_range, backend=stats_backend)
    moe_keys = [k for k in keys if is_moe_key(adapter, k)]
    if moe_keys and world_size > 1 and "histogram" in stats and hist_range is None:
        raise SiteError("data-parallel histograms at mixture-of-experts sites need a common "
                        "range: pass hist_range=(lo, hi)")
    collected, moe_hooks, moe_finish = moe_plan(adapter, moe_keys, stats_args, current,
                                                store_keys)
    collected.update({k: NeuronStats(adapter.d_ff_at(k[1]), **stats_args) for k in keys
                      if k not in collected})  # d_ff may vary per layer
    done, n_tokens = 0, 0
    buffers: dict[tuple[str, int], list[torch.Tensor]] = {k: [] for k in store_keys}
    item_rows: list[torch.Tensor] = []
    vec = {"shards": 0, "flushed": 0}  # vector shards written / chunks already in them
    ckpt_hash = _args_hash({"fp": fp["id"], "data": meta["data_hash"], **args})
    if checkpoint is not None and Path(checkpoint).exists():
        ck_meta = read_metadata(checkpoint)
        if ck_meta.get("args_hash") == ckpt_hash:
            tensors, _ = load_artifact(checkpoint, kind="checkpoint")
            for k, st in StatsCollection.from_state(tensors, {}).stats.items():
                if k in moe_keys:  # the hooks hold the per-expert objects: merge into them
                    collected[k].merge(st)
                else:
                    collected[k] = st
            done, n_tokens = ck_meta["batches_done"], ck_meta["n_tokens"]
            vec["shards"] = ck_meta.get("vector_shards", 0)
            _load_vector_shards(checkpoint, vec["shards"], buffers, item_rows)
            vec["flushed"] = len(item_rows)
        else:
            warnings.warn(f"checkpoint {checkpoint} was written with other arguments; starting "
                          f"over and replacing it", stacklevel=2)
    for st in collected.values():
        for c in st.components:
            c.to(device)

    def checkpoint_now():
        _save_vector_shard(checkpoint, vec, buffers, item_rows, fp)
        _save_checkpoint(checkpoint, collected, ckpt_hash, done, n_tokens, fp, vec["shards"])

    def make_hook(key):
        def fn(act):
            mask = current["mask"]
            if mask.device != act.device:  # layers spread over devices (device_map)
                mask = mask.to(act.device)
            collected[key].update(act, mask)
            if key in store_keys:
                keep = current["store_mask"].to(act.device)
                buffers[key].append(act[keep].detach().to(torch.float32))
        return fn

    hooks = [Hook(s, l, make_hook((s, l))) for (s, l) in keys if (s, l) not in moe_keys]
    hooks += moe_hooks
    total = n_batches(len(encoded), batch_size)
    if world_size > 1 and hist_range is None and "histogram" in stats:
        _agree_histogram_ranges(lm, collected, encoded, batch_size, tokens, backend)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="batch", disable=not progress,
               desc=f"collect {skill.name}")
    t0 = time.perf_counter()
    with torch.no_grad(), eval_mode(lm.model):  # no dropout; the caller's flags come back
        for b, batch in enumerate(iter_batches(encoded, batch_size, pad_id(lm.tokenizer),
                                               device)):
            if b < done:
                continue
            current["mask"] = batch.token_mask(tokens)
            current["store_mask"] = keep = current["mask"] if store_tokens == tokens else \
                store_mask(batch, store_tokens, prompt_pass)
            if store_keys:
                item_rows.append(torch.repeat_interleave(batch.index, keep.sum(1)).cpu())
            run_with_hooks(lm, batch.inputs, hooks, backend=backend,
                           stop_after_last=(backend == "torch"), use_cache=False)
            for k, rows in moe_finish(keep).items():
                buffers[k].append(rows)
            n_tokens += batch.n_tokens
            done = b + 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
            if checkpoint is not None and done % checkpoint_every == 0 and done < total:
                checkpoint_now()
    bar.close()
    if prompt_pass:
        add_prompt_vectors(lambda its, ks: last_prompt_vectors(
            lm, its, ks, batch_size=batch_size, max_length=used_length, backend=backend),
            prompt_pass, skill.items, buffers, item_rows)
    result.stats = collected
    result.meta["n_tokens"] = n_tokens
    bad = {f"{s}.{l}": int(st.n_nonfinite.sum()) for (s, l), st in collected.items()
           if int(st.n_nonfinite.sum())}
    result.meta["nonfinite"] = bad
    if bad:
        warnings.warn(f"NaN/inf activations were excluded from the statistics: {bad}",
                      stacklevel=2)
    for (s, l), st in collected.items():
        st.warn_if_out_of_range(f"{s}.{l}")
    if checkpoint is not None:
        checkpoint_now()
    if store_keys:
        order = torch.cat(item_rows) if item_rows else torch.zeros(0, dtype=torch.long)
        perm = torch.argsort(order, stable=True)
        result.vector_items = order[perm]
        for k, chunks in buffers.items():
            d = collected[k].d
            vec = torch.cat(chunks).cpu() if chunks else torch.zeros(0, d)
            result.vectors[k] = vec[perm]
        if store_dir is not None:
            save_vectors(result, store_dir)
    return result


def last_prompt_vectors(lm, items, keys, *, batch_size: int = 16, max_length: int = 512,
                        backend: str = "torch", progress: bool = False) -> dict:
    """``{(site, layer): [n_items, d]}`` float32, in item order: each item's vector at its last
    prompt token from a prompt-only pass (``tokens="last"``; answers never seen: KSD's
    queries). ``max_length`` is clamped to the model's context."""
    keys = list(keys)
    res = collect(lm, prompt_items(items), sites=sorted({s for s, _ in keys}),
                  layers=sorted({l for _, l in keys}), tokens="last", batch_size=batch_size,
                  max_length=max_length, stats=("moments",), store=keys, backend=backend,
                  progress=progress)
    return {k: res.vectors[k] for k in keys}


def _save_checkpoint(path, collected, ckpt_hash, done, n_tokens, fp, vector_shards=0):
    tensors = StatsCollection(collected).state_dict()
    save_artifact(path, tensors, {"args_hash": ckpt_hash, "batches_done": done,
                                  "n_tokens": n_tokens, "vector_shards": vector_shards},
                  kind="checkpoint", fingerprint=fp)


def _agree_histogram_ranges(lm, collected, encoded, batch_size, tokens, backend) -> None:
    """Data-parallel runs: every rank sets automatic histogram ranges from its first batch,
    then all ranks take the union (min of ``lo``, max of ``hi``) so that ``all_merge`` can add
    the counts exactly. Ranks without data take part with empty ranges."""
    from skilllens.stats.ranks import agree_histogram_ranges

    todo = {k: st.histogram for k, st in collected.items()
            if st.histogram is not None and st.histogram.lo is None}
    first = next(iter(iter_batches(encoded, batch_size, pad_id(lm.tokenizer), lm.device)), None)
    if todo and first is not None:
        mask = first.token_mask(tokens)

        def warm(h):
            return lambda act: h.ensure_range(act, mask.to(act.device))

        with torch.no_grad():
            run_with_hooks(lm, first.inputs, [Hook(s, l, warm(h)) for (s, l), h in todo.items()],
                           backend=backend, stop_after_last=(backend == "torch"),
                           use_cache=False)
    agree_histogram_ranges([collected[k].histogram for k in sorted(collected)
                            if collected[k].histogram is not None])
