"""Collection at mixture-of-experts sites: per-expert statistics, router statistics, vectors.

Used by :func:`skilllens.core.collect.collect` for the keys ``(site, layer)`` of MoE layers:
``gate``/``up``/``key`` give :class:`~skilllens.stats.experts.ExpertStats` (each expert updated
with the selected tokens routed to it), ``router`` the statistics of the ``E`` logits and
``routing`` those of the dense routing weights (``mean``: mean weight; ``frac_pos``: share of
tokens routed to the expert). Stored vectors of expert sites are the flattened activations with
zeros for experts a token was not routed to.
"""
from __future__ import annotations

import torch

from skilllens.core.moe import ROUTER_SITES
from skilllens.core.moe_hooks import ExpertHook, RouterHook
from skilllens.errors import SiteError
from skilllens.stats.experts import ExpertStats
from skilllens.stats.neuron_stats import NeuronStats


def is_moe_key(adapter, key) -> bool:
    layers = getattr(adapter, "layers_info", None)
    if layers is None:
        if key[0] in ROUTER_SITES:
            raise SiteError(f"site {key[0]!r} exists on mixture-of-experts models only")
        return False
    if layers[key[1]] is None:
        if key[0] in ROUTER_SITES:
            raise SiteError(f"layer {key[1]} is a dense layer: it has no {key[0]!r} site")
        return False
    return True


def moe_plan(adapter, keys, stats_args: dict, current: dict, store_keys: set):
    """``(statistics per key, hooks, finish)`` for MoE ``keys``; ``current["mask"]`` is the
    token mask ``[B, T]`` of the running batch; ``finish(mask)`` returns the stored rows of
    this batch per key (after the forward pass)."""
    collected, hooks, store = {}, [], {}

    def flat_mask(act):
        m = current["mask"].reshape(-1)
        return m if m.device == act.device else m.to(act.device)

    for site, layer in keys:
        info = adapter.layers_info[layer]
        key = (site, layer)
        if site in ROUTER_SITES:
            st = collected[key] = NeuronStats(info.n_experts, **stats_args)

            def read(r, st=st, site=site, key=key, n=info.n_experts):
                x = r.logits if site == "router" else r.dense(n)
                x = x.reshape(-1, n)
                st.update(x, flat_mask(x))
                if key in store_keys:
                    store[key] = x.detach().to(torch.float32)
            hooks.append(RouterHook(layer, read))
            continue
        st = collected[key] = ExpertStats(info.widths, **stats_args)
        offsets = st.offsets
        for e, w in enumerate(info.widths):
            def fn(act, call, st=st, e=e, key=key, lo=offsets[e], w=w):
                mask = flat_mask(act)[call.token_index.to(act.device)]
                st.update_expert(e, act, mask)
                if key in store_keys:
                    n = current["mask"].numel()
                    buf = store.setdefault(key, torch.zeros(n, st.d, device=act.device))
                    buf[call.token_index.to(buf.device), lo:lo + w] = act.detach().float()
            hooks.append(ExpertHook(site, layer, e, fn, with_call=True))

    mine = store_keys & set(collected)  # the caller adds its dense keys to ``collected`` later

    def finish(mask):
        m = mask.reshape(-1)
        out = {}
        for key in mine:
            buf = store.pop(key, None)
            d = collected[key].d
            out[key] = (buf[m.to(buf.device)] if buf is not None
                        else torch.zeros(int(m.sum()), d))
        return out

    return collected, hooks, finish


def neuron_hooks(adapter, site: str, layer: int, index: torch.Tensor, make) -> list:
    """Hooks that edit the flat neurons ``index`` of ``layer``: one ``Hook`` on a dense layer,
    one :class:`ExpertHook` per expert holding selected neurons on a MoE layer.

    ``make(positions, local_index) -> fn(act)``: ``positions`` are the entries of ``index``
    that fall into this expert (``None`` on a dense layer: all of them) and ``local_index``
    their neuron indices inside the expert."""
    from skilllens.core.hooks import Hook
    from skilllens.core.moe import split_index

    info = getattr(adapter, "layers_info", [None] * (layer + 1))[layer]
    if info is None:
        return [Hook(site, layer, make(None, index))]
    dev = index.device
    return [ExpertHook(site, layer, e, make(pos.to(dev), local.to(dev)))
            for e, (pos, local) in split_index(info.widths, index).items()]


def unseen(forget_stats, retain_stats, site: str, need_retain: bool = True) -> torch.Tensor:
    """``[n_layers, d]`` True for neurons without a forget (or, with ``need_retain``, a
    retain) token: experts the data never routed to; their scores must not be ranked."""
    out = forget_stats.stacked(site, "count") <= 0
    if need_retain:
        out |= retain_stats.stacked(site, "count") <= 0
    return out
