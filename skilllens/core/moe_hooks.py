"""Read and edit per-expert sites and routers of mixture-of-experts models.

Routed experts are hooked through transformers' own experts interface: this module registers
the implementation ``"skilllens"`` in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``
(``fn(self, hidden_states, top_k_index, top_k_weights)``) and, while hooks are installed, sets
the experts' ``config._experts_implementation`` to it (restored on exit). Experts modules
without hooks fall through to the implementation selected before. Llama-4's dense-bmm experts
(not on the interface) get the same per-expert loop as an instance ``forward`` for the block.
Shared experts and routers are plain torch forward hooks.

>>> import torch, skilllens
>>> from skilllens.core.hooks import run_with_hooks
>>> from skilllens.core.moe_hooks import ExpertHook
>>> lm = skilllens.load_model("tiny-mixtral")
>>> seen = []
>>> _ = run_with_hooks(lm, {"input_ids": torch.tensor([[1, 2, 3]])},
...                    [ExpertHook("key", 0, e, lambda a: seen.append(a.shape[0]))
...                     for e in range(4)])
>>> sum(seen)  # 3 tokens, each routed to top_k = 2 experts
6
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from skilllens.core.moe import ACTIVATION_SITES, MoeLayer
from skilllens.errors import SiteError

IMPLEMENTATION = "skilllens"
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # experts -> [hook dicts]
_PREVIOUS: dict[int, list] = {}   # id(config) -> [previous implementation, refcount, config]


@dataclass
class ExpertCall:
    """Context of one expert call: ``token_index [n]`` flat indices into ``batch*seq`` of the
    tokens routed to ``expert``, their routing ``weight [n]`` (1 for shared experts; for
    Llama-4 the weight scaled the expert's input)."""

    layer: int
    expert: int
    token_index: torch.Tensor
    weight: torch.Tensor


@dataclass
class ExpertHook:
    """Read (``fn`` returns None) or edit ``site`` (gate/up/key) of ``expert`` at ``layer``:
    ``fn(act [n_e, f_e])`` or, with ``with_call=True``, ``fn(act, ExpertCall)``."""

    site: str
    layer: int
    expert: int
    fn: Callable
    with_call: bool = False

    def __call__(self, act, call: ExpertCall):
        return self.fn(act, call) if self.with_call else self.fn(act)


@dataclass
class Routing:
    """A router's decision over ``N`` flat tokens: ``logits [N, E]``, ``index [N, k]``,
    ``weights [N, k]``; ``bias [E]``, ``n_group``, ``topk_group``: how a DeepSeek-V3-style router
    (GLM-4.5 MoE too) ranks experts when that is not by its logits (:meth:`ranking`)."""

    logits: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor | None = None
    n_group: int = 1
    topk_group: int = 1

    def ranking(self, banned: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, E]`` float32 scores the router chooses by (higher first), ``-inf`` for experts
        it cannot choose. Without ``bias``: the logits. With it (DeepSeek-V3 report, Sec.
        2.1.2): ``sigmoid(logits) + bias``; with ``n_group > 1`` groups of ``E / n_group``
        experts only the ``topk_group`` groups of largest top-2 sum are eligible. ``banned``
        (bool ``[E]``): experts taken out before the groups are ranked (deactivated experts)."""
        lg = self.logits.float().reshape(self.index.shape[0], -1)
        s = lg if self.bias is None else lg.sigmoid() + self.bias.float().to(lg.device)
        if banned is not None:
            s = s.masked_fill(banned.to(s.device)[None], float("-inf"))
        if self.bias is not None and 1 < self.n_group and self.topk_group < self.n_group:
            g = s.view(s.shape[0], self.n_group, -1)
            top = g.topk(min(2, g.shape[-1]), dim=-1).values
            top = top.masked_fill(top == float("-inf"), 0.0).sum(-1)           # [N, G]
            ok = torch.zeros_like(top, dtype=torch.bool).scatter_(
                1, top.topk(self.topk_group, dim=-1).indices, True)
            s = g.masked_fill(~ok[..., None], float("-inf")).view_as(s)
        return s

    def dense(self, n_experts: int) -> torch.Tensor:
        """``[N, E]`` routing weights, zero where an expert was not chosen."""
        out = torch.zeros(self.index.shape[0], n_experts, dtype=self.weights.dtype,
                          device=self.weights.device)
        ok = self.index < n_experts
        return out.scatter_add_(1, self.index.clamp(max=n_experts - 1), self.weights * ok)


def router_ranking(router) -> dict:
    """``Routing`` fields that say how ``router`` ranks experts: its
    ``e_score_correction_bias`` and expert groups (DeepSeek-V3, GLM-4.5 MoE), else nothing."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        return {}
    groups = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
    return {"bias": bias.detach(), "n_group": groups,
            "topk_group": int(getattr(router, "topk_group", None) or groups)}

    def dense(self, n_experts: int) -> torch.Tensor:
        """``[N, E]`` routing weights, zero where an expert was not chosen."""
        out = torch.zeros(self.index.shape[0], n_experts, dtype=self.weights.dtype,
                          device=self.weights.device)
        ok = self.index < n_experts
        return out.scatter_add_(1, self.index.clamp(max=n_experts - 1), self.weights * ok)


@dataclass
class RouterHook:
    """Read or edit the routing of ``layer``: ``fn(Routing) -> None | Routing`` (a returned
    ``Routing``'s ``index``/``weights`` replace the top-k choices)."""

    layer: int
    fn: Callable
    site: str = "router"


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, skilllens_experts_forward)


