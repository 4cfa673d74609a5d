"""Automatic structural discovery of the FFN sites of a model no registry entry describes.

:func:`discover` reads the module tree and the config, then *verifies* what it found on one
forward pass of a few tokens:

1. **Blocks**: the ``nn.ModuleList`` of transformer blocks of the language model (also inside
   multimodal wrappers such as Gemma-3, Mistral-3, Qwen2.5-VL; vision/audio towers are skipped).
2. **Down projection** (``value``; ``key`` is its input): the ``nn.Linear``/``Conv1D`` of the
   block, outside attention, whose ``out_features`` is ``d_model`` (the unembedding's width).
3. **Gate / up**: the projections of width ``d_model -> d_ff`` (two separate modules, or one
   fused ``gate_up_proj``/``fc1`` of width ``2 d_ff`` whose halves or interleaved columns are the
   sites), and the **activation** (the config's ``hidden_act``/``hidden_activation``/
   ``activation_function`` or the MLP's activation module).
4. **Verification**: on the forward pass, ``key == act(gate) * up`` (gated) or ``key ==
   act(gate)`` must hold at every layer to float tolerance; exactly one reading may pass.
5. **Final norm, unembedding**: the unembedding is ``get_output_embeddings()``; the final norm is
   the sibling of the block list whose output is exactly the unembedding's input. Whether it
   scales by ``w`` or ``(1 + w)`` is measured by :func:`norm_offset`.

Anything unclear raises :class:`~skilllens.errors.UnknownArchitectureError` naming what to
register. Mixture-of-experts blocks are refused here: per-expert sites are a separate feature
and plug in at :func:`moe_experts` (the one place that recognises expert modules).

The result is a dict of :class:`~skilllens.core.architectures.Architecture` fields.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from skilllens.errors import UnknownArchitectureError

#: path segments of modules that are not the FFN of a block
_NOT_FFN = ("attn", "attention", "mixer", "conv", "ssm", "mamba", "time_mix", "token_mix",
            "linear_attn", "router", "adapter", "lora", "per_layer", "laurel", "altup")
#: path segments of non-language towers of multimodal wrappers
_TOWERS = ("vision", "visual", "audio", "image", "vq", "speech", "projector", "perceiver",
           "qformer", "connector", "patch", "tower", "sam", "mm_", "encoder_model")
_FALLBACK_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2")
_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "ffn_act", "mlp_act",
             "activation")
#: slices of one module's output a site may be (fused ``gate_up_proj``; ``d`` = d_ff), and
#: how a fused ``2 d_ff`` output splits into (activated, linear) halves
PARTS = {"first": lambda d: slice(None, d), "second": lambda d: slice(d, None),
         "even": lambda d: slice(0, None, 2), "odd": lambda d: slice(1, None, 2)}
_FUSED = (("first", "second"), ("second", "first"), ("even", "odd"), ("odd", "even"))


def _refuse(model_type, what: str) -> UnknownArchitectureError:
    return UnknownArchitectureError(
        f"{model_type!r}: {what}. Register its FFN with skilllens.register_architecture("
        f"Architecture(name=..., model_types=({model_type!r},), layers=('model.layers',), "
        f"gate=('mlp.fc1', 'output'), key=('mlp.fc2', 'input'), value='mlp.fc2'))")


def linear_shape(mod: nn.Module) -> tuple[int, int, str] | None:
    """``(in_features, out_features, value_layout)`` of a Linear-like module, else None
    (``nn.Linear`` keeps neuron j in weight column j; GPT-2's ``Conv1D`` in row j)."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, "columns"
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return w.shape[0], w.shape[1], "rows"
    return None


def _segments(path: str) -> list[str]:
    return path.lower().split(".")


def _has(path: str, words) -> bool:
    return any(w in seg for seg in _segments(path) for w in words)


def moe_experts(block: nn.Module) -> str | None:
    """Path of the first mixture-of-experts module in ``block`` (None for a dense block).

    The extension point for per-expert sites: today every model with one is refused."""
    for name, mod in block.named_modules():
        cls = type(mod).__name__.lower()
        if name and (_has(name, ("expert",)) or "expert" in cls or "sparse" in cls
                     or cls.endswith(("moe", "moeblock", "moelayer", "moemlp", "moefeedforward"))):
            return name
    return None


def _d_model(model: nn.Module, model_type) -> tuple[int, str, nn.Module]:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shape = linear_shape(emb) if emb is not None else None
    if shape is None:
        raise _refuse(model_type, "no output embedding (get_output_embeddings() is None or not a "
                                  "Linear): skilllens needs a language-model head")
    path = next(n for n, m in model.named_modules() if m is emb)
    return shape[0], path, emb


def _block_lists(model: nn.Module, d_model: int, n_text) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or _has(name, _TOWERS):
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue  # a list inside a block (experts, sub-layers)
        if any(s and s[1] == d_model for s in map(linear_shape, mod[0].modules())):
            found.append((name, mod))
    if len(found) > 1 and n_text:
        found = [f for f in found if len(f[1]) == n_text] or found
    return found


def _activations(block_ffn: list[tuple[str, nn.Module]], config) -> list[tuple[str, object]]:
    from transformers.activations import ACT2FN

    out = []
    for cfg in (config.get_text_config(), config) if hasattr(config, "get_text_config") else (config,):
        for key in _ACT_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, str) and v in ACT2FN and v not in [n for n, _ in out]:
                out.append((v, ACT2FN[v]))
    for name, mod in block_ffn:
        m, cls = type(mod).__module__, type(mod).__name__
        if next(mod.parameters(), None) is None and (
                m.startswith(("transformers.activations", "torch.nn.modules.activation"))
                or any(a in cls.lower() for a in ("gelu", "silu", "swish", "relu", "act"))):
            if cls not in [n for n, _ in out]:
                out.append((cls, mod))
    # activations called as functions in forward, named nowhere: the common ones, verified
    out += [(a, ACT2FN[a]) for a in _FALLBACK_ACTS if a not in [n for n, _ in out]]
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-3) -> bool:
    """Equal to float tolerance (relative to the largest entry; 10x looser for 16-bit)."""
    if a.shape != b.shape:
        return False
    tol = tol * 10 if a.dtype in (torch.float16, torch.bfloat16) else tol
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-6)
    return bool(((a - b).abs().max() / scale) < tol) and bool(b.abs().max() > 0)


