"""Two gloo processes merge to the single-process result."""
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
import torch.distributed as dist
import torch.multiprocessing as mp

import skilllens

TEXTS = [f"sample {i}: " + "abc def " * (i % 5) for i in range(13)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, extra=None):
    """Collect this rank's shard (``extra``: more collect arguments), merge, rank 0 saves; with
    ``store=True`` each rank also writes its vectors (safetensors, keys "site.layer")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        extra = dict(extra or {})
        res = skilllens.collect(extra.pop("model", "tiny-llama"), TEXTS,
                                sites=extra.pop("sites", ["gate", "key"]), batch_size=3,
                                rank=rank, world_size=world, progress=False, **extra)
        if res.vectors:  # safetensors, not torch.save/pickle (project rule)
            save_file({f"{s}.{l}": v.contiguous() for (s, l), v in res.vectors.items()},
                      out + f".vec{rank}")
        merged = skilllens.core.distributed.all_merge(res)
        if rank == 0:
            merged.save(out)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_merge_equals_single_process(tmp_path):
    out = str(tmp_path / "merged.safetensors")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    merged = skilllens.StatsCollection.load(out)
    single = skilllens.collect("tiny-llama", TEXTS, sites=["gate", "key"], batch_size=3, progress=False)
    assert merged.meta["world_size"] == 2 and merged.meta["n_tokens"] == single.meta["n_tokens"]
    for k in single.keys():
        assert torch.equal(merged[k].count, single[k].count)
        torch.testing.assert_close(merged[k].mean, single[k].mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(merged[k].var, single[k].var, rtol=1e-5, atol=1e-7)
        # other batch compositions change activations only by float32 rounding
        torch.testing.assert_close(merged[k].min, single[k].min, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[k].max, single[k].max, rtol=1e-5, atol=1e-6)


def test_two_process_gloo_merge_of_expert_statistics(tmp_path):
    """Mixture of experts: each rank's per-expert statistics (each expert saw other tokens)
    merge through all_merge to the single-process counts."""
    out = str(tmp_path / "moe.safetensors")
    extra = {"model": "tiny-mixtral", "sites": ["key", "routing"],
             "stats": ("moments", "positive")}
    mp.start_processes(_worker, args=(2, _free_port(), out, extra), nprocs=2,
                       start_method="spawn")
    merged = skilllens.StatsCollection.load(out)
    single = skilllens.collect("tiny-mixtral", TEXTS, sites=["key", "routing"], batch_size=3,
                               stats=("moments", "positive"), progress=False)
    for k in single.keys():
        assert torch.equal(merged[k].count, single[k].count)
        torch.testing.assert_close(merged[k].mean, single[k].mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["routing", 1].frac_pos, single["routing", 1].frac_pos)


def _bad_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = skilllens.collect("tiny-llama", TEXTS, sites="gate", layers=[rank], rank=rank,
                                world_size=world, progress=False)
        try:
            skilllens.core.distributed.all_merge(res)
        except skilllens.SkillLensError as e:
            Path(out + f".{rank}").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_get_a_clear_error(tmp_path):
    out = str(tmp_path / "err")
    mp.start_processes(_bad_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    for r in range(2):
        assert "ranks disagree" in Path(out + f".{r}").read_text()


def test_two_process_merge_with_automatic_histogram_ranges(tmp_path):
    # issue 10 defect 5: automatic ranges differed per rank and all_merge refused them
    from skilllens.stats import HistogramSpec, histogram_counts

    out = str(tmp_path / "merged.safetensors")
    extra = dict(layers=[0, 1], stats=("moments", "histogram"), bins=32, store=True)
    mp.start_processes(_worker, args=(2, _free_port(), out, extra), nprocs=2, start_method="spawn")
    merged = skilllens.StatsCollection.load(out)
    vecs = [{(k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])): v
             for k, v in load_file(out + f".vec{r}").items()} for r in range(2)]
    for k in merged.keys():
        h = merged[k].histogram
        rows = torch.cat([v[k] for v in vecs])
        assert int(h.counts.sum(1)[0]) == rows.shape[0] == int(merged[k].count[0])
        assert torch.equal(h.counts, histogram_counts(rows, HistogramSpec(h.lo, h.hi, 32)))
