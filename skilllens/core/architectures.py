"""FFN site mappings per architecture: one small declarative entry each.

A *site* is one of ``gate`` (FFN pre-activation, ``[.., d_ff]``), ``up`` (the linear branch of a
gated FFN), ``key`` (the neuron coefficients fed to the down projection) and ``value`` (column j
of the down projection, a parameter of shape ``[d_model]``). See ``shared/METHODS.md``.

Register a new architecture with :func:`register_architecture`::

    register_architecture(Architecture(
        name="my-arch", model_types=("my_arch",), layers=("model.layers",),
        gate=("mlp.fc1", "output"), key=("mlp.fc2", "input"), value="mlp.fc2"))

Model types without an entry are handled by automatic discovery (:mod:`skilllens.core.discovery`)
when the adapter is built on a model instance.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from skilllens.core.discovery import PARTS, discover, norm_offset
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
    block, "input" | "output")``, or ``(path, where, part)`` for a slice of one module's output:
    ``part`` is ``"first"``/``"second"`` (halves, e.g. Phi-3's fused ``gate_up_proj`` split with
    ``chunk(2, dim=-1)``) or ``"even"``/``"odd"`` (interleaved columns). ``value`` is the down
    projection module; ``value_layout`` says whether neuron j is a column (``nn.Linear``:
    ``weight[:, j]``) or a row (GPT-2 ``Conv1D``).

    ``norm_offset``: the final norm scales by ``norm_offset + weight`` (0.0 for ``w``, 1.0 for
    Gemma's ``(1 + w)``); :meth:`ModelAdapter.norm_scale` checks it against the model's own
    final-norm output. ``flat_tokens``: the block flattens tokens to ``[batch * seq, d]`` around
    its FFN (OPT); hooks still see ``[batch, seq, d_ff]``. ``activation``: informational.
    ``d_ff_attr`` and ``gated`` are deprecated: ``d_ff`` is read from each layer's down
    projection and an FFN is gated exactly when ``up`` is given.
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    gate: tuple
    key: tuple
    value: str
    up: tuple | None = None
    value_layout: str = "columns"
    d_ff_attr: str | None = None
    final_norm: tuple[str, ...] = ()
    unembed: tuple[str, ...] = ("lm_head",)
    gated: bool | None = field(default=None)
    norm_offset: float | None = 0.0
    flat_tokens: bool = False
    activation: str | None = None

    def __post_init__(self):
        for name in ACTIVATION_SITES:
            ref = getattr(self, name)
            if ref is None:
                continue
            if (len(ref) not in (2, 3) or ref[1] not in ("input", "output")
                    or (len(ref) == 3 and ref[2] not in PARTS)):
                raise SiteError(f"{self.name}: site {name}={ref!r} must be (path, 'input'|'output')"
                                f" or (path, where, part) with part in {', '.join(PARTS)}")
        if self.value_layout not in ("columns", "rows"):
            raise SiteError(f"{self.name}: value_layout must be 'columns' or 'rows'")
        if self.gated is not None and bool(self.gated) != (self.up is not None):
            raise SiteError(f"{self.name}: gated={self.gated} but up={self.up!r}; an FFN is "
                            f"gated exactly when 'up' is given (drop 'gated')")
        if self.d_ff_attr is not None:
            warnings.warn("Architecture.d_ff_attr is not used: d_ff is read from each layer's "
                          "down projection", DeprecationWarning, stacklevel=3)

    def site(self, name: str) -> tuple:
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
                   value="mlp.down_proj", final_norm=("model.norm", "norm"))

REGISTRY: dict[str, Architecture] = {}
#: architectures found by discovery, per (model class, config): discovery runs once per process
_DISCOVERED: dict = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture entry; returns it. Registered entries take precedence
    over automatic discovery (:mod:`skilllens.core.discovery`)."""
    REGISTRY[arch.name] = arch
    _DISCOVERED.clear()
    return arch


for _name, _types, _act, _off in [
        ("llama", ("llama",), "silu", 0.0), ("mistral", ("mistral",), "silu", 0.0),
        ("qwen2", ("qwen2", "qwen3"), "silu", 0.0),
        ("gemma", ("gemma", "gemma2", "gemma3_text"), "gelu_pytorch_tanh", 1.0),
        ("olmo", ("olmo", "olmo2"), "silu", 0.0)]:
    register_architecture(Architecture(name=_name, model_types=_types, activation=_act,
                                       norm_offset=_off, **_LLAMA_LIKE))

register_architecture(Architecture(
    name="gpt2", model_types=("gpt2",), layers=("transformer.h", "h"),
    gate=("mlp.c_fc", "output"), key=("mlp.c_proj", "input"), value="mlp.c_proj",
    value_layout="rows", final_norm=("transformer.ln_f", "ln_f"), activation="gelu_new"))
register_architecture(Architecture(
    name="gpt_neox", model_types=("gpt_neox",), layers=("gpt_neox.layers", "layers"),
    gate=("mlp.dense_h_to_4h", "output"), key=("mlp.dense_4h_to_h", "input"),
    value="mlp.dense_4h_to_h", final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"),
    unembed=("embed_out",), activation="gelu"))
