"""One snapshot of everything skilllens promises not to change on a caller's model/tokenizer.

``snapshot(model, tokenizer)`` records, per parameter and buffer: a SHA-256 of its bytes, dtype,
device, shape, ``requires_grad`` and the tensor object itself (its id: a parameter replaced by
another is a change); per module: its class, ``training`` flag, every hook dict (forward,
pre-forward, with-kwargs, always-called, backward, state-dict hooks) and an instance-level
``forward`` (accelerate and nnsight patch it); the config and generation config; for the
tokenizer its attributes (``padding_side``, ``truncation_side``, special tokens,
``model_max_length``, ``init_kwargs`` ...) and a fast tokenizer's backend (vocabulary, added
tokens, normaliser; not its per-call padding/truncation scratch state); and torch's global grad
mode and default dtype.

``assert_unchanged(before, model, tokenizer)`` takes a second snapshot and names every field
that differs.
"""
from __future__ import annotations

import hashlib
import json

import torch

HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
TOKENIZER_ATTRS = ("padding_side", "truncation_side", "pad_token", "eos_token", "bos_token",
                   "unk_token", "sep_token", "cls_token", "mask_token", "pad_token_id",
                   "eos_token_id", "bos_token_id", "model_max_length", "add_bos_token",
                   "add_eos_token", "clean_up_tokenization_spaces", "split_special_tokens",
                   "chat_template", "name_or_path", "additional_special_tokens")


def _tensor(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":
        data = "meta"
    else:
        x = t.detach().cpu().contiguous()
        data = hashlib.sha256(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"").hexdigest()
    return (data, str(t.dtype), str(t.device), tuple(t.shape), bool(t.requires_grad), id(t))


def _hooks(mod) -> dict:
    out = {}
    for d in HOOK_DICTS:
        hooks = getattr(mod, d, None)
        if hooks:
            out[d] = [(k, id(v)) for k, v in hooks.items()]
    if "forward" in vars(mod):
        out["forward"] = id(vars(mod)["forward"])
    return out


def _config(obj) -> str | None:
    if obj is None:
        return None
    try:
        return json.dumps(obj.to_dict(), sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 -- a non-HF config: its repr
        return repr(obj)


def model_snapshot(model: torch.nn.Module) -> dict:
    snap = {"tensors": {}, "modules": {}}
    for name, p in model.named_parameters(remove_duplicate=False):
        snap["tensors"]["param:" + name] = _tensor(p)
        if p.grad is not None:
            snap["tensors"]["grad:" + name] = _tensor(p.grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        snap["tensors"]["buffer:" + name] = _tensor(b)
    for name, mod in model.named_modules(remove_duplicate=False):
        snap["modules"][name] = (type(mod).__name__, mod.training, _hooks(mod))
    snap["config"] = _config(getattr(model, "config", None))
    snap["generation_config"] = _config(getattr(model, "generation_config", None))
    return snap


def tokenizer_snapshot(tok) -> dict:
    if tok is None:
        return {}
    snap = {a: repr(getattr(tok, a, "<absent>")) for a in TOKENIZER_ATTRS}
    snap["len"] = len(tok)
    snap["init_kwargs"] = repr(sorted((k, repr(v)) for k, v in getattr(tok, "init_kwargs", {}).items()))
    snap["special_tokens_map"] = repr(getattr(tok, "special_tokens_map", None))
    snap["attrs"] = sorted(vars(tok))
    backend = getattr(tok, "_tokenizer", None) or getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # the backend's padding/truncation are per-call scratch state: transformers rewrites
        # them at every ``tokenizer(...)`` call (the caller's own included), so they are not a
        # setting anyone keeps; the vocabulary, normaliser and pre-tokeniser are
        state = json.loads(backend.to_str())
        state.pop("padding", None), state.pop("truncation", None)
        snap["backend"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    return snap


def snapshot(model: torch.nn.Module, tokenizer=None) -> dict:
    """Everything skilllens must leave as it found it (see the module docstring)."""
    return {"model": model_snapshot(model), "tokenizer": tokenizer_snapshot(tokenizer),
            "torch": (torch.is_grad_enabled(), str(torch.get_default_dtype()),
                      torch.is_inference_mode_enabled())}


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two snapshots."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def assert_unchanged(before: dict, model: torch.nn.Module, tokenizer=None) -> None:
    """Fail naming every field that changed since ``before = snapshot(model, tokenizer)``."""
    diff = differences(before, snapshot(model, tokenizer))
    assert not diff, "the caller's objects changed:\n  " + "\n  ".join(diff[:20]) + (
        f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else "")
