"""One mechanism to read and edit FFN site activations, with three backends.

A :class:`Hook` names a site, a layer and a function ``fn(act) -> act | None`` that sees the
activation ``[batch, seq, d_ff]`` and may return a replacement (an edit) or ``None`` (read only).

* ``torch`` (default, fastest): plain forward hooks / pre-hooks on the site's module.
* ``lens``: TransformerLens ``TransformerBridge`` hook points (``blocks.{i}.mlp.hook_pre`` ...).
* ``nnsight``: an ``nnsight.NNsight`` trace over the same modules.

>>> import torch, skilllens
>>> from skilllens.hooks import Hook, run_with_hooks
>>> lm = skilllens.load_model("tiny-llama")
>>> seen = {}
>>> out = run_with_hooks(lm, {"input_ids": torch.tensor([[1, 2, 3]])},
...                      [Hook("gate", 0, lambda a: seen.setdefault("gate", a))])
>>> tuple(seen["gate"].shape)
(1, 3, 64)

Hooks are always removed on exit, also when the forward pass raises.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .architectures import ACTIVATION_SITES, LENS_HOOKS
from .errors import SiteError

BACKENDS = ("torch", "lens", "nnsight")
HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass
class Hook:
    """Read (``fn`` returns None) or edit (``fn`` returns a tensor) ``site`` at ``layer``."""

    site: str
    layer: int
    fn: HookFn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (nothing after it is needed)."""


def _adapter(lm):
    from .models import LoadedModel
    if isinstance(lm, LoadedModel):
        return lm.adapter
    if hasattr(lm, "blocks") and hasattr(lm, "arch"):
        return lm
    from .architectures import ModelAdapter
    return ModelAdapter(lm)


def check_hooks(adapter, hooks: list[Hook], backend: str = "torch") -> list[Hook]:
    """Validate sites, layers and backend; return hooks in execution order."""
    if backend not in BACKENDS:
        raise SiteError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    order = {s: i for i, s in enumerate(ACTIVATION_SITES)}
    out = []
    for h in hooks:
        adapter.arch.site(h.site)  # raises for unknown / absent sites
        layer = adapter.check_layers([h.layer])[0]
        out.append(Hook(h.site, layer, h.fn))
    return sorted(out, key=lambda h: (h.layer, order[h.site]))


@contextlib.contextmanager
def hooks_applied(lm, hooks: list[Hook], stop_after_last: bool = False):
    """Install ``hooks`` as torch hooks for the duration of the block (any forward/generate).

    ``stop_after_last``: raise :class:`StopForward` after the last hook ran (read-only passes).
    """
    adapter = _adapter(lm)
    hooks = check_hooks(adapter, hooks, "torch")
    handles = []
    last = hooks[-1] if (hooks and stop_after_last) else None

    def wrap(h: Hook, where: str):
        def call(act):
            new = h.fn(act)
            if h is last:
                raise StopForward
            return new

        if where == "output":
            return lambda mod, args, out: call(out)

        def pre(mod, args):
            new = call(args[0])
            return None if new is None else (new,) + tuple(args[1:])
        return pre

    try:
        for h in hooks:
            mod, where = adapter.site_module(h.site, h.layer)
            if where == "output":
                handles.append(mod.register_forward_hook(wrap(h, where)))
            else:
                handles.append(mod.register_forward_pre_hook(wrap(h, where)))
        yield adapter
    finally:
        for handle in handles:
            handle.remove()


def _forward(model, inputs: dict, **kw):
    return model(**inputs, **kw)


def run_with_hooks(lm, inputs: dict, hooks: list[Hook], backend: str = "torch",
                   stop_after_last: bool = False, **forward_kwargs):
    """One forward pass of ``lm`` on ``inputs`` (``input_ids``, ``attention_mask``) with hooks.

    Returns the model output (logits tensor for ``lens``; the HF output object otherwise), or
    ``None`` if the pass was stopped early by ``stop_after_last``.
    """
    adapter = _adapter(lm)
    hooks = check_hooks(adapter, hooks, backend)
    model = adapter.model
    if backend == "torch":
        try:
            with hooks_applied(adapter, hooks, stop_after_last=stop_after_last):
                return _forward(model, inputs, **forward_kwargs)
        except StopForward:
            return None
    if backend == "lens":
        return _run_lens(lm, adapter, inputs, hooks)
    return _run_nnsight(adapter, inputs, hooks, forward_kwargs)


def lens_bridge(lm):
    """The TransformerLens ``TransformerBridge`` around ``lm`` (built once, cached on the model).

    Note: TransformerLens wraps the model's submodules in place; plain torch hooks keep working.
    """
    model = _adapter(lm).model
    bridge = getattr(model, "_skilllens_bridge", None)
    if bridge is None:
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError:
            raise SiteError("the 'lens' backend needs TransformerLens: "
                            "pip install 'transformer-lens>=3'") from None
        tok = getattr(lm, "tokenizer", None)
        if tok is None:
            raise SiteError("the 'lens' backend needs a tokenizer: pass a LoadedModel")
        device = next(model.parameters()).device
        name = getattr(lm, "name", None) or model.config._name_or_path or "model"
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok,
                                                     device=device, dtype=model.dtype)
        object.__setattr__(model, "_skilllens_bridge", bridge)
    return bridge


def _run_lens(lm, adapter, inputs, hooks):
    bridge = lens_bridge(lm)
    fwd = []
    for h in hooks:
        name = LENS_HOOKS[h.site].format(i=h.layer)
        fwd.append((name, lambda act, hook, fn=h.fn: fn(act)))
    return bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=fwd,
                                 attention_mask=inputs.get("attention_mask"))


def _nnsight_model(model):
    nm = getattr(model, "_skilllens_nnsight", None)
    if nm is None:
        try:
            from nnsight import NNsight
        except ImportError:
            raise SiteError("the 'nnsight' backend needs nnsight: pip install nnsight") from None
        nm = NNsight(model)
        object.__setattr__(model, "_skilllens_nnsight", nm)
    return nm


def _envoy(nm, path: str):
    obj = nm
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _run_nnsight(adapter, inputs, hooks, forward_kwargs):
    nm = _nnsight_model(adapter.model)
    with nm.trace(**inputs, **forward_kwargs):
        for h in hooks:
            path, where = adapter.site_module_path(h.site, h.layer)
            envoy = _envoy(nm, path)
            new = h.fn(envoy.output if where == "output" else envoy.input)
            if new is not None:
                if where == "output":
                    envoy.output = new
                else:
                    envoy.input = new
        out = nm.output.save()
    return out
