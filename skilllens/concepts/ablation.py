"""Reversible, seeded ablations of one FFN value vector (site ``value``).

* ``noise``: ``v <- v + N(0, sigma^2 I)`` (seeded; the draw is made on the CPU in float32, so
  it is the same on every device and dtype).
* ``zero``: ``v <- 0``.
* ``project``: remove the direction ``u = v/|v|`` from the layer's FFN output for every token,
  ``W_down <- (I - u u^T) W_down`` (and the bias, if any).

``with ablation.applied(lm): ...`` writes the edit and restores the saved original tensors
bit-for-bit on exit. Every edit is computed from a fresh copy of the weights (never from an
alias), so ablating concept A then concept B never lets A's noise leak into B.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from skilllens.core.artifacts import load_artifact, save_artifact
from skilllens.errors import ArtifactError, SiteError
from skilllens.concepts.vocab import check_index

METHODS = ("noise", "zero", "project")


def _down(lm, layer: int):
    ad = lm.adapter
    return ad._module(layer, ad.arch.value)


def value_column(lm, layer: int, index: int) -> torch.Tensor:
    """Writable view ``[d_model]`` of value vector ``index`` of ``layer``; on a
    mixture-of-experts layer a view into its expert's ``down_proj`` (``core/moe.py``)."""
    info = getattr(lm.adapter, "moe_layer", lambda _: None)(layer)
    if info is None:
        return lm.adapter.value_vectors(layer)[index]
    from skilllens.core.moe import split_index

    ((expert, (_, local)),) = split_index(info.widths, torch.tensor([index])).items()
    return info.expert_value_vectors(expert)[int(local[0])]


def value_vector(lm, layer: int, index: int) -> torch.Tensor:
    """A detached copy of value vector ``index`` of ``layer``: ``[d_model]``."""
    layer, index = check_index(lm, layer, index)
    return lm.adapter.value_vectors(layer)[index].detach().clone()


class ColumnEdit:
    """Base for edits that replace one value vector by ``new_vector_`` (noise, zero, Needle)."""

    kind = "column_edit"

    def __init__(self, layer: int, index: int):
        self.layer, self.index = int(layer), int(index)
        self.new_vector_: torch.Tensor | None = None
        self.original_: torch.Tensor | None = None
        self.fingerprint_: dict | None = None

    def __repr__(self) -> str:
        from skilllens.concepts.display import edit_display
        return edit_display(self).text

    def _repr_html_(self) -> str:
        from skilllens.concepts.display import edit_display
        return edit_display(self)._repr_html_()

    def _check_fitted(self):
        if self.new_vector_ is None:
            raise ArtifactError(f"{type(self).__name__} is not fitted; call .fit(lm) first")

    def edited_vector(self) -> torch.Tensor:
        """The value vector as the edit leaves it ``[d_model]``."""
        self._check_fitted()
        return self.new_vector_

    @contextlib.contextmanager
    def applied(self, lm):
        """Write the edit into ``lm``; restore the original weights exactly on exit."""
        self._check_fitted()
        layer, index = check_index(lm, self.layer, self.index)
        col = value_column(lm, layer, index)
        saved = col.detach().clone()
        try:
            with torch.no_grad():
                col.copy_(self.new_vector_.to(col.device, col.dtype))
            yield lm
        finally:
            with torch.no_grad():
                col.copy_(saved)

    def _meta(self) -> dict:
        return {"layer": self.layer, "index": self.index}

    def get_params(self) -> dict:
        """Constructor arguments (what :meth:`save` writes and :meth:`load` passes back)."""
        return self._meta()

    def _fit_meta(self) -> dict:
        """Fit metadata saved next to the parameters (subclasses: e.g. Needle's losses)."""
        return {}

    def _tensors(self) -> dict:
        return {"new_vector": self.new_vector_, "original": self.original_}

    def save(self, path: str | os.PathLike) -> Path:
        """Safetensors artifact stamped with the fingerprint of the model it was fitted on."""
        self._check_fitted()
        if self.fingerprint_ is None:
            raise ArtifactError("this edit has no model fingerprint (fitted with "
                                "fingerprint=False, or on a bare module); fit it on a loaded "
                                "model with fingerprint=True before saving, so that loading it "
                                "onto another model is refused")
        return save_artifact(path, self._tensors(), {**self._meta(), **self._fit_meta()},
                             kind=self.kind, fingerprint=self.fingerprint_)

    @classmethod
    def _from_meta(cls, meta: dict) -> "ColumnEdit":
        return cls(meta["layer"], meta["index"])

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "ColumnEdit":
        t, meta = load_artifact(path, kind=cls.kind, model=model)
        obj = cls._from_meta(meta)
        obj.new_vector_, obj.original_ = t["new_vector"], t["original"]
        obj.fingerprint_ = meta.get("fingerprint")
        obj._restore(t)
        obj._restore_fit_meta(meta)
        if model is not None and hasattr(model, "device"):
            obj.new_vector_ = obj.new_vector_.to(model.device)
        return obj

    def _restore(self, tensors: dict) -> None:
        """Subclasses read their extra saved tensors here."""

    def _restore_fit_meta(self, meta: dict) -> None:
        """Subclasses read their fit metadata (:meth:`_fit_meta`) here."""


