"""FFN site mappings per architecture: one small declarative entry each.

A *site* is one of ``gate`` (FFN pre-activation, ``[.., d_ff]``), ``up`` (the linear branch of a
gated FFN), ``key`` (the neuron coefficients fed to the down projection) and ``value`` (column j
of the down projection, a parameter of shape ``[d_model]``). See ``shared/METHODS.md``.

Register a new architecture with :func:`register_architecture`::

    register_architecture(Architecture(
        name="my-arch", model_types=("my_arch",), layers=("model.layers",),
        gate=("mlp.fc1", "output"), key=("mlp.fc2", "input"), value="mlp.fc2",
        d_ff_attr="intermediate_size"))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from skilllens.errors import SiteError, UnknownArchitectureError

ACTIVATION_SITES = ("gate", "up", "key")
SITES = ACTIVATION_SITES + ("value",)
#: TransformerLens ``TransformerBridge`` hook names (checked on SmolLM2 and GPT-2).
LENS_HOOKS = {"gate": "blocks.{i}.mlp.hook_pre", "up": "blocks.{i}.mlp.hook_pre_linear",
              "key": "blocks.{i}.mlp.hook_post"}


@dataclass(frozen=True)
class Architecture:
    """Where the FFN sites of one architecture family live.

    ``layers`` lists candidate paths of the block ``ModuleList`` (the first that exists wins, so
    one entry serves ``LlamaModel`` and ``LlamaForCausalLM``). Sites are ``(module path inside a
    block, "input" | "output")``. ``value`` is the down projection module; ``value_layout`` says
    whether neuron j is a column (``nn.Linear``: ``weight[:, j]``) or a row (GPT-2 ``Conv1D``).
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    gate: tuple[str, str]
    key: tuple[str, str]
    value: str
    up: tuple[str, str] | None = None
    value_layout: str = "columns"
    d_ff_attr: str = "intermediate_size"
    final_norm: tuple[str, ...] = ()
    unembed: tuple[str, ...] = ("lm_head",)
    gated: bool = field(default=False)

    def site(self, name: str) -> tuple[str, str]:
        ref = {"gate": self.gate, "up": self.up, "key": self.key}.get(name)
        if name not in ACTIVATION_SITES:
            raise SiteError(f"unknown site {name!r}; choose one of {', '.join(SITES)}"
                            + (" ('value' is a parameter: use ModelAdapter.value_vectors)"
                               if name == "value" else ""))
        if ref is None:
            raise SiteError(f"site {name!r} does not exist on {self.name} (a non-gated FFN); "
                            f"use 'gate' or 'key'")
        return ref

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for s in ACTIVATION_SITES if s != "up" or self.up is not None) + ("value",)


_LLAMA_LIKE = dict(layers=("model.layers", "layers"), gate=("mlp.gate_proj", "output"),
                   up=("mlp.up_proj", "output"), key=("mlp.down_proj", "input"),
                   value="mlp.down_proj", final_norm=("model.norm", "norm"), gated=True)

REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture entry; returns it."""
    REGISTRY[arch.name] = arch
    return arch


for _name, _types in [("llama", ("llama",)), ("mistral", ("mistral", "mixtral_dense")),
                      ("qwen2", ("qwen2", "qwen3")), ("gemma", ("gemma", "gemma2", "gemma3_text")),
                      ("olmo", ("olmo", "olmo2"))]:
    register_architecture(Architecture(name=_name, model_types=_types, **_LLAMA_LIKE))

register_architecture(Architecture(
    name="gpt2", model_types=("gpt2",), layers=("transformer.h", "h"),
    gate=("mlp.c_fc", "output"), key=("mlp.c_proj", "input"), value="mlp.c_proj",
    value_layout="rows", d_ff_attr="n_inner", final_norm=("transformer.ln_f", "ln_f")))
register_architecture(Architecture(
    name="gpt_neox", model_types=("gpt_neox",), layers=("gpt_neox.layers", "layers"),
    gate=("mlp.dense_h_to_4h", "output"), key=("mlp.dense_4h_to_h", "input"),
    value="mlp.dense_4h_to_h", final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"),
    unembed=("embed_out",)))
register_architecture(Architecture(
    name="bert", model_types=("bert", "roberta", "xlm-roberta"),
    layers=("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
    gate=("intermediate.dense", "output"), key=("output.dense", "input"), value="output.dense",
    unembed=("cls.predictions.decoder", "lm_head.decoder")))


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def architecture_for(config) -> Architecture:
    """The registry entry for a Hugging Face config (by ``config.model_type``)."""
    model_type = getattr(config, "model_type", None)
    for arch in REGISTRY.values():
        if model_type in arch.model_types:
            return arch
    raise UnknownArchitectureError(
        f"unknown architecture {model_type!r}; supported: "
        + ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in REGISTRY.values())
        + ". Register one with skilllens.register_architecture(Architecture(name=..., "
          "model_types=('your_type',), layers=('model.layers',), gate=('mlp.fc1', 'output'), "
          "key=('mlp.fc2', 'input'), value='mlp.fc2'))")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def site_root(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module holding the blocks, its path in model + ".")``: the model itself, or the base
    model under a PEFT wrapper (``PeftModel``: module paths gain ``base_model.model.``)."""
    get = getattr(model, "get_base_model", None)
    root = get() if callable(get) else model
    if root is model:
        return model, ""
    name = next((n for n, m in model.named_modules() if m is root), None)
    return (root, name + ".") if name else (model, "")


