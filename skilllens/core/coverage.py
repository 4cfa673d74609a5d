"""Which model types of the installed transformers skilllens opens, found by trying each one.

For every language-model type (:func:`skilllens.core.tiny_configs.candidate_types`) a tiny
random-initialised model is built and given to :class:`ModelAdapter` (registry entry, else
automatic discovery verified on a forward pass). The result is one row per type:
``supported`` (with how its FFN was read), ``refused`` (discovery's reason) or ``untested``
(no tiny model of the type could be built or run here, with transformers' error).

``skilllens info --architectures`` prints :func:`markdown_table` of these rows; the file
``docs/ARCHITECTURES.md`` is that output.
"""
from __future__ import annotations

import warnings

from skilllens.errors import SkillLensError, UnknownArchitectureError

STATUSES = ("supported", "refused", "untested")


def _short(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _how(ad) -> str:
    arch = ad.arch

    def name(site):
        ref = arch.site(site)
        return ref[0] + (f"[{ref[2]}]" if len(ref) == 3 else "")

    parts = [f"gate `{name('gate')}`"] + ([f"up `{name('up')}`"] if arch.up else []) + \
        [f"down `{arch.value}`"]
    extra = []
    if arch.activation:
        extra.append(arch.activation)
    if arch.norm_offset:
        extra.append("(1+w) norm")
    if arch.flat_tokens:
        extra.append("flat tokens")
    if not ad.uniform_d_ff:
        extra.append("d_ff per layer")
    return ", ".join(parts) + (f" ({'; '.join(extra)})" if extra else "")


def check_type(model_type: str, model=None) -> dict:
    """``{"model_type", "status", "how"}``: the outcome of opening a tiny ``model_type`` (or
    ``model``, an already built one)."""
    import torch

    from skilllens.core.architectures import ModelAdapter, _registered
    from skilllens.core.tiny_configs import tiny_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(model_type) if model is None else model
    except SkillLensError as e:
        return {"model_type": model_type, "status": "untested", "how": _short(e)}
    except Exception as e:  # noqa: BLE001 - transformers' own config errors
        return {"model_type": model_type, "status": "untested",
                "how": _short(f"{type(e).__name__}: {e}")}
    from skilllens.core.moe import is_moe

    try:
        if is_moe(model):
            return _check_moe(model_type, model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad = ModelAdapter(model)
            ad.norm_scale()
    except UnknownArchitectureError as e:
        reason = str(e).split(" (built-in entries:")[0].split(". Register its FFN")[0]
        return {"model_type": model_type, "status": "refused", "how": _short(reason, 220)}
    src = "built-in" if _registered(model_type) is not None else "discovered"
    return {"model_type": model_type, "status": "supported", "how": f"{src}: {_how(ad)}"}


def _check_moe(model_type: str, model) -> dict:
    """A MoE model is supported when the per-expert loop with read hooks on every expert and
    router reproduces the model's own logits (one forward pass on random tokens)."""
    import torch

    from skilllens.core.hooks import run_with_hooks
    from skilllens.core.moe_hooks import ExpertHook, RouterHook

    from skilllens.core.moe import MoeAdapter

    ids = {"input_ids": torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))}
    try:
        ad = MoeAdapter(model)
        hooks = [h for l in ad.moe_layers for h in
                 [RouterHook(l, lambda r: None)] + [ExpertHook("key", l, e, lambda a: None)
                                                    for e in range(len(ad.layers_info[l].widths))]]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.model.eval()
            ref = ad.model(**ids).logits
            out = run_with_hooks(ad, ids, hooks).logits
    except UnknownArchitectureError as e:
        return {"model_type": model_type, "status": "refused", "how": _short(str(e), 220)}
    except Exception as e:  # noqa: BLE001 - any failure of the per-expert path refuses it
        return {"model_type": model_type, "status": "refused",
                "how": _short(f"mixture of experts: the per-expert path failed "
                              f"({type(e).__name__}: {e})", 220)}
    if not torch.allclose(out, ref, rtol=1e-3, atol=1e-4):
        return {"model_type": model_type, "status": "refused",
                "how": "mixture of experts: the per-expert loop does not reproduce the logits"}
    info = ad.layers_info[ad.moe_layers[0]].describe()
    return {"model_type": model_type, "status": "supported",
            "how": f"mixture of experts: {info['n_experts']} experts, top-{info['top_k']}, "
                   f"{info['n_shared']} shared (per-expert sites, verified)"}


def coverage(types=None, progress: bool = False) -> list[dict]:
    """:func:`check_type` for ``types`` (default every candidate type), sorted by type."""
    from skilllens.core.tiny_configs import candidate_types

    import transformers

    transformers.logging.set_verbosity_error()
    types = sorted(types or candidate_types())
    rows = []
    for t in types:
        rows.append(check_type(t))
        if progress:
            print(f"{t}: {rows[-1]['status']}", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as Markdown: a count line per status, then one table row per type."""
    import transformers

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    head = (f"transformers {transformers.__version__}: {counts['supported']} supported, "
            f"{counts['refused']} refused, {counts['untested']} untested of {len(rows)} "
            f"language-model types (tiny random models; generated by "
            f"`skilllens info --architectures`).\n\n")
    lines = ["| model type | status | FFN sites, or why not |", "|---|---|---|"]
    lines += [f"| `{r['model_type']}` | {r['status']} | {r['how']} |" for r in rows]
    return head + "\n".join(lines) + "\n"
