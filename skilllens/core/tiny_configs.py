"""Tiny random-initialised models of any model type of the installed transformers.

:func:`tiny_config` shrinks the default config of a ``model_type`` (and its text / vision / audio
sub-configs) to 2 layers, ``d_model`` 32, ``d_ff`` 64, 4 heads of 8 and the byte vocabulary
(259), so that every architecture can be built and run in milliseconds; :func:`tiny_model`
builds it with the task head skilllens uses (causal LM, masked LM, or image-text-to-text for
multimodal wrappers).

>>> from skilllens.core.tiny_configs import tiny_model
>>> model = tiny_model("phi3")
>>> model.config.num_hidden_layers, model.config.hidden_size
(2, 32)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from skilllens.errors import ModelSpecError

#: the shrunk value of every config attribute spelling the same dimension
_DIMS = {
    2: ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers",
        "num_encoder_layers"),
    32: ("hidden_size", "n_embd", "d_model", "dim", "n_embed", "embed_dim", "word_embed_proj_dim",
         "embedding_size"),
    64: ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size",
         "inner_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim", "mlp_dim"),
    4: ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
        "decoder_attention_heads"),
    8: ("head_dim", "kv_channels", "attention_head_size", "qk_nope_head_dim", "v_head_dim"),
}
_KV = ("num_key_value_heads", "multi_query_group_num", "num_kv_heads", "n_head_kv")
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
#: sub-configs that are not the language model: shrunk to 1 layer
_TOWERS = ("vision_config", "audio_config", "vq_config", "perceiver_config", "speech_config")
#: ids the byte tokenizer uses (``core/tokenizers.py``)
_TOKEN_IDS = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}


def _shrunk(defaults: dict, vocab: int, layers: int = 2) -> dict:
    """Keyword arguments shrinking a config whose defaults are ``defaults`` (its ``to_dict``)."""
    from transformers import CONFIG_MAPPING

    kw = {}
    for value, names in _DIMS.items():
        for n in names:
            if isinstance(defaults.get(n), int) and not isinstance(defaults.get(n), bool):
                kw[n] = layers if value == 2 else value
    for n in ("head_dim", "rotary_dim"):  # also where the default is None (derived later)
        if n in defaults:
            kw[n] = 8 if n == "head_dim" else 4
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict):
        kw["rope_parameters"] = _rope(rope)
    for n in _KV:
        if n in defaults:
            kw[n] = 2
    mamba = {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16,
             "mamba_chunk_size": 16, "mamba_expand": 2}  # hybrid SSM layers: 8 heads of 8
    kw.update({n: v for n, v in mamba.items() if isinstance(defaults.get(n), int)})
    for n in ("entity_vocab_size", "entity_emb_size"):  # LUKE's entity table (500k x 256)
        if isinstance(defaults.get(n), int):
            kw[n] = 16 if n.startswith("entity_vocab") else 32
    for n in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):  # Gemma-3n/4 inputs
        if isinstance(defaults.get(n), int):
            kw[n] = 8 if n.startswith("hidden") else vocab
    mt = defaults.get("model_type")
    cls = CONFIG_MAPPING[mt] if mt in CONFIG_MAPPING else None
    if "mrope_section" in getattr(cls, "ignore_keys_at_rope_validation", ()):  # read by the model
        kw["rope_parameters"] = {**kw.get("rope_parameters", {}), "mrope_section": [2, 1, 1]}
    for n in _POSITIONS:
        if isinstance(defaults.get(n), int):
            kw[n] = 512
    if "vocab_size" in defaults:
        kw["vocab_size"] = vocab
    for n, v in _TOKEN_IDS.items():
        if n in defaults:
            kw[n] = v
    for n, v in defaults.items():  # other token ids (image, boi ...) inside the vocabulary
        if n.endswith("_token_id") and n not in kw and isinstance(v, int) and v >= vocab:
            kw[n] = vocab - 1 - len(kw) % 8
    types = defaults.get("layer_types")
    if isinstance(types, list) and types:  # one layer of each kind, in order of appearance
        kinds = list(dict.fromkeys(types))
        kw["layer_types"] = kinds if len(kinds) > 1 else [kinds[0]] * layers
        for n in _DIMS[2]:
            if n in kw:
                kw[n] = len(kw["layer_types"])
        per_layer = defaults.get("per_layer_config")
        if isinstance(per_layer, dict):  # per-layer overrides follow their layer
            old = {int(k): v for k, v in per_layer.items()}
            first = [types.index(k) for k in kinds] if len(kinds) > 1 else [0] * layers
            kw["per_layer_config"] = {j: {**old[i], **{k: 16 for k in old[i] if "head_dim" in k}}
                                      for j, i in enumerate(first) if i in old}
    return kw


def _rope(rope: dict) -> dict:
    """RoPE parameters for 8-wide heads: multimodal sections summing to 4 (``head_dim / 2``)."""
    out = {}
    for k, v in rope.items():
        if isinstance(v, dict):
            out[k] = _rope(v)
        elif k == "mrope_section" and isinstance(v, list) and v:
            out[k] = [4 // len(v) + (1 if i < 4 % len(v) else 0) for i in range(len(v))]
        else:
            out[k] = v
    return out


def _tree(defaults: dict, vocab: int, tower: bool) -> dict:
    """Shrunk keyword arguments of a config and, recursively, of its sub-configs (towers get
    1 layer and keep their own vocabulary)."""
    kw = _shrunk(defaults, vocab, 1 if tower else 2)
    if tower and "vocab_size" in defaults:
        kw["vocab_size"] = min(defaults["vocab_size"], 1024)
    for sub, value in defaults.items():
        if isinstance(value, dict) and "model_type" in value:
            kw[sub] = {**value, **_tree(value, vocab, tower or sub in _TOWERS)}
    if "attention_types" in defaults and isinstance(defaults["attention_types"], list):
        kinds = [k for kinds, _ in defaults["attention_types"] for k in kinds]  # GPT-Neo
        kw["attention_types"] = [[list(dict.fromkeys(kinds)), 1]]
        for n in _DIMS[2]:
            if n in kw:
                kw[n] = len(dict.fromkeys(kinds))
    return kw


def tiny_config(model_type: str, vocab: int | None = None, **overrides):
    """A shrunk config of ``model_type`` (see the module docstring); ``overrides`` are further
    config arguments (e.g. ``use_double_wide_mlp=True``).

    Raises :class:`~skilllens.errors.ModelSpecError` for a type transformers does not know."""
    from transformers import CONFIG_MAPPING

    from skilllens.core.tokenizers import BYTE_VOCAB_SIZE

    vocab = vocab or BYTE_VOCAB_SIZE
    if model_type not in CONFIG_MAPPING:
        raise ModelSpecError(f"transformers has no model type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    kw = {**_tree(cls().to_dict(), vocab, tower=False), **overrides}
    try:
        return cls(**kw)
    except Exception as e:  # noqa: BLE001 - any config validation error: say which type
        raise ModelSpecError(f"cannot build a tiny {model_type!r} config: {e}") from None


def head_class(model_type: str):
    """The auto class skilllens builds ``model_type`` with: causal LM, masked LM or
    image-text-to-text (multimodal wrappers); None when it has none of them."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoModelForMaskedLM)
    from transformers.models.auto import modeling_auto as m

    for names, auto in ((m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM),
                        (m.MODEL_FOR_MASKED_LM_MAPPING_NAMES, AutoModelForMaskedLM),
                        (m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, AutoModelForImageTextToText)):
        if model_type in names:
            return auto
    return None