def _fallback(experts):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    prev = _PREVIOUS.get(id(experts.config), [None])[0]
    eager = type(experts).forward.__wrapped__
    if prev in (None, "eager", IMPLEMENTATION):
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(prev, eager)


def _project(x, w, bias, transposed: bool):
    y = x @ w if transposed else F.linear(x, w)
    return y if bias is None else y + bias


def _run(hooks: dict, site: str, e: int, act, call):
    for h in hooks.get((site, e), ()):
        new = h(act, call)
        if new is not None:
            act = new
    return act


def _expert(self, hooks, e, x, call, llama4=False):
    """One expert's FFN on its tokens ``x [n, d]`` with hook points; returns ``[n, d]``."""
    has_gate = True if llama4 else self.has_gate
    transposed = True if llama4 else self.is_transposed
    bias = (lambda name: getattr(self, name)[e]) if (not llama4 and self.has_bias) \
        else (lambda name: None)
    if has_gate:
        h = _project(x, self.gate_up_proj[e], bias("gate_up_proj_bias"), transposed)
        if ("gate", e) in hooks or ("up", e) in hooks:
            inter = not llama4 and not self.is_concatenated
            gate, up = (h[..., ::2], h[..., 1::2]) if inter else h.chunk(2, dim=-1)
            gate = _run(hooks, "gate", e, gate, call)
            up = _run(hooks, "up", e, up, call)
            h = torch.stack((gate, up), -1).flatten(-2) if inter else torch.cat((gate, up), -1)
        if llama4:
            gate, up = h.chunk(2, dim=-1)
            key = up * self.act_fn(gate)
        else:
            key = self._apply_gate(h)
    else:
        h = _run(hooks, "gate", e, _project(x, self.up_proj[e], bias("up_proj_bias"), transposed),
                 call)
        key = self.act_fn(h)
    key = _run(hooks, "key", e, key, call)
    out = _project(key, self.down_proj[e], bias("down_proj_bias"), transposed)
    if not llama4 and self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    return out


