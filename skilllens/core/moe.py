"""Mixture-of-experts models: find the experts, routers and shared experts of every layer.

A block is a MoE layer when its MLP module (``mlp``, ``block_sparse_moe`` or ``feed_forward``)
has an ``experts`` child with 3-D ``down_proj`` (transformers 5 fused experts) and a router child
(``gate`` or ``router``). Discovery is structural: every family built on
``transformers.integrations.moe.use_experts_implementation`` (Mixtral, Qwen2/3-MoE, Qwen3-Next,
OLMoE, DeepSeek-V3, gpt-oss, GLM-4.5, GraniteMoE, PhiMoE) and Llama-4's text experts are found
without a registry entry. See ARCHITECTURE.md, "Mixture-of-experts models".

Neurons of a MoE layer are flattened: ``j = offsets[e] + i`` is neuron ``i`` of expert ``e``
(routed experts ``0..E-1`` first, then shared experts ``E..E+S-1``).

>>> import skilllens
>>> lm = skilllens.load_model("tiny-mixtral")
>>> info = lm.adapter.moe_layer(0)
>>> info.n_experts, info.widths
(4, [32, 32, 32, 32])
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from skilllens.core.architectures import (ACTIVATION_SITES, Architecture, ModelAdapter,
                                          site_root)
from skilllens.errors import SiteError, UnknownArchitectureError

MOE_BLOCKS = ("mlp", "block_sparse_moe", "feed_forward")
ROUTERS = ("gate", "router")
SHARED = ("shared_expert", "shared_experts")
ROUTER_SITES = ("router", "routing")
MOE_SITES = ACTIVATION_SITES + ROUTER_SITES
#: the dense MLP of a non-MoE layer in a MoE model (all eleven families use these names)
DENSE = dict(gate=("gate_proj", "output"), up=("up_proj", "output"), key=("down_proj", "input"))


@dataclass
class MoeLayer:
    """One MoE layer: ``experts`` (fused 3-D parameters), ``router``, shared expert MLPs."""

    block: nn.Module
    experts: nn.Module
    router: nn.Module
    shared: list[nn.Module] = field(default_factory=list)
    path: str = ""

    @property
    def n_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def n_shared(self) -> int:
        return len(self.shared)

    @property
    def dense_bmm(self) -> bool:
        """Llama-4 style: every expert runs on all tokens, routing weights scale the input."""
        return not hasattr(self.experts, "has_gate")

    @property
    def transposed(self) -> bool:
        return True if self.dense_bmm else bool(self.experts.is_transposed)

    @property
    def expert_width(self) -> int:
        d = self.experts.down_proj
        return int(d.shape[1] if self.transposed else d.shape[2])

    @property
    def widths(self) -> list[int]:
        return [self.expert_width] * self.n_experts + [
            int(m.down_proj.weight.shape[1]) for m in self.shared]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for w in self.widths:
            out.append(acc)
            acc += w
        return out

    @property
    def width(self) -> int:
        return sum(self.widths)

    def expert_value_vectors(self, expert: int) -> torch.Tensor:
        """Value vectors of one expert, ``[f_e, d_model]`` (a view of ``down_proj``)."""
        if expert >= self.n_experts:
            return self.shared[expert - self.n_experts].down_proj.weight.t()
        w = self.experts.down_proj[expert]
        return w if self.transposed else w.t()

    def describe(self) -> dict:
        return {"n_experts": self.n_experts, "n_shared": self.n_shared, "widths": self.widths,
                "top_k": int(getattr(self.router, "top_k", 0) or 0)}


def find_moe_layer(block: nn.Module, path: str = "") -> MoeLayer | None:
    """The :class:`MoeLayer` of a decoder block, or ``None`` for a dense block."""
    for name in MOE_BLOCKS:
        mod = getattr(block, name, None)
        experts = getattr(mod, "experts", None) if mod is not None else None
        down = getattr(experts, "down_proj", None)
        if not isinstance(down, torch.Tensor) or down.ndim != 3:
            continue
        router = next((getattr(mod, r) for r in ROUTERS if isinstance(getattr(mod, r, None),
                                                                       nn.Module)), None)
        if router is None:
            raise UnknownArchitectureError(f"{type(mod).__name__} has experts but no router "
                                           f"child named {' or '.join(ROUTERS)}")
        shared = [getattr(mod, s) for s in SHARED if isinstance(getattr(mod, s, None), nn.Module)]
        _check_layout(experts, shared)
        return MoeLayer(mod, experts, router, shared, f"{path}.{name}" if path else name)
    return None


def _check_layout(experts: nn.Module, shared: list) -> None:
    """Experts this module can run per expert: on transformers' experts interface
    (``use_experts_implementation``) or Llama-4's dense-bmm experts; shared experts are MLPs
    with ``gate_proj``/``up_proj``/``down_proj`` linears. Anything else is refused."""
    name = type(experts).__name__
    if not hasattr(experts, "has_gate") and not name.startswith("Llama4"):
        raise UnknownArchitectureError(
            f"{name} runs its experts outside transformers' experts interface "
            f"(use_experts_implementation); per-expert sites are not supported for it")
    fused = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    if not isinstance(getattr(experts, fused, None), torch.Tensor):
        raise UnknownArchitectureError(f"{name} has no 3-D {fused}; not a fused experts module")
    for mlp in shared:
        if not all(isinstance(getattr(mlp, n, None), nn.Linear)
                   for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnknownArchitectureError(
                f"shared expert {type(mlp).__name__} is not a gate_proj/up_proj/down_proj MLP; "
                f"per-expert sites are not supported for it")


def is_moe(model: nn.Module) -> bool:
    """True when some block of ``model`` is a mixture-of-experts layer."""
    return any(find_moe_layer(m) is not None for m in model.modules()
               if any(hasattr(m, n) for n in MOE_BLOCKS))


class MoeArchitecture(Architecture):
    """An :class:`Architecture` whose sites also include the router sites."""

    def site(self, name: str) -> tuple[str, str]:
        if name in ROUTER_SITES:
            return ("", name)
        if name in ACTIVATION_SITES:
            return ("mlp." + DENSE[name][0], DENSE[name][1])
        return super().site(name)

    @property
    def sites(self) -> tuple[str, ...]:
        return MOE_SITES + ("value",)


def moe_architecture(model_type: str) -> MoeArchitecture:
    return MoeArchitecture(name=f"moe:{model_type}", model_types=(model_type,),
                           layers=("model.layers", "layers", "model.language_model.layers",
                                   "language_model.model.layers"),
                           gate=DENSE["gate"], up=DENSE["up"], key=DENSE["key"],
                           value="down_proj", gated=True,
                           final_norm=("model.norm", "norm", "model.language_model.norm",
                                       "language_model.model.norm"))


class MoeAdapter(ModelAdapter):
    """:class:`ModelAdapter` for a mixture-of-experts model (dense layers included)."""

    def __init__(self, model: nn.Module, arch: Architecture | None = None):
        self.model = model
        self.root, self.root_path = site_root(model)  # the base model under a PEFT wrapper
        self.arch = arch or moe_architecture(getattr(self.root.config, "model_type", "moe"))
        self._bind_blocks()
        self.layers_info = [find_moe_layer(b, f"{self.layers_path}.{i}")
                            for i, b in enumerate(self.blocks)]
        self.d_model = int(model.get_input_embeddings().weight.shape[1])
        #: flattened width of every layer (routed + shared experts; dense layers: their d_ff)
        self.d_ffs = [self.width(i) for i in range(self.n_layers)]
        self.d_ff = self.d_ffs[0]
        self._norm_checked = False

    def moe_layer(self, layer: int) -> MoeLayer | None:
        """The layer's :class:`MoeLayer` (``None`` for a dense layer)."""
        return self.layers_info[self.check_layers([layer])[0]]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, info in enumerate(self.layers_info) if info is not None]

    def _dense_mlp(self, layer: int) -> nn.Module:
        for name in MOE_BLOCKS:
            mod = getattr(self.blocks[layer], name, None)
            if mod is not None and hasattr(mod, "down_proj"):
                return mod
        raise UnknownArchitectureError(f"layer {layer}: no dense MLP with down_proj found")

    def width(self, layer: int) -> int:
        """Number of (flattened) neurons at ``layer``."""
        info = self.moe_layer(layer)
        if info is not None:
            return info.width
        return int(self._dense_mlp(layer).down_proj.weight.shape[1])

    def site_module(self, site: str, layer: int) -> tuple[nn.Module, str]:
        layer = self.check_layers([layer])[0]
        if self.layers_info[layer] is not None:
            raise SiteError(f"layer {layer} is a mixture-of-experts layer: its {site!r} site is "
                            f"per expert; use skilllens.core.moe_hooks.ExpertHook(site, layer, "
                            f"expert, fn) or RouterHook(layer, fn)")
        if site in ROUTER_SITES:
            raise SiteError(f"layer {layer} is dense: it has no {site!r} site")
        path, where = DENSE[site]
        return getattr(self._dense_mlp(layer), path), where

    def site_device(self, site: str, layer: int) -> torch.device:
        block = self.blocks[self.check_layers([layer])[0]]
        p = next(block.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def site_module_path(self, site: str, layer: int) -> tuple[str, str]:
        raise SiteError("MoE models support only the 'torch' hook backend (the 'lens' and "
                        "'nnsight' backends see a MoE block's input and output only)")

    def value_weight(self, layer: int) -> torch.Tensor:
        if self.moe_layer(layer) is not None:
            raise SiteError(f"layer {layer} is a mixture-of-experts layer: use "
                            f"expert_value_vectors(layer, expert) or value_vectors(layer)")
        return self._dense_mlp(layer).down_proj.weight

    def value_vectors(self, layer: int) -> torch.Tensor:
        """``[width, d_model]``: a view for dense layers, a (read-only) copy of the flattened
        expert value vectors for MoE layers (edit experts through expert_value_vectors)."""
        info = self.moe_layer(layer)
        if info is None:
            return self.value_weight(layer).t()
        return torch.cat([info.expert_value_vectors(e) for e in range(len(info.widths))])

    def expert_value_vectors(self, layer: int, expert: int) -> torch.Tensor:
        info = self.moe_layer(layer)
        if info is None or not 0 <= expert < len(info.widths):
            raise SiteError(f"layer {layer} has no expert {expert}")
        return info.expert_value_vectors(expert)

    def describe(self) -> dict:
        out = {"architecture": self.arch.name, "model_type": self.model.config.model_type,
               "layers": self.n_layers, "d_model": self.d_model, "d_ff": self.d_ff,
               "sites": list(self.sites)}
        out["experts"] = {str(i): info.describe() for i, info in enumerate(self.layers_info)
                          if info is not None}
        return out


def adapter_for(model: nn.Module, arch: Architecture | None = None) -> ModelAdapter:
    """:class:`MoeAdapter` for mixture-of-experts models, :class:`ModelAdapter` otherwise."""
    if arch is None or isinstance(arch, MoeArchitecture):
        if isinstance(arch, MoeArchitecture) or is_moe(model):
            return MoeAdapter(model, arch)
    return ModelAdapter(model, arch)


def split_index(widths: list[int],
                index: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Flat neuron indices of one layer -> ``{expert: (positions in index, local indices)}``."""
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    bounds = torch.tensor([0] + list(torch.tensor(widths).cumsum(0).tolist()))
    expert = torch.bucketize(index, bounds[1:], right=True)
    out = {}
    for e in expert.unique().tolist():
        pos = torch.nonzero(expert == e).flatten()
        out[int(e)] = (pos, index[pos] - int(bounds[e]))
    return out


def layer_experts_meta(adapter, layers) -> dict:
    """``{str(layer): MoeLayer.describe()}`` for the MoE layers among ``layers``."""
    if not isinstance(adapter, MoeAdapter):
        return {}
    return {str(l): adapter.layers_info[l].describe() for l in layers
            if adapter.layers_info[l] is not None}
