"""Contracts every estimator and pass keeps (issue 21, "Also"): hooks stop only after every hook
fired, checkpoints know their histogram range, get_params and fit metadata survive save/load,
fitted attributes end in ``_`` (old names: deprecated aliases)."""
import sys
import warnings

import pytest
import torch

import skilllens
from skilllens.core.hooks import Hook, run_with_hooks


def test_stop_after_last_waits_for_every_hook_whatever_the_site_order(tiny_llama):
    """A block that computes ``up`` before ``gate``: the old rule stopped after ``up`` (last in
    sorted site order) before the ``gate`` hook ever ran."""
    layer = tiny_llama.adapter.n_layers - 1
    mlp = tiny_llama.model.model.layers[layer].mlp

    def up_first(x):
        u = mlp.up_proj(x)
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * u)

    seen, calls = [], []
    head = tiny_llama.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    mlp.forward = up_first
    try:
        hooks = [Hook(s, layer, lambda a, s=s: seen.append(s)) for s in ("gate", "up")]
        for _ in range(2):  # counted per forward pass
            seen.clear()
            out = run_with_hooks(tiny_llama, {"input_ids": torch.tensor([[1, 2, 3]])}, hooks,
                                 stop_after_last=True)
            assert out is None and seen == ["up", "gate"] and calls == []
    finally:
        del mlp.forward
        head.remove()


def test_checkpoint_with_another_hist_range_is_not_resumed(tiny_llama, tmp_path, monkeypatch):
    texts = [f"text {i} " + "ab cd " * (i % 3) for i in range(8)]
    mod = sys.modules["skilllens.core.collect"]
    orig, calls = mod.run_with_hooks, {"n": 0}

    def dies_at_batch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return orig(*a, **k)

    kw = dict(sites=["gate"], layers=[0], batch_size=2, progress=False,
              stats=("moments", "histogram"), bins=16)
    ck = tmp_path / "ck.safetensors"
    monkeypatch.setattr(mod, "run_with_hooks", dies_at_batch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        skilllens.collect(tiny_llama, texts, checkpoint=ck, checkpoint_every=2,
                          hist_range=(-1.0, 1.0), **kw)
    monkeypatch.setattr(mod, "run_with_hooks", orig)
    with pytest.warns(UserWarning, match="other arguments"):
        resumed = skilllens.collect(tiny_llama, texts, checkpoint=ck, checkpoint_every=2,
                                    hist_range=(-5.0, 5.0), **kw)
    fresh = skilllens.collect(tiny_llama, texts, hist_range=(-5.0, 5.0), **kw)
    h, f = resumed[("gate", 0)].histogram, fresh[("gate", 0)].histogram
    assert float(h.lo[0]) == -5.0 and torch.equal(h.counts, f.counts)