class ConceptAblation(ColumnEdit):
    """Ablate value vector ``(layer, index)`` by ``method`` in ``noise | zero | project``.

    >>> abl = ConceptAblation(20, 123, "noise", sigma=0.1, seed=0).fit(lm)   # doctest: +SKIP
    >>> with abl.applied(lm):                                                # doctest: +SKIP
    ...     answers = generate_answers(lm, questions)
    """

    kind = "concept_ablation"

    def __init__(self, layer: int, index: int, method: str = "noise", sigma: float = 0.1,
                 seed: int = 0):
        super().__init__(layer, index)
        if method not in METHODS:
            raise SiteError(f"unknown ablation method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "noise" and not (sigma > 0):
            raise SiteError(f"sigma must be > 0 for noise ablation (got {sigma}); e.g. --sigma 0.1")
        self.method, self.sigma, self.seed = method, float(sigma), int(seed)
        self.direction_: torch.Tensor | None = None

    def fit(self, lm, fingerprint: bool = True) -> "ConceptAblation":
        """Compute the edit from the model's current weights (a copy; the model is unchanged).
        ``fingerprint=False`` skips hashing the weights (only needed to :meth:`save` it)."""
        self.layer, self.index = check_index(lm, self.layer, self.index,
                                             "projection" if self.method == "project" else None)
        v = value_vector(lm, self.layer, self.index)
        self.original_ = v.clone()
        if self.method == "noise":
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.randn(v.shape[0], generator=g, dtype=torch.float32) * self.sigma
            self.new_vector_ = (v.float().cpu() + noise).to(v.device, v.dtype)
        elif self.method == "zero":
            self.new_vector_ = torch.zeros_like(v)
        else:
            n = v.double().norm()
            if n == 0:
                raise SiteError(f"value vector ({self.layer}, {self.index}) is zero: nothing to "
                                f"project out; choose another vector or method")
            self.direction_ = (v.double() / n).to(v.device)
            self.new_vector_ = torch.zeros_like(v)  # v minus its own projection
        self.fingerprint_ = getattr(lm, "fingerprint", None) if fingerprint else None
        return self

    @contextlib.contextmanager
    def applied(self, lm):
        if self.method != "project":
            with super().applied(lm):
                yield lm
            return
        self._check_fitted()
        layer, _ = check_index(lm, self.layer, self.index, "projection")
        down = _down(lm, layer)
        view = lm.adapter.value_vectors(layer)
        bias = getattr(down, "bias", None)
        saved_w = down.weight.detach().clone()
        saved_b = bias.detach().clone() if bias is not None else None
        u = self.direction_.to(view.device)
        try:
            with torch.no_grad():
                V = view.double()
                view.copy_((V - torch.outer(V @ u, u)).to(view.dtype))
                if bias is not None:
                    b = bias.double()
                    bias.copy_((b - (b @ u) * u).to(bias.dtype))
            yield lm
        finally:
            with torch.no_grad():
                down.weight.copy_(saved_w)
                if bias is not None:
                    bias.copy_(saved_b)

    def _meta(self) -> dict:
        return {**super()._meta(), "method": self.method, "sigma": self.sigma, "seed": self.seed}

    def _tensors(self) -> dict:
        t = super()._tensors()
        if self.direction_ is not None:
            t["direction"] = self.direction_
        return t

    @classmethod
    def _from_meta(cls, meta: dict) -> "ConceptAblation":
        return cls(meta["layer"], meta["index"], meta["method"], meta["sigma"], meta["seed"])

    def _restore(self, tensors: dict) -> None:
        self.direction_ = tensors.get("direction")