def _readings(down_in: int, ups: list[tuple[str, int]], acts):
    """Every reading ``(gate, up, act)`` of the candidates: gated pairs, fused halves, plain."""
    same = [p for p, o in ups if o == down_in]
    fused = [p for p, o in ups if o == 2 * down_in]
    for g, u in itertools.permutations(same, 2):
        for act in acts:
            yield (g, None), (u, None), act
    for f in fused:
        for pg, pu in _FUSED:
            for act in acts:
                yield (f, pg), (f, pu), act
    for g in same:
        for act in acts:
            yield (g, None), None, act


def _site(out: dict, layer: int, ref, d: int) -> torch.Tensor:
    t = out[(layer, ref[0])]
    return t if ref[1] is None else t[..., PARTS[ref[1]](d)]


def _probe(model, config, n_tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [2, n], attention_mask)``: ordinary token ids (no special or image ids);
    the second row is right-padded after 3 tokens."""
    emb = model.get_input_embeddings()
    cfgs = (config, config.get_text_config()) if hasattr(config, "get_text_config") else (config,)
    avoid = {v for c in cfgs for k, v in vars(c).items()
             if k.endswith(("token_id", "token_index")) and isinstance(v, int)}
    ids = [i for i in range(3, emb.weight.shape[0]) if i not in avoid][: 2 * n_tokens]
    x = torch.tensor(ids, device=emb.weight.device).reshape(2, n_tokens)
    mask = torch.ones_like(x)
    mask[1, 3:] = 0
    return x, mask


@torch.no_grad()
def _forward(model, x, mask):
    try:
        return model(input_ids=x, attention_mask=mask, use_cache=False)
    except TypeError:
        return model(input_ids=x, attention_mask=mask)


def _capture(model, mods: dict, x, mask) -> dict:
    """Run :func:`_forward` recording each module's output ("out") or input ("in")."""
    seen, handles = {}, []

    def rec(key, where):
        def hook(mod, args, out):
            t = args[0] if where == "in" else out
            seen[key] = t[0] if isinstance(t, tuple) else t
        return hook

    training = model.training
    for key, (mod, where) in mods.items():
        handles.append(mod.register_forward_hook(rec(key, where)))
    try:
        model.eval()  # no dropout in the verification pass; the mode is restored below
        _forward(model, x, mask)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return seen


