"""Neuron views of mixture-of-experts layers (used by :mod:`skilllens.core.neuron_view`).

A neuron of a MoE layer is addressed, as everywhere else in skilllens (``collect``, the
methods, ``meta["experts"]``), by its flat index ``j`` over the layer's experts: ``j`` is neuron
``i = j - offsets[e]`` of expert ``e`` (routed experts ``0..E-1``, then shared experts; see
:mod:`skilllens.core.moe`). It is read through an
:class:`~skilllens.core.moe_hooks.ExpertHook`: expert ``e``'s ``gate``/``up``/``key`` on the
tokens routed to ``e``. The other tokens never reach that neuron (it has no activation there,
not a zero one), so the view of an expert neuron counts, histograms and ranks only its routed
tokens (a shared expert sees every token).
"""
from __future__ import annotations

import torch

from skilllens.core.moe import ACTIVATION_SITES, split_index
from skilllens.core.moe_hooks import ExpertHook
from skilllens.errors import SiteError


def moe_info(adapter, layer: int):
    """The :class:`~skilllens.core.moe.MoeLayer` of ``layer``, ``None`` for a dense layer."""
    infos = getattr(adapter, "layers_info", None)
    return None if infos is None else infos[layer]


def _check_site(adapter, site: str) -> None:
    adapter.arch.site(site)  # unknown, or absent on this architecture: SiteError
    if site not in ACTIVATION_SITES:
        raise SiteError(f"neuron views read FFN neurons at the {', '.join(ACTIVATION_SITES)} "
                        f"sites, not {site!r}")


def locate(adapter, site: str, layer: int, neuron: int) -> tuple[int, int, int | None, int]:
    """Check a neuron address; ``(layer, neuron, expert, local)`` with ``layer`` normalised
    (negative counts from the end). ``expert`` is ``None`` on a dense layer (``local ==
    neuron``); on a MoE layer ``neuron`` is flat and ``local = neuron - offsets[expert]``.

    Raises ``SiteError`` for an unknown site, a site a MoE layer does not have per expert
    (``router``/``routing``/``value``), or an index outside ``0..width-1`` where ``width`` is the
    layer's own width (``adapter.d_ff_at(layer)``; the flattened expert width on a MoE layer)."""
    _check_site(adapter, site)
    layer = adapter.check_layers([layer])[0]
    j = int(neuron)
    info = moe_info(adapter, layer)
    if info is None:
        width = adapter.d_ff_at(layer)
        if not 0 <= j < width:
            raise SiteError(f"neuron {neuron} is out of range: {site} at layer {layer} has "
                            f"{width} neurons (0..{width - 1})")
        return layer, j, None, j
    if not 0 <= j < info.width:
        raise SiteError(
            f"neuron {neuron} is out of range: {site} at mixture-of-experts layer {layer} has "
            f"{info.width} neurons (0..{info.width - 1}), flattened over {len(info.widths)} "
            f"experts of widths {info.widths}: neuron i of expert e is offsets[e] + i with "
            f"offsets {info.offsets}")
    (e, (_, local)), = split_index(info.widths, [j]).items()
    return layer, j, e, int(local[0])


def key_width(adapter, key: tuple) -> int:
    """Width of a :func:`~skilllens.core.neuron_view.neuron_pass` key: ``(site, layer)`` of a
    dense layer or ``(site, layer, expert)`` of a MoE layer. Raises ``SiteError``."""
    site, layer = key[0], adapter.check_layers([key[1]])[0]
    _check_site(adapter, site)
    info = moe_info(adapter, layer)
    if len(key) == 2:
        if info is not None:
            raise SiteError(f"layer {layer} is a mixture-of-experts layer: pass "
                            f"({site!r}, {layer}, expert) keys to neuron_pass (experts "
                            f"0..{len(info.widths) - 1}), or flat neuron indices to "
                            f"neuron_views / show_neuron")
        return adapter.d_ff_at(layer)
    if info is None:
        raise SiteError(f"layer {layer} is a dense layer: it has no experts; pass "
                        f"({site!r}, {layer})")
    e = int(key[2])
    if not 0 <= e < len(info.widths):
        raise SiteError(f"layer {layer} has experts 0..{len(info.widths) - 1}, not {e}")
    return info.widths[e]


def expert_hook(key: tuple, top, stats, cur: dict) -> ExpertHook:
    """An :class:`ExpertHook` feeding ``top`` (:class:`~skilllens.stats.topk.TopK`) and
    ``stats`` (``NeuronStats``) with expert ``key[2]``'s activations ``[n_routed, f_e]``.

    ``cur["mask"]`` is the running batch's token mask ``[B, T]`` and ``cur["items"]`` its item
    indices ``[B]``. A token counts when it is selected by the mask AND routed to the expert;
    the top-k positions are the tokens' own ``(item, position)`` (the expert's rows are
    scattered back to ``[B, T]`` through ``ExpertCall.token_index``, flat ``b * T + t``)."""
    site, layer, expert = key

    def fn(act, call):
        mask = cur["mask"].to(act.device)
        B, T = mask.shape
        idx = call.token_index.to(act.device)
        sel = mask.reshape(-1)[idx]
        stats.update(act, sel)
        routed = torch.zeros(B * T, dtype=torch.bool, device=act.device)
        routed[idx] = sel
        full = act.new_zeros(B * T, act.shape[-1])
        full[idx] = act
        top.update(full.view(B, T, -1), routed.view(B, T), cur["items"])

    return ExpertHook(site, layer, expert, fn, with_call=True)


def expert_note(adapter, layer: int, expert: int, local: int) -> str:
    """The line a view of an expert neuron carries: which expert and which tokens it saw."""
    info = moe_info(adapter, layer)
    if expert >= info.n_experts:
        return (f"shared expert {expert - info.n_experts} (expert {expert}), neuron {local}: "
                f"every token (shared experts are not routed)")
    return (f"expert {expert}, neuron {local}: routed tokens only (counts, histogram, top "
            f"contexts and mean/std over the tokens the router sent to expert {expert})")


def expert_value_vector(adapter, layer: int, expert: int, local: int) -> torch.Tensor:
    """Value vector ``[d_model]`` of neuron ``local`` of ``expert``: its column of the expert's
    down projection (``MoeAdapter.expert_value_vectors``), a view, not a copy."""
    return adapter.expert_value_vectors(layer, expert)[local]
