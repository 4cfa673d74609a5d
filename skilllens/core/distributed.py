"""Data-parallel collection: merge ``StatsCollection``s across ``torch.distributed`` ranks.

Launch one process per GPU (or CPU worker) with ``torchrun``; each collects its shard and the
sufficient statistics are gathered and merged exactly (Chan's formula, in rank order, so every
rank ends with the same result)::

    # torchrun --nproc-per-node 8 collect_job.py
    import torch.distributed as dist, skilllens
    dist.init_process_group("nccl")            # "gloo" on CPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    lm = skilllens.load_model("meta-llama/Meta-Llama-3-8B", device=f"cuda:{rank}", dtype="bfloat16")
    res = skilllens.collect(lm, "gsm8k", sites=["gate", "key"], rank=rank, world_size=world)
    res = skilllens.core.distributed.all_merge(res)
    if rank == 0:
        res.save("gsm8k_stats.safetensors")

Models too large for one GPU load with ``device_map="auto"`` (``load_model(spec,
device_map="auto")``) and collection works unchanged: each statistic lives on the device of
the layer it watches.
"""
from __future__ import annotations

import hashlib

import torch

from skilllens.core.collect import StatsCollection
from skilllens.errors import SkillLensError
from skilllens.stats.neuron_stats import NeuronStats


def _layout_code(col: StatsCollection) -> int:
    desc = ";".join(f"{s}.{l}:{st.d}:{','.join(st.stats)}" for (s, l), st in sorted(col.stats.items()))
    return int(hashlib.sha256(desc.encode()).hexdigest()[:15], 16)


def all_merge(col: StatsCollection, group=None) -> StatsCollection:
    """Gather every rank's statistics and merge them (in rank order) on every rank."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return col
    world = dist.get_world_size(group)
    if world == 1:
        return col
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    code = torch.tensor([_layout_code(col)], dtype=torch.int64, device=dev)
    codes = [torch.zeros_like(code) for _ in range(world)]
    dist.all_gather(codes, code, group=group)
    if len({int(c) for c in codes}) != 1:
        raise SkillLensError("ranks disagree on the collected sites/layers/neurons/statistics; "
                             "every rank must call collect() with the same sites, layers and "
                             "stats (only rank/world_size differ)")
    merged: dict = {}
    for key, st in sorted(col.stats.items()):
        if hasattr(st, "flat"):  # per-expert statistics of a MoE layer: their flat, exact form
            st = st.flat()
        state = st.state_dict()
        gathered = {}
        for name, t in state.items():
            t = t.to(dev).contiguous()
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=group)
            gathered[name] = parts
        out = None
        for r in range(world):
            peer = NeuronStats(st.d, st.stats, bins=st.histogram.bins if st.histogram else 256)
            peer.load_state_dict({k: v[r].cpu() for k, v in gathered.items()})
            out = peer if out is None else out.merge(peer)
        merged[key] = out
    res = StatsCollection(merged, dict(col.meta))
    res.meta["world_size"] = world
    res.meta["n_tokens"] = _sum_scalar(col.meta.get("n_tokens", 0), dev, group)
    return res


def _sum_scalar(x, dev, group) -> int:
    import torch.distributed as dist
    t = torch.tensor([int(x)], dtype=torch.int64, device=dev)
    dist.all_reduce(t, group=group)
    return int(t)