def discover(model: nn.Module) -> dict:
    """Find and verify the FFN sites of ``model`` (see the module docstring).

    Returns the fields of an ``Architecture`` (``name`` ``"auto:<model_type>"``). Raises
    :class:`UnknownArchitectureError` (naming what to register) when a step is not certain."""
    config = model.config
    mt = getattr(config, "model_type", None)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise _refuse(mt, "its weights are on the meta device, so discovered sites cannot be "
                          "verified on a forward pass")
    d_model, unembed_path, unembed = _d_model(model, mt)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_text = getattr(text, "num_hidden_layers", None)
    lists = _block_lists(model, d_model, n_text)
    if len(lists) != 1:
        raise _refuse(mt, "no list of transformer blocks found" if not lists else
                      f"several block lists could be the language model: {[p for p, _ in lists]}")
    layers_path, blocks = lists[0]
    for i, block in enumerate(blocks):
        experts = moe_experts(block)
        if experts:
            raise UnknownArchitectureError(
                f"{mt!r} is a mixture-of-experts model (layer {i} has {experts!r}): its per-expert "
                f"sites need skilllens.core.moe.MoeAdapter (load_model and adapter_for pick it "
                f"for fused transformers-5 experts); dense FFNs only here")
    ffn = [(n, m) for n, m in blocks[0].named_modules() if n and not _has(n, _NOT_FFN)]
    shapes = {n: s for n, m in ffn if (s := linear_shape(m)) is not None}
    downs = [n for n, (i, o, _) in shapes.items() if o == d_model and i != d_model]
    ups = [(n, o) for n, (i, o, _) in shapes.items() if i == d_model and o != d_model]
    if not downs:
        raise _refuse(mt, f"no FFN down projection (a Linear with out_features {d_model} outside "
                          f"attention) in block 0 ({type(blocks[0]).__name__})")
    acts = _activations(ffn, config)
    mods = {}
    for li, block in enumerate(blocks):  # a reading must hold in every layer (hybrids too)
        named = dict(block.named_modules())
        for n in downs:
            if n in named:
                mods[(li, n + "#in")] = (named[n], "in")
        for n, _ in ups:
            if n in named:
                mods[(li, n)] = (named[n], "out")
    last_parent = layers_path.rpartition(".")[0]
    root = model.get_submodule(last_parent) if last_parent else model
    norms = {f"{last_parent}.{n}".lstrip("."): m for n, m in root.named_children()
             if "norm" in (n + type(m).__name__).lower() or n in ("ln_f",)}
    for p, m in norms.items():
        mods[("norm", p)] = (m, "out")
    calls = [0]
    counter = blocks[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    mods[("unembed", unembed_path)] = (unembed, "in")
    x, mask = _probe(model, config)
    try:
        seen = _capture(model, mods, x, mask)
    except Exception as e:  # noqa: BLE001 - any failure of the forward pass is reported
        raise _refuse(mt, f"the verification forward pass failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        counter.remove()
    if calls[0] != 1:  # ALBERT: one block applied at every depth; statistics would mix them
        raise _refuse(mt, f"block 0 of {layers_path!r} ran {calls[0]} times in one forward pass "
                          f"(weights shared across depth), so a layer's site is not one activation")
    verified = []
    for down in downs:
        if (0, down + "#in") not in seen:
            continue
        key0 = seen[(0, down + "#in")]
        d = key0.shape[-1]
        for gate, up, (act_name, act) in _readings(d, ups, acts):
            ok = True
            for li in range(len(blocks)):
                key = seen.get((li, down + "#in"))
                dl = key.shape[-1] if key is not None else d
                if key is None or (li, gate[0]) not in seen or (up and (li, up[0]) not in seen):
                    ok = False
                    break
                g = _site(seen, li, gate, dl)
                want = act(g) * (_site(seen, li, up, dl) if up else 1)
                if not _close(key, want):
                    ok = False
                    break
            if ok:
                verified.append((down, gate, up, act_name))
                break
    distinct = {(v[0], v[1], v[2]) for v in verified}
    if len(distinct) != 1:
        found = f"down {downs}, gate/up candidates {[u for u, _ in ups]}"
        raise _refuse(mt, (f"no reading of its FFN ({found}) verifies key == act(gate) * up with "
                           f"the activations {[a for a, _ in acts]}") if not distinct else
                      f"several readings of its FFN verify: {sorted(distinct)}")
    down, gate, up, act_name = verified[0]
    layout = shapes[down][2]
    _check_tokens(mt, model, blocks, down, seen, x, mask)
    flat = seen[(0, down + "#in")].dim() == 2
    target = seen[("unembed", unembed_path)]
    final = [p for p in norms if ("norm", p) in seen and _close(seen[("norm", p)], target)
             and seen[("norm", p)].shape == target.shape]

    def ref(r, where="output"):
        return (r[0], where) if r[1] is None else (r[0], where, r[1])

    fields = dict(name=f"auto:{mt}", model_types=(mt,), layers=(layers_path,), gate=ref(gate),
                  up=ref(up) if up else None, key=(down, "input"), value=down,
                  value_layout=layout, final_norm=tuple(final[:1]), unembed=(unembed_path,),
                  flat_tokens=flat, activation=act_name)
    try:
        fields["norm_offset"] = norm_offset(model.get_submodule(final[0])) if final else None
    except UnknownArchitectureError:  # sites still work; ModelAdapter.norm_scale() refuses
        fields["norm_offset"] = None
    return fields


def _check_tokens(mt, model, blocks, down: str, seen: dict, x, mask) -> None:
    """Site activations must be one row per input token (``[B, T, d]`` or flattened
    ``[B*T, d]``), and padding must not change the real tokens' activations (batched
    statistics rely on both): the padded row must equal the same tokens run alone."""
    b, t = x.shape
    shape = tuple(seen[(0, down + "#in")].shape[:-1])
    if shape not in ((b, t), (b * t,)):
        raise _refuse(mt, f"its FFN activations have shape {shape} for {b} x {t} input tokens "
                          f"(the model adds tokens or reorders them), so token masks do not apply")
    n = int(mask[1].sum())
    mods = {li: (blocks[li].get_submodule(down), "in") for li in range(len(blocks))}
    try:
        alone = _capture(model, mods, x[1:, :n], mask[1:, :n])
    except Exception as e:  # noqa: BLE001
        raise _refuse(mt, f"a forward pass of a single unpadded row failed ({type(e).__name__})"
                      ) from None
    for li in range(len(blocks)):
        padded = seen[(li, down + "#in")].reshape(b, t, -1)[1, :n]
        if not _close(padded, alone[li].reshape(1, n, -1)[0], tol=1e-4):
            raise _refuse(mt, f"padding changes the FFN activations of real tokens (layer {li}): "
                              f"the model does not mask padding, so batched statistics would "
                              f"differ from per-text ones")


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float | None:
    """Measure whether ``norm`` scales its normalised input by ``w`` (0.0) or ``1 + w`` (1.0).

    The input is a zero-mean vector of ``+-4`` entries, so RMSNorm and LayerNorm both normalise
    it to ``+-1`` and the output is ``scale * (+-1) + bias``. Returns None when the norm has no
    ``weight`` (nothing to scale). Raises :class:`UnknownArchitectureError` when neither reading
    reproduces the norm's output."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        return None
    d = w.shape[0]
    sign = torch.ones(d, dtype=w.dtype, device=w.device)
    sign[1::2] = -1
    if d % 2:
        sign[-1] = 0
    y = norm((4 * sign).reshape(1, 1, d)).reshape(d).double()
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor):
        y = y - b.double()
    live = sign != 0
    scale = (y[live] / sign[live].double())
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    for offset in (0.0, 1.0):
        if bool(((scale - (offset + w[live].double())).abs() <= tol * (1 + scale.abs())).all()):
            return offset
    raise UnknownArchitectureError(
        f"the final norm {type(norm).__name__} scales by neither w nor (1 + w); declare "
        f"norm_offset in a registered Architecture")