register_architecture(Architecture(
    name="bert", model_types=("bert", "roberta", "xlm-roberta"),
    layers=("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
    gate=("intermediate.dense", "output"), key=("output.dense", "input"), value="output.dense",
    unembed=("cls.predictions.decoder", "lm_head.decoder"), activation="gelu"))


def supported_architectures() -> list[str]:
    """Names of the registered entries (automatic discovery covers many more model types:
    ``skilllens info --architectures``)."""
    return sorted(REGISTRY)


def _registered(model_type) -> Architecture | None:
    for arch in REGISTRY.values():
        if model_type in arch.model_types:
            return arch
    return None


def architecture_for(config, model: nn.Module | None = None) -> Architecture:
    """The registry entry for a Hugging Face config (by ``config.model_type``); without one and
    with ``model`` given, the FFN sites found and verified by
    :func:`skilllens.core.discovery.discover`. Raises :class:`UnknownArchitectureError`."""
    model_type = getattr(config, "model_type", None)
    arch = _registered(model_type)
    if arch is not None:
        return arch
    builtin = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in REGISTRY.values())
    if model is None:
        raise UnknownArchitectureError(
            f"unknown architecture {model_type!r} (pass the model for automatic discovery); "
            f"built-in: {builtin}. Register one with skilllens.register_architecture(...)")
    key = (type(model), config.to_json_string() if hasattr(config, "to_json_string") else id(model))
    if key not in _DISCOVERED:
        try:
            _DISCOVERED[key] = Architecture(**discover(model))
        except UnknownArchitectureError as e:
            raise UnknownArchitectureError(
                f"{e} (built-in entries: {builtin}; others are found by discovery)") from None
    return _DISCOVERED[key]


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
        self.arch = arch or architecture_for(self.root.config, self.root)
        self._bind_blocks()
        # [d_ff, d_model] per layer from the stored weight (a PEFT-wrapped down projection
        # still has its base weight's shape; value_vectors refuses it, sizes do not)
        shapes = [self._value_shape(i) for i in range(self.n_layers)]
        #: ``d_ff`` of every layer (Gemma-4 ``use_double_wide_mlp`` doubles some of them)
        self.d_ffs: list[int] = [int(s[0]) for s in shapes]
        self.d_ff = self.d_ffs[0]
        self.d_model = int(shapes[0][1])
        self._norm_checked: float | None | bool = False

    def _bind_blocks(self) -> None:
        """Set ``blocks``/``layers_path``/``n_layers`` from the first of ``arch.layers`` that
        exists under ``root``; raises ``UnknownArchitectureError`` when none does."""
        for path in self.arch.layers:
            blocks = _get(self.root, path)
            if blocks is not None:
                self.layers_path, self.blocks, self.n_layers = path, blocks, len(blocks)
                return
        raise UnknownArchitectureError(
            f"{self.arch.name}: none of the layer paths {self.arch.layers} exist on "
            f"{type(self.model).__name__}; register an Architecture with the right 'layers' path")

    def _value_shape(self, layer: int) -> tuple[int, int]:
        w = self.value_weight(layer)
        return tuple(w.shape[::-1]) if self.arch.value_layout == "columns" else tuple(w.shape)

    def d_ff_at(self, layer: int) -> int:
        """Number of neurons (``d_ff``) of ``layer`` (negative counts from the end)."""
        return self.d_ffs[self.check_layers([layer])[0]]

    @property
    def uniform_d_ff(self) -> bool:
        """True when every layer has the same ``d_ff`` (``self.d_ff``)."""
        return len(set(self.d_ffs)) == 1

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
        path, where = self.arch.site(site)[:2]
        return self._module(self.check_layers([layer])[0], path), where

    def site_part(self, site: str) -> str | None:
        """The slice of its module's tensor ``site`` is (``"first"``/``"second"``/``"even"``/
        ``"odd"``, see ``PARTS``), or None when it is the whole tensor."""
        ref = self.arch.site(site)
        return ref[2] if len(ref) == 3 else None

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
        path, where = self.arch.site(site)[:2]
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

    def norm_scale(self) -> torch.Tensor | None:
        """The final norm's elementwise scale ``norm_offset + weight`` ``[d_model]`` (None when
        there is no final norm or it has no weight). The declared ``norm_offset`` is checked
        once against the norm's own output (:func:`skilllens.core.discovery.norm_offset`);
        a mismatch raises :class:`UnknownArchitectureError`."""
        norm = self.final_norm()
        w = getattr(norm, "weight", None) if norm is not None else None
        if not isinstance(w, torch.Tensor):
            return None
        if self._norm_checked is False:
            measured = norm_offset(norm)
            if measured != self.arch.norm_offset:
                raise UnknownArchitectureError(
                    f"{self.arch.name}: the final norm {type(norm).__name__} scales by "
                    f"{'(1 + w)' if measured else 'w'}, but the architecture declares "
                    f"norm_offset={self.arch.norm_offset}; register it with norm_offset={measured}")
            self._norm_checked = measured
        return w + self.arch.norm_offset if self.arch.norm_offset else w

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
        out = {"architecture": self.arch.name, "model_type": self.model.config.model_type,
               "layers": self.n_layers, "d_model": self.d_model, "d_ff": self.d_ff,
               "sites": list(self.sites)}
        if not self.uniform_d_ff:
            out["d_ff_per_layer"] = list(self.d_ffs)
        return out
