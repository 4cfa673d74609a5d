"""One mechanism to read and edit FFN site activations, with three backends.

A :class:`Hook` names a site, a layer and a function ``fn(act) -> act | None`` that sees the
activation ``[batch, seq, d_ff]`` and may return a replacement (an edit) or ``None`` (read only).

* ``torch`` (default, fastest): plain forward hooks / pre-hooks on the site's module.
* ``lens``: TransformerLens ``TransformerBridge`` hook points (``blocks.{i}.mlp.hook_pre`` ...),
  on a view of the model that shares its weights (the user's module tree is never rewrapped).
  On first use per model and site the bridge's hook is checked to read what the torch site
  reads; an architecture the bridge does not map (or maps differently) is refused with a
  :class:`~skilllens.errors.SiteError`.
* ``nnsight``: an ``nnsight.NNsight`` trace over the same modules (also on a view).

Mixture-of-experts layers have per-expert sites: pass
:class:`~skilllens.core.moe_hooks.ExpertHook` (one expert's ``[n_routed, f]`` activations) and
:class:`~skilllens.core.moe_hooks.RouterHook` objects in the same lists (``torch`` backend only;
``lens`` and ``nnsight`` refuse MoE models).

>>> import torch, skilllens
>>> from skilllens.core.hooks import Hook, run_with_hooks
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
import copy
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from skilllens.core.architectures import ACTIVATION_SITES, LENS_HOOKS, PARTS
from skilllens.core.loaded_model import LoadedModel
from skilllens.core.moe import MoeAdapter, adapter_for
from skilllens.core.moe_hooks import ExpertHook, RouterHook, moe_hooks_applied
from skilllens.errors import SiteError

BACKENDS = ("torch", "lens", "nnsight")
HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
# per-model caches of the library wrappers (weak: they never keep a model alive, and nothing
# is stored on the user's model)
_BRIDGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_NNSIGHT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# per model: the sites whose lens hooks were checked to read what the torch sites read
_LENS_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Hook:
    """Read (``fn`` returns None) or edit (``fn`` returns a tensor) ``site`` at ``layer``."""

    site: str
    layer: int
    fn: HookFn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (nothing after it is needed)."""


def _adapter(lm):
    if isinstance(lm, LoadedModel):
        return lm.adapter
    if hasattr(lm, "blocks") and hasattr(lm, "arch"):
        return lm
    return adapter_for(lm)


def _is_moe_hook(h) -> bool:
    return isinstance(h, (ExpertHook, RouterHook))


def check_hooks(adapter, hooks: list[Hook], backend: str = "torch") -> list[Hook]:
    """Validate sites, layers and backend; return hooks in execution order."""
    if backend not in BACKENDS:
        raise SiteError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    order = {s: i for i, s in enumerate(ACTIVATION_SITES)}
    moe = [h for h in hooks if _is_moe_hook(h)]
    if backend != "torch" and (moe or isinstance(adapter, MoeAdapter)):
        raise SiteError(f"the {backend!r} backend does not support mixture-of-experts models "
                        f"(it sees a MoE block's input and output only); use backend='torch'")
    out = []
    for h in (h for h in hooks if not _is_moe_hook(h)):
        adapter.arch.site(h.site)  # raises for unknown / absent sites
        layer = adapter.check_layers([h.layer])[0]
        out.append(Hook(h.site, layer, h.fn))
    return sorted(out, key=lambda h: (h.layer, order[h.site])) + moe


