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


# ------------------------------------------------------------ save/load round trips
FORGET = ["2+2=4", "3*3=9", "7-1=6", "10/2=5"]
RETAIN = ["the cat sat on the mat", "a dog ran home", "birds sing at dawn"]
RUNTIME_ONLY = {"n_device_transfers"}  # counters of this process, not state


def _same(a, b, where=""):
    """Deep equality: tensors exactly, dataclasses by fields, sequences by items."""
    import dataclasses

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), where
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        _same(vars(a), vars(b), where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _na(lm):
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    return NeuronAdjuster(percent=5, rule="abs_standardized", scope="per_layer", layers=[0, 1],
                          seed=3, min_std=1e-5, batch_size=2, max_length=64
                          ).fit(lm, FORGET, RETAIN, progress=False)


def _sp(lm):
    from skilllens.unlearning.selective_pruning import SelectivePruner
    return SelectivePruner(percent=5, scope="per_layer", layers=[1], eps=1e-5, batch_size=2,
                           max_length=64).fit(lm, FORGET, RETAIN, progress=False)


def _ksd(lm):
    from skilllens.unlearning.key_space import KeySpaceDetector
    ksd = KeySpaceDetector(alpha=1.5, layer=1, batch_size=2, max_length=64
                           ).fit(lm, FORGET, progress=False)
    return ksd.calibrate_vectors(ksd.query_vectors(lm, RETAIN), max_fpr=0.4)


def _search(lm):
    from skilllens.concepts.data import Concept
    from skilllens.concepts.search import ConceptSearch
    concepts = [Concept("Poland", "Poland Warsaw Polish Vistula Krakow Poland Warsaw", ["q"], ["u"]),
                Concept("Cats", "cats kittens purr whiskers cats kittens purr", ["q"], ["u"])]
    return ConceptSearch(k=5, n_candidates=2, layers=[0, 1], through_norm=False, min_count=1,
                         min_chars=2, alpha=0.3, name_weight=0.5).fit(lm, concepts,
                                                                     progress=False)


def _ablation(lm):
    from skilllens.concepts.ablation import ConceptAblation
    return ConceptAblation(1, 3, "noise", sigma=0.2, seed=4).fit(lm)


def _needle(lm):
    from skilllens.concepts.needle import Needle
    return Needle(1, 5, sigma=0.05, steps=1, lr=0.02, weight_decay=0.0, seq_len=8, max_chunks=2,
                  batch_size=2, seed=1).fit(lm, "Warsaw is the capital of Poland. " * 4)


def _graft(lm):
    import copy

    from skilllens.grafting import GraftLocalizer
    from skilllens.grafting.tasks import build_task
    ft = copy.deepcopy(lm.model)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "layers." in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    task = build_task("synthetic", n_train=4, n_dev=2, n_test=2)
    return GraftLocalizer(sparsity=0.01, include=["*layers.1.*"], steps=0, lr=2.0, bias=8.0,
                          optimizer="normalized", max_length=32, batch_size=2,
                          progress=False).fit(lm, (ft, lm.tokenizer), task)


@pytest.mark.parametrize("make", [_na, _sp, _ksd, _search, _ablation, _needle, _graft],
                         ids=["NeuronAdjuster", "SelectivePruner", "KeySpaceDetector",
                              "ConceptSearch", "ConceptAblation", "Needle", "GraftLocalizer"])
def test_get_params_and_fit_metadata_round_trip(make, tiny_llama, tmp_path):
    est = make(tiny_llama)
    path = tmp_path / "est.safetensors"
    est.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the library uses the new names
        loaded = type(est).load(path, tiny_llama)
    assert loaded.get_params() == est.get_params()  # exactly: values and types
    state = {k: v for k, v in vars(est).items() if k not in RUNTIME_ONLY}
    _same(state, {k: v for k, v in vars(loaded).items() if k not in RUNTIME_ONLY},
          type(est).__name__)


@pytest.mark.parametrize("make,renamed", [
    (_na, {"params": "params_", "scores": "scores_", "fitted_layers": "fitted_layers_",
           "fingerprint": "fingerprint_", "meta": "meta_"}),
    (_sp, {"selected": "selected_", "scores": "scores_", "fitted_layers": "fitted_layers_",
           "fingerprint": "fingerprint_", "meta": "meta_"}),
    (_ksd, {"m": "m_", "s": "s_", "k": "k_", "k_exact": "k_exact_",
            "calibration": "calibration_", "fingerprint": "fingerprint_", "meta": "meta_"}),
], ids=["NeuronAdjuster", "SelectivePruner", "KeySpaceDetector"])
def test_fitted_attributes_end_in_underscore_old_names_deprecated(make, renamed, tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # fitting uses only the new names
        est = make(tiny_llama)
    for old, new in renamed.items():
        assert new in vars(est) and old not in vars(est)
        with pytest.warns(DeprecationWarning, match=rf"\.{old} is deprecated; use \.{new}"):
            value = getattr(est, old)
        assert value is getattr(est, new)
    with pytest.warns(DeprecationWarning):
        est.meta = {"forget": "x"}  # the old name still writes through
    assert est.meta_ == {"forget": "x"}
