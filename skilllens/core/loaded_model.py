"""The handle every skilllens function accepts: a model, its tokenizer and its adapter."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from skilllens.core.architectures import ModelAdapter
from skilllens.core.fingerprint import model_fingerprint
from skilllens.errors import ModelSpecError


@dataclass
class LoadedModel:
    """What :func:`load_model` returns; unpacks as ``model, tokenizer, adapter``."""

    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str

    def __post_init__(self):
        check_in_memory(self.model)

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


def check_in_memory(model: nn.Module) -> None:
    """Raise :class:`ModelSpecError` when a parameter or buffer is on the ``meta`` device:
    weights offloaded by accelerate (``cpu_offload``, ``disk_offload``, a ``device_map`` with
    ``"cpu"``/``"disk"`` offload) or never materialised (``init_empty_weights``). skilllens reads
    (fingerprints, statistics) and edits (grafting, value edits) the weights themselves, which
    such a model does not hold; refusing up front beats a torch error half-way through."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta":
                raise ModelSpecError(
                    f"{kind} {name!r} is on the meta device: the model's weights are offloaded "
                    f"(accelerate cpu_offload/disk_offload or a device_map with offload) or were "
                    f"never loaded. skilllens needs every weight in memory; load the model "
                    f"without offload (device_map onto GPUs/CPU that hold it all, e.g. "
                    f"skilllens.load_model(path, device_map='auto') with enough memory, or a "
                    f"smaller dtype)")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with every module of ``model`` in eval mode (no dropout), then give each
    module back its own ``training`` flag (also on error): skilllens's forward passes measure the
    model as it predicts, while a caller's model in train mode stays in train mode."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield model
    finally:
        for m, was in flags:
            m.training = was