class ModelAdapter:
    """Binds an :class:`Architecture` to one model instance: layers, site modules, values.

    ``model`` runs the forward passes; the blocks are looked up on :func:`site_root` (the base
    model of a PEFT ``PeftModel``, whose hooks then fire inside the wrapper's forward)."""

    def __init__(self, model: nn.Module, arch: Architecture | None = None):
        self.model = model
        self.root, self.root_path = site_root(model)
        self.arch = arch or architecture_for(self.root.config)
        blocks = None
        for path in self.arch.layers:
            blocks = _get(self.root, path)
            if blocks is not None:
                self.layers_path = path
                break
        if blocks is None:
            raise UnknownArchitectureError(
                f"{self.arch.name}: none of the layer paths {self.arch.layers} exist on "
                f"{type(model).__name__}; register an Architecture with the right 'layers' path")
        self.blocks: nn.ModuleList = blocks
        self.n_layers = len(blocks)
        down = self._module(0, self.arch.value)
        w = down.weight
        self.d_ff = w.shape[1] if self.arch.value_layout == "columns" else w.shape[0]
        self.d_model = w.shape[0] if self.arch.value_layout == "columns" else w.shape[1]

    @property
    def sites(self) -> tuple[str, ...]:
        return self.arch.sites

    def check_layers(self, layers) -> list[int]:
        """Normalise ``None``/"all"/ints (negative allowed) to a sorted list of layer indices."""
        if layers is None or layers == "all":
            return list(range(self.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for layer in layers:
            i = int(layer)
            j = i + self.n_layers if i < 0 else i
            if not 0 <= j < self.n_layers:
                raise SiteError(f"layer {i} is out of range: this model has {self.n_layers} "
                                f"layers (0..{self.n_layers - 1}, or -1 for the last)")
            out.append(j)
        return sorted(set(out))

    def _module(self, layer: int, path: str) -> nn.Module:
        mod = _get(self.blocks[layer], path)
        if mod is None:
            raise UnknownArchitectureError(
                f"{self.arch.name}: module {path!r} not found in block {layer} "
                f"({type(self.blocks[layer]).__name__}); fix the Architecture entry")
        return mod

    def site_module(self, site: str, layer: int) -> tuple[nn.Module, str]:
        """``(module, "input"|"output")`` holding ``site`` at ``layer``."""
        path, where = self.arch.site(site)
        return self._module(self.check_layers([layer])[0], path), where

    def site_device(self, site: str, layer: int) -> torch.device:
        """Where ``site``'s activation at ``layer`` lives: the device of its module's parameters
        (of the block's, for a parameter-free module); right also when ``device_map`` spreads
        the layers over several devices."""
        mod, _ = self.site_module(site, layer)
        for m in (mod, self.blocks[self.check_layers([layer])[0]], self.model):
            p = next(m.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    def site_module_path(self, site: str, layer: int) -> tuple[str, str]:
        path, where = self.arch.site(site)
        return f"{self.root_path}{self.layers_path}.{layer}.{path}", where

    def value_weight(self, layer: int) -> torch.Tensor:
        """The down-projection weight of ``layer`` as stored (a Parameter)."""
        return self._module(layer, self.arch.value).weight

    def value_vectors(self, layer: int) -> torch.Tensor:
        """All value vectors of ``layer``: ``[d_ff, d_model]`` (a view, no copy)."""
        mod = self._module(layer, self.arch.value)
        if hasattr(mod, "base_layer"):  # a PEFT adapter layer: base weight + adapter delta
            raise SiteError(f"the down projection of layer {layer} is wrapped by a PEFT adapter, "
                            f"so its value vectors are the base weight plus the adapter's update; "
                            f"merge the adapter first (model = model.merge_and_unload()) or leave "
                            f"the down projection out of target_modules")
        w = self.value_weight(layer)
        return w.t() if self.arch.value_layout == "columns" else w

    def final_norm(self) -> nn.Module | None:
        for path in self.arch.final_norm:
            mod = _get(self.root, path)
            if mod is not None:
                return mod
        return None

    def unembedding(self) -> torch.Tensor:
        """``W_U`` as ``[vocab, d_model]`` (tied or untied)."""
        for path in self.arch.unembed:
            mod = _get(self.root, path)
            if mod is not None:
                return mod.weight
        emb = self.root.get_output_embeddings() if hasattr(self.root, "get_output_embeddings") else None
        if emb is None:
            raise UnknownArchitectureError(f"{self.arch.name}: no unembedding found")
        return emb.weight

    def describe(self) -> dict:
        return {"architecture": self.arch.name, "model_type": self.model.config.model_type,
                "layers": self.n_layers, "d_model": self.d_model, "d_ff": self.d_ff,
                "sites": list(self.sites)}