def _split(act: torch.Tensor, part: str | None):
    """``(view, index)``: the site's slice of a module tensor (``index`` None for all of it)."""
    if part is None:
        return act, None
    index = (Ellipsis, PARTS[part](act.shape[-1] // 2))
    return act[index], index


def _merge(act: torch.Tensor, index, new: torch.Tensor) -> torch.Tensor:
    """``act`` with the slice ``index`` replaced by ``new`` (a copy; ``act`` is untouched)."""
    if index is None:
        return new
    out = act.clone()
    out[index] = new.to(out.dtype)
    return out


def site_call(fn: HookFn, act: torch.Tensor, part: str | None, lead=None):
    """Apply ``fn`` to the site's view of module tensor ``act``: its ``part`` (fused
    ``gate_up_proj`` halves) reshaped to ``[*lead, d_ff]`` when the block flattened its tokens
    (``lead`` = ``(batch, seq)``). Returns the full replacement tensor or None (read only)."""
    view, index = _split(act, part)
    flat = lead is not None and view.dim() == 2 and len(lead) == 2
    new = fn(view.reshape(*lead, view.shape[-1]) if flat else view)
    if new is None:
        return None
    if flat:
        new = new.reshape(view.shape)
    return _merge(act, index, new)


@contextlib.contextmanager
def hooks_applied(lm, hooks: list[Hook], stop_after_last: bool = False):
    """Install ``hooks`` as torch hooks for the duration of the block (any forward/generate).

    ``stop_after_last``: raise :class:`StopForward` once every hook has run in this forward
    pass (read-only passes); counted per pass, so it holds whatever order a block computes its
    sites in (e.g. ``up`` before ``gate``).
    Sites that are slices of one module's output (fused ``gate_up_proj``) read and replace
    their slice only; blocks that flatten tokens (OPT) are seen as ``[batch, seq, d_ff]``.
    """
    adapter = _adapter(lm)
    hooks = check_hooks(adapter, hooks, "torch")
    moe = [h for h in hooks if _is_moe_hook(h)]
    hooks = [h for h in hooks if not _is_moe_hook(h)]
    handles = []
    fired: set[int] = set()  # hooks that ran in the current forward pass
    stop_dense, stop_layer = stop_after_last and bool(hooks), None
    if moe and stop_after_last:  # MoE hooks run inside a block: stop after the block instead
        stop_layer = max(adapter.check_layers([h.layer])[0] for h in moe)
        if hooks and max(h.layer for h in hooks) > stop_layer:
            stop_layer = None
        else:
            stop_dense = False
    flat = bool(getattr(adapter.arch, "flat_tokens", False))
    leads: dict[int, tuple] = {}

    def wrap(h: Hook, where: str, part):
        def call(act):
            new = site_call(h.fn, act, part, leads.get(h.layer) if flat else None)
            if stop_dense:
                fired.add(id(h))
                if len(fired) == len(hooks):
                    raise StopForward
            return new

        if where == "output":
            return lambda mod, args, out: call(out)

        def pre(mod, args):
            new = call(args[0])
            return None if new is None else (new,) + tuple(args[1:])
        return pre

    def lead_of(layer):
        def pre(mod, args, kwargs):
            hs = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hs, torch.Tensor):
                leads[layer] = tuple(hs.shape[:-1])
        return pre

    try:
        if stop_dense:  # a new forward pass starts with no hook fired
            handles.append(adapter.model.register_forward_pre_hook(lambda *_: fired.clear()))
        if flat:
            for layer in sorted({h.layer for h in hooks}):
                handles.append(adapter.blocks[layer].register_forward_pre_hook(
                    lead_of(layer), with_kwargs=True))
        for h in hooks:
            mod, where = adapter.site_module(h.site, h.layer)
            fn = wrap(h, where, adapter.site_part(h.site))
            if where == "output":
                handles.append(mod.register_forward_hook(fn))
            else:
                handles.append(mod.register_forward_pre_hook(fn))
        with contextlib.ExitStack() as stack:
            if moe or stop_layer is not None:
                stack.enter_context(moe_hooks_applied(adapter, moe, stop_layer, StopForward()))
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


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def shallow_view(model: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    """``(view, named modules of the view)``: a new module tree over the *same* parameter and
    buffer tensors (no weight is copied) and without hooks. Libraries that rewrap submodules
    in place (TransformerLens) or patch ``forward`` (nnsight) change the view, never ``model``;
    weight edits show in both."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo)
    named = list(view.named_modules())  # before any rewrapping: the names of ``model``
    for _, mod in named:
        for d in _HOOK_DICTS:
            if hasattr(mod, d):
                setattr(mod, d, OrderedDict())
    return view, named


@contextlib.contextmanager
def _users_hooks_on(model: torch.nn.Module, named: list):
    """For one call, the view's modules also run the torch hooks installed on ``model``'s
    modules of the same name (e.g. :func:`hooks_applied`); the view's own dicts come back
    afterwards, so nothing a library registers during the call is left on either tree."""
    orig = dict(model.named_modules())
    saved = []
    try:
        for name, v in named:
            o = orig.get(name)
            if o is None or not any(getattr(o, d, None) for d in _HOOK_DICTS):
                continue
            saved.append((v, {d: getattr(v, d) for d in _HOOK_DICTS if hasattr(v, d)}))
            for d, own in saved[-1][1].items():
                merged = OrderedDict(getattr(o, d, {}))
                merged.update(own)
                setattr(v, d, merged)
        yield
    finally:
        for v, dicts in saved:
            for d, own in dicts.items():
                setattr(v, d, own)


def _wrapped(model, cache, build):
    """``(wrapper, named)`` for ``model`` from ``cache``, rebuilt when a tensor was replaced."""
    key = tuple(id(t) for t in (*model.parameters(), *model.buffers()))
    hit = cache.get(model)
    if hit is None or hit[0] != key:
        view, named = shallow_view(model)
        hit = (key, build(view), named)
        cache[model] = hit
    return hit[1], hit[2]


def lens_bridge(lm):
    """The TransformerLens ``TransformerBridge`` over a :func:`shallow_view` of ``lm``'s model
    (built once per model, cached weakly; the user's model is never rewrapped)."""
    return _lens(lm)[0]


def _lens(lm):
    model = _adapter(lm).root  # the base model under a PEFT wrapper (LoRA layers included)
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise SiteError("the 'lens' backend needs TransformerLens: "
                        "pip install 'transformer-lens>=3'") from None
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        raise SiteError("the 'lens' backend needs a tokenizer: pass a LoadedModel")
    name = getattr(lm, "name", None) or model.config._name_or_path or "model"
    try:
        return _wrapped(model, _BRIDGES, lambda view: TransformerBridge.boot_transformers(
            name, hf_model=view, tokenizer=tok, device=next(model.parameters()).device,
            dtype=model.dtype))
    except Exception as e:  # noqa: BLE001 - TransformerLens' own errors, reported as a refusal
        raise _lens_refusal(model, f"its bridge does not build ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _lens_refusal(model, why: str) -> SiteError:
    return SiteError(f"the 'lens' backend does not support {model.config.model_type!r}: {why}; "
                     f"use backend='torch' (or 'nnsight')")


def _check_lens(lm, adapter, bridge, named, inputs, sites) -> None:
    """Once per model and site: the bridge's hook must read what skilllens' site reads (layer 0
    and the last, to float tolerance), else the backend refuses the architecture."""
    done = _LENS_OK.setdefault(adapter.model, set())
    todo = sorted(set(sites) - done)
    if not todo:
        return
    layers = sorted({0, adapter.n_layers - 1})
    ours, theirs = {}, {}

    def keep(store, key):
        def fn(act, hook=None):
            store[key] = act.detach().clone()
        return fn

    probe = [Hook(s, l, keep(ours, (s, l))) for s in todo for l in layers]
    with torch.no_grad():
        run_with_hooks(adapter, inputs, probe)
        fwd = [(LENS_HOOKS[s].format(i=l), keep(theirs, (s, l))) for s in todo for l in layers]
        try:
            with _users_hooks_on(adapter.model, named):
                bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=fwd,
                                      attention_mask=inputs.get("attention_mask"))
        except Exception as e:  # noqa: BLE001
            raise _lens_refusal(adapter.model, f"its bridge fails ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key, a in ours.items():
        b = theirs.get(key)
        tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if b is None or b.shape != a.shape or not torch.allclose(
                a, b, rtol=tol, atol=tol * max(1.0, float(a.abs().max()))):
            raise _lens_refusal(adapter.model, f"hook {LENS_HOOKS[key[0]].format(i=key[1])} is "
                                f"not skilllens' site {key[0]!r} at layer {key[1]}")
    done.update(todo)


def _run_lens(lm, adapter, inputs, hooks):
    bridge, named = _lens(lm)
    _check_lens(lm, adapter, bridge, named, inputs, {h.site for h in hooks})
    fwd = []
    for h in hooks:
        name = LENS_HOOKS[h.site].format(i=h.layer)
        fwd.append((name, lambda act, hook, fn=h.fn: fn(act)))
    with _users_hooks_on(adapter.root, named):
        return bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=fwd,
                                     attention_mask=inputs.get("attention_mask"))


def _nnsight_model(model):
    try:
        from nnsight import NNsight
    except ImportError:
        raise SiteError("the 'nnsight' backend needs nnsight: pip install nnsight") from None
    return _wrapped(model, _NNSIGHT, NNsight)


def _envoy(nm, path: str):
    obj = nm
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _run_nnsight(adapter, inputs, hooks, forward_kwargs):
    nm, named = _nnsight_model(adapter.model)
    lead = tuple(inputs["input_ids"].shape) if adapter.arch.flat_tokens else None
    with _users_hooks_on(adapter.model, named), nm.trace(**inputs, **forward_kwargs):
        for h in hooks:
            path, where = adapter.site_module_path(h.site, h.layer)
            envoy = _envoy(nm, path)
            act = envoy.output if where == "output" else envoy.input
            new = site_call(h.fn, act, adapter.site_part(h.site), lead)
            if new is not None:
                if where == "output":
                    envoy.output = new
                else:
                    envoy.input = new
        out = nm.output.save()
    return out
