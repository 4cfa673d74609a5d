"""Needle: noise one concept vector, then gradient ascent on the concept's article with the
gradient (and the AdamW-style weight decay) restricted to that single column.

The reference used ``torch.optim.AdamW`` over the whole down-projection matrix and masked the
gradient, so its weight decay still shrank every other column. Here the optimiser state and the
update live on the one ``[d_model]`` vector only: every other weight is bit-identical.
``fit`` leaves the model unchanged; apply the result with ``with needle.applied(lm): ...``.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from skilllens.errors import DataError
from skilllens.concepts.ablation import ColumnEdit, value_vector
from skilllens.concepts.data import Concept
from skilllens.concepts.training import article_chunks, ga_loss, sequence_logprob
from skilllens.concepts.vocab import check_index


def _column_grad(lm, layer: int, index: int, grad: torch.Tensor) -> torch.Tensor:
    return (grad.t() if lm.adapter.arch.value_layout == "columns" else grad)[index]


class Needle(ColumnEdit):
    """Needle unlearning of value vector ``(layer, index)``."""

    kind = "needle"

    def __init__(self, layer: int, index: int, sigma: float = 0.1, steps: int = 10,
                 lr: float = 1e-2, weight_decay: float = 0.01, seq_len: int = 128,
                 max_chunks: int = 8, batch_size: int = 4, seed: int = 0):
        super().__init__(layer, index)
        if not sigma > 0:
            raise DataError(f"sigma must be > 0 (got {sigma})")
        if steps < 0 or lr <= 0:
            raise DataError("steps must be >= 0 and lr > 0")
        self.sigma, self.steps, self.lr, self.weight_decay = float(sigma), int(steps), float(lr), \
            float(weight_decay)
        self.seq_len, self.max_chunks, self.batch_size, self.seed = int(seq_len), int(max_chunks), \
            int(batch_size), int(seed)
        self.losses_: list[float] = []

    def fit(self, lm, concept: Concept | str, progress: bool = False) -> "Needle":
        text = concept.text if isinstance(concept, Concept) else str(concept)
        self.layer, self.index = check_index(lm, self.layer, self.index, "Needle")
        model, ad = lm.model, lm.adapter
        weight = ad.value_weight(self.layer)
        view = ad.value_vectors(self.layer)
        v0 = value_vector(lm, self.layer, self.index)
        self.original_ = v0.clone()
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        col = (v0.float().cpu() + self.sigma * torch.randn(v0.shape[0], generator=g)).to(v0.device)
        chunks = article_chunks(lm.tokenizer, text, self.seq_len, self.max_chunks).to(lm.device)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        m, s = torch.zeros_like(col), torch.zeros_like(col)
        b1, b2, eps = 0.9, 0.999, 1e-8
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            weight.requires_grad_(True)
            step = 0
            for _ in tqdm(range(self.steps), desc="needle", disable=not progress, leave=False):
                for start in range(0, len(chunks), self.batch_size):
                    ids = chunks[start:start + self.batch_size]
                    with torch.no_grad():
                        view[self.index].copy_(col.to(view.dtype))
                    weight.grad = None
                    loss = ga_loss(sequence_logprob(model, ids), ids[:, 1:].numel())
                    loss.backward()
                    grad = _column_grad(lm, self.layer, self.index, weight.grad).float()
                    step += 1
                    m.mul_(b1).add_(grad, alpha=1 - b1)
                    s.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    upd = (m / (1 - b1 ** step)) / ((s / (1 - b2 ** step)).sqrt() + eps)
                    col = col * (1 - self.lr * self.weight_decay) - self.lr * upd
                    self.losses_.append(-loss.item())
        finally:
            weight.grad = None
            with torch.no_grad():
                view[self.index].copy_(v0)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        self.new_vector_ = col.detach().to(v0.dtype)
        self.fingerprint_ = getattr(lm, "fingerprint", None)
        return self

    def _meta(self) -> dict:
        return {**super()._meta(), "sigma": self.sigma, "steps": self.steps, "lr": self.lr,
                "weight_decay": self.weight_decay, "seq_len": self.seq_len,
                "max_chunks": self.max_chunks, "batch_size": self.batch_size, "seed": self.seed}

    def _fit_meta(self) -> dict:
        return {"losses": [float(v) for v in self.losses_]}

    def _restore_fit_meta(self, meta: dict) -> None:
        self.losses_ = [float(v) for v in meta.get("losses", [])]

    @classmethod
    def _from_meta(cls, meta: dict) -> "Needle":
        keys = ("sigma", "steps", "lr", "weight_decay", "seq_len", "max_chunks", "batch_size", "seed")
        return cls(meta["layer"], meta["index"], **{k: meta[k] for k in keys})
