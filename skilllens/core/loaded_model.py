"""The handle every skilllens function accepts: a model, its tokenizer and its adapter."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skilllens.core.architectures import ModelAdapter
from skilllens.core.fingerprint import model_fingerprint


@dataclass
class LoadedModel:
    """What :func:`load_model` returns; unpacks as ``model, tokenizer, adapter``."""

    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.adapter))

    @property
    def fingerprint(self) -> dict:
        """:func:`model_fingerprint` (cached until a weight changes)."""
        return model_fingerprint(self.model, self.adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:  # architecture, sizes, dtype, device, fingerprint
        from skilllens.core.display import model_display
        return model_display(self).text

    def _repr_html_(self) -> str:
        from skilllens.core.display import model_display
        return model_display(self)._repr_html_()
