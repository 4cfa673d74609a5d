"""The hook mechanism: three backends agree, edits apply, hooks are removed."""
import pytest
import torch

import skilllens
from skilllens.errors import SiteError
from skilllens.core.hooks import Hook, hooks_applied, run_with_hooks

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")


def _inputs(n=3, t=9, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": att}


LIBRARY = {"lens": "transformer_lens", "nnsight": "nnsight"}


def _callers() -> set[str]:
    """Top-level packages of every frame on the current stack (and of the thread that runs it)."""
    import inspect
    names = set()
    for f in inspect.stack(0):
        mod = f.frame.f_globals.get("__name__", "")
        names.add(mod.split(".")[0])
    return names


def _read_and_edit(lm, inputs, backend, layers):
    acts, seen = {}, []

    def read(a, k):
        seen.append(_callers())
        acts[k] = a.detach().clone()

    sites = [s for s in lm.adapter.sites if s != "value"]
    hooks = [Hook(s, l, lambda a, k=(s, l): read(a, k)) for s in sites for l in layers]
    with torch.no_grad():
        out = run_with_hooks(lm, inputs, hooks, backend=backend)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        edited = run_with_hooks(lm, inputs, [Hook("key", layers[-1], lambda a: a * 0.25 + 0.1)],
                                backend=backend)
        edited = edited if isinstance(edited, torch.Tensor) else edited.logits
    if backend in LIBRARY:  # the hooks really ran inside that library, not a torch fallback
        assert seen and all(LIBRARY[backend] in callers for callers in seen), (backend, seen[0])
    return acts, logits, edited


def _compare(lm, inputs, layers, atol):
    ref = _read_and_edit(lm, inputs, "torch", layers)
    calls = _spy_on_libraries()
    try:
        assert (ref[2] - ref[1]).abs().max() > 1e-3  # the edit changes the output
        for backend in ("lens", "nnsight"):
            acts, logits, edited = _read_and_edit(lm, inputs, backend, layers)
            assert set(acts) == set(ref[0])
            for k in acts:
                torch.testing.assert_close(acts[k], ref[0][k], atol=atol, rtol=1e-4)
            torch.testing.assert_close(logits, ref[1], atol=atol, rtol=1e-4)
            torch.testing.assert_close(edited, ref[2], atol=atol, rtol=1e-4)
        # each library's entry point ran once per pass; lens once more on first use: the check
        # that its hooks read what the torch sites read (core/hooks.py::_check_lens)
        assert calls == {"lens": 3, "nnsight": 2}
    finally:
        _unspy()


_SPIED = []


def _spy_on_libraries() -> dict:
    """Count calls of ``TransformerBridge.run_with_hooks`` and ``NNsight.trace``."""
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge
    calls = {"lens": 0, "nnsight": 0}
    for cls, attr, key in ((TransformerBridge, "run_with_hooks", "lens"),
                           (NNsight, "trace", "nnsight")):
        real = cls.__dict__.get(attr) or getattr(cls, attr)

        def spy(self, *a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(self, *a, **kw)
        _SPIED.append((cls, attr, cls.__dict__.get(attr)))
        setattr(cls, attr, spy)
    return calls


def _unspy():
    while _SPIED:
        cls, attr, real = _SPIED.pop()
        if real is None:
            delattr(cls, attr)
        else:
            setattr(cls, attr, real)


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


def _snapshot(model):
    """Everything a backend must leave as it was: names, module tree, hooks, state dict, attrs."""
    hooks = {n: {d: list(getattr(m, d, {}).items()) for d in
                 ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")}
             for n, m in model.named_modules()}
    return ([n for n, _ in model.named_parameters()],
            [(n, type(m).__name__, id(m)) for n, m in model.named_modules()], hooks,
            list(model.state_dict()), {n: sorted(vars(m)) for n, m in model.named_modules()},
            {n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize("backend", ["lens", "nnsight"])
def test_backends_leave_the_users_model_exactly_as_it_was(backend):
    """Defect 9: the lens backend rewrapped the user's modules in place (every parameter became
    ``..._original_component...``); nnsight patched ``forward`` onto the instance."""
    lm = skilllens.load_model("tiny-llama")
    before = _snapshot(lm.model)
    with torch.no_grad():
        for _ in range(2):
            run_with_hooks(lm, _inputs(), [Hook("gate", 0, lambda a: a * 2)], backend=backend)
    after = _snapshot(lm.model)
    for b, a in zip(before[:5], after[:5]):
        assert a == b
    assert all(torch.equal(after[5][n], t) for n, t in before[5].items())
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in lm.model.named_parameters()}
    lm.model.load_state_dict(lm.model.state_dict())  # state dicts and masks still match
    assert set(masks) == set(lm.model.state_dict()) - {n for n, _ in lm.model.named_buffers()}


@pytest.mark.parametrize("backend", ["lens", "nnsight"])
def test_views_see_weight_edits_and_the_users_torch_hooks(backend):
    lm = skilllens.load_model("tiny-llama")
    inputs = _inputs()

    def logits(out):
        return out if isinstance(out, torch.Tensor) else out.logits

    with torch.no_grad():
        run_with_hooks(lm, inputs, [], backend=backend)  # builds and caches the view
        lm.adapter.value_weight(1).mul_(3.0)  # an in-place weight edit after the view exists
        ref = logits(run_with_hooks(lm, inputs, [], backend="torch"))
        torch.testing.assert_close(logits(run_with_hooks(lm, inputs, [], backend=backend)), ref,
                                   atol=1e-5, rtol=1e-4)
        edit = [Hook("key", 1, lambda a: a * 0.5)]
        with hooks_applied(lm, edit):  # torch hooks on the user's modules apply on the view too
            want = logits(run_with_hooks(lm, inputs, [], backend="torch"))
            got = logits(run_with_hooks(lm, inputs, [], backend=backend))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert (want - ref).abs().max() > 1e-3
        after = logits(run_with_hooks(lm, inputs, [], backend=backend))  # and are gone after
        torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-4)