def candidate_types() -> list[str]:
    """Every model type of the installed transformers with a causal-LM, masked-LM or
    image-text-to-text head (the language models skilllens can be asked to open)."""
    from transformers.models.auto import modeling_auto as m

    return sorted(set(m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(m.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
                  | set(m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-initialised model of ``model_type`` (float32, eval mode, seeded);
    ``overrides`` go to :func:`tiny_config`."""
    auto = head_class(model_type)
    if auto is None:
        raise ModelSpecError(f"{model_type!r} has no causal-LM, masked-LM or image-text-to-text "
                             f"head in transformers")
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = auto.from_config(config)
        except Exception as e:  # noqa: BLE001 - report which type failed and why
            raise ModelSpecError(f"cannot build a tiny {model_type!r} model: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                 ) from None
    return model.float().eval()


#: model type and :func:`tiny_config` overrides of a tiny model whose FFN width differs per
#: layer: Gemma-4's double-wide MLP on its KV-shared last layer, ``d_ff`` 64, 64, 128
PER_LAYER_D_FF = ("gemma4_text", {
    "use_double_wide_mlp": True, "num_kv_shared_layers": 1, "num_hidden_layers": 3,
    "per_layer_config": {1: {"head_dim": 16}, 2: {"head_dim": 16}},
    "layer_types": ["sliding_attention", "full_attention", "full_attention"]})


def tiny_per_layer_d_ff_model(seed: int = 0) -> nn.Module:
    """The tiny model of :data:`PER_LAYER_D_FF` (``d_ff`` 64, 64, 128; the widest layer
    last), float32 and seeded as :func:`tiny_model`; raises ``ModelSpecError`` where the
    installed transformers cannot build it."""
    model_type, overrides = PER_LAYER_D_FF
    return tiny_model(model_type, seed, **copy.deepcopy(overrides))
