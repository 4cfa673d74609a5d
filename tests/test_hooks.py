"""The hook mechanism: three backends agree, edits apply, hooks are removed."""
import pytest
import torch

import skilllens
from skilllens.errors import SiteError
from skilllens.hooks import Hook, hooks_applied, run_with_hooks

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")


def _inputs(n=3, t=9, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": att}


def _read_and_edit(lm, inputs, backend, layers):
    acts = {}
    sites = [s for s in lm.adapter.sites if s != "value"]
    hooks = [Hook(s, l, lambda a, k=(s, l): acts.__setitem__(k, a.detach().clone()))
             for s in sites for l in layers]
    with torch.no_grad():
        out = run_with_hooks(lm, inputs, hooks, backend=backend)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        edited = run_with_hooks(lm, inputs, [Hook("key", layers[-1], lambda a: a * 0.25 + 0.1)],
                                backend=backend)
        edited = edited if isinstance(edited, torch.Tensor) else edited.logits
    return acts, logits, edited


def _compare(lm, inputs, layers, atol):
    ref = _read_and_edit(lm, inputs, "torch", layers)
    assert (ref[2] - ref[1]).abs().max() > 1e-3  # the edit changes the output
    for backend in ("lens", "nnsight"):
        acts, logits, edited = _read_and_edit(lm, inputs, backend, layers)
        assert set(acts) == set(ref[0])
        for k in acts:
            torch.testing.assert_close(acts[k], ref[0][k], atol=atol, rtol=1e-4)
        torch.testing.assert_close(logits, ref[1], atol=atol, rtol=1e-4)
        torch.testing.assert_close(edited, ref[2], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_backends_agree_on_tiny_models(name):
    _compare(skilllens.load_model(name), _inputs(), [0, 1], atol=1e-5)


@pytest.mark.slow
def test_backends_agree_on_smollm2():
    lm = skilllens.load_model("smollm2-135m")
    _compare(lm, _inputs(n=2, t=12, vocab=49152), [0, 15, 29], atol=1e-4)


def test_hooks_removed_on_exit_and_on_exceptions(tiny_llama):
    mod, _ = tiny_llama.adapter.site_module("gate", 0)
    with hooks_applied(tiny_llama, [Hook("gate", 0, lambda a: None)]):
        assert len(mod._forward_hooks) == 1
    assert len(mod._forward_hooks) == 0

    def boom(a):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(tiny_llama, {"input_ids": torch.tensor([[1, 2]])}, [Hook("gate", 0, boom)])
    assert len(mod._forward_hooks) == 0
    key_mod, _ = tiny_llama.adapter.site_module("key", 1)
    assert len(key_mod._forward_pre_hooks) == 0


def test_stop_after_last_skips_rest(tiny_llama):
    calls = []
    head = tiny_llama.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = run_with_hooks(tiny_llama, {"input_ids": torch.tensor([[1, 2]])},
                             [Hook("gate", 0, lambda a: None)], stop_after_last=True)
    finally:
        head.remove()
    assert out is None and calls == []


def test_unknown_backend_and_site(tiny_llama):
    with pytest.raises(SiteError, match="unknown backend"):
        run_with_hooks(tiny_llama, {"input_ids": torch.tensor([[1]])}, [], backend="jax")
    with pytest.raises(SiteError, match="unknown site"):
        run_with_hooks(tiny_llama, {"input_ids": torch.tensor([[1]])}, [Hook("nope", 0, print)])