def skilllens_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``"skilllens"`` experts implementation: a per-expert loop with hook points (for
    experts modules that have hooks; any other falls through to the previous implementation)."""
    stack = _ACTIVE.get(self)
    if not stack:
        return _fallback(self)(self, hidden_states, top_k_index, top_k_weights)
    hooks, layer = stack[-1]
    out = torch.zeros_like(hidden_states)
    n_experts = self.num_experts
    for e in torch.unique(top_k_index).tolist():
        if e >= n_experts:  # expert-parallel sentinel
            continue
        token, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        w = top_k_weights[token, slot]
        y = _expert(self, hooks, e, hidden_states[token], ExpertCall(layer, e, token, w))
        out.index_add_(0, token, (y * w.unsqueeze(-1)).to(out.dtype))
    return out


def _llama4_forward(self, hidden_states):
    """Llama-4 experts (all experts on all tokens, input pre-scaled by the routing weights):
    the same per-expert loop on the routed rows; other rows stay 0, as in the original."""
    hooks, layer = _ACTIVE[self][-1]
    routing = self._skilllens_routing
    e_count = self.gate_up_proj.shape[0]
    x = hidden_states.view(e_count, -1, hidden_states.shape[-1])
    out = torch.zeros_like(x)
    for e in torch.unique(routing.index).tolist():
        token = torch.nonzero((routing.index == e).any(-1)).flatten()
        w = routing.dense(e_count)[token, e]
        out[e, token] = _expert(self, hooks, e, x[e, token], ExpertCall(layer, e, token, w),
                                llama4=True).to(out.dtype)
    return out.view(-1, hidden_states.shape[-1])


def _router_hook(info: MoeLayer, fns: list, stash_on=None):
    llama4 = info.dense_bmm
    k = int(getattr(info.router, "top_k", 0) or 0)

    def hook(mod, args, output):
        if llama4:
            scores, logits = output
            index = torch.topk(logits, k, dim=1).indices
            r = Routing(logits, index, scores.gather(1, index))
        else:
            logits, weights, index = output[0], output[1], output[2]
            flat = logits.reshape(-1, logits.shape[-1])
            r = Routing(flat, index, weights, **router_ranking(info.router))
        changed = False
        for fn in fns:
            new = fn(r)
            if new is not None:
                r = replace(r, index=new.index, weights=new.weights.to(r.weights.dtype))
                changed = True
        if stash_on is not None:
            stash_on._skilllens_routing = r
        if not changed:
            return None
        if llama4:
            return (r.dense(logits.shape[-1]).to(scores.dtype), logits)
        return (output[0], r.weights, r.index) + tuple(output[3:])
    return hook


def _shared_hooks(info: MoeLayer, layer: int, hooks: dict, handles: list):
    for s, mlp in enumerate(info.shared):
        e = info.n_experts + s
        for site, (name, where) in {"gate": ("gate_proj", "output"), "up": ("up_proj", "output"),
                                    "key": ("down_proj", "input")}.items():
            if (site, e) not in hooks:
                continue

            def call(act, site=site, e=e):
                flat = act.reshape(-1, act.shape[-1])
                n = torch.arange(flat.shape[0], device=flat.device)
                c = ExpertCall(layer, e, n, torch.ones(flat.shape[0], device=flat.device))
                new = _run(hooks, site, e, flat, c)
                return None if new is flat else new.reshape(act.shape)

            mod = getattr(mlp, name)
            if where == "output":
                handles.append(mod.register_forward_hook(lambda m, a, o, c=call: c(o)))
            else:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, c=call: None if (n := c(a[0])) is None else (n,) + a[1:]))


class _Stop(Exception):
    pass


@contextlib.contextmanager
def moe_hooks_applied(adapter, hooks: list, stop_layer: int | None = None, stop_exc=None):
    """Install :class:`ExpertHook`/:class:`RouterHook` objects on ``adapter``'s model for the
    block. ``stop_layer``: raise ``stop_exc`` after that layer's MoE block ran."""
    _register()
    by_layer: dict[int, dict] = {}
    routers: dict[int, list] = {}
    for h in hooks:
        layer = adapter.check_layers([h.layer])[0]
        info = adapter.layers_info[layer]
        if info is None:
            raise SiteError(f"layer {layer} is not a mixture-of-experts layer")
        if isinstance(h, RouterHook):
            routers.setdefault(layer, []).append(h.fn)
            continue
        if h.site not in ACTIVATION_SITES:
            raise SiteError(f"unknown expert site {h.site!r}; use gate, up or key")
        if not 0 <= h.expert < len(info.widths):
            raise SiteError(f"layer {layer} has experts 0..{len(info.widths) - 1}, not {h.expert}")
        if h.site == "up" and h.expert >= info.n_experts and not hasattr(
                info.shared[h.expert - info.n_experts], "up_proj"):
            raise SiteError("this shared expert has no 'up' site")
        if h.site == "up" and h.expert < info.n_experts and not info.dense_bmm \
                and not info.experts.has_gate:
            raise SiteError(f"the experts of layer {layer} are not gated: no 'up' site")
        by_layer.setdefault(layer, {}).setdefault((h.site, h.expert), []).append(h)
    handles, switched, pushed = [], [], []
    try:
        for layer in sorted(set(by_layer) | set(routers) | ({stop_layer} - {None})):
            info = adapter.layers_info[layer]
            hk = by_layer.get(layer, {})
            routed = {k: v for k, v in hk.items() if k[1] < info.n_experts}
            needs_stash = info.dense_bmm and routed
            if routers.get(layer) or needs_stash:
                handles.append(info.router.register_forward_hook(_router_hook(
                    info, routers.get(layer, []), info.experts if needs_stash else None)))
            if routed:
                _ACTIVE.setdefault(info.experts, []).append((routed, layer))
                pushed.append(info.experts)
                if info.dense_bmm:
                    info.experts.forward = _llama4_forward.__get__(info.experts)
                else:
                    cfg = info.experts.config
                    entry = _PREVIOUS.setdefault(id(cfg), [cfg._experts_implementation, 0, cfg])
                    entry[1] += 1
                    cfg._experts_implementation_internal = IMPLEMENTATION
                    switched.append(cfg)
            _shared_hooks(info, layer, hk, handles)
            if layer == stop_layer and stop_exc is not None:
                def stop(m, a, o):
                    raise stop_exc
                handles.append(info.block.register_forward_hook(stop))
        yield adapter
    finally:
        for h in handles:
            h.remove()
        for experts in pushed:
            _ACTIVE[experts].pop()
            if not _ACTIVE[experts]:
                del _ACTIVE[experts]
                if "forward" in vars(experts):
                    del experts.forward
                vars(experts).pop("_skilllens_routing", None)
        for cfg in switched:
            entry = _PREVIOUS[id(cfg)]
            entry[1] -= 1
            if entry[1] == 0:
                cfg._experts_implementation_internal = entry[0]
                del _PREVIOUS[id(cfg)]
