"""Fine-tuning-based unlearning baselines on the concept's article: gradient ascent (``ga``) and
NPO (``npo``, against a frozen reference), over the full model or only the FFN output matrices
(``scope="ffn_out"``).

The frozen reference of NPO is the model before training; because the training windows are
fixed, its per-window log-probabilities are computed once up front (identical to keeping a
frozen copy, without the memory). ``fit`` leaves the model unchanged; ``applied(lm)`` writes the
trained weights and restores the originals exactly on exit.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skilllens.core.artifacts import load_artifact, save_artifact
from skilllens.errors import ArtifactError, DataError
from skilllens.concepts.data import Concept
from skilllens.concepts.training import article_chunks, ga_loss, npo_loss, sequence_logprob

UNLEARN_METHODS = ("ga", "npo")
SCOPES = ("full", "ffn_out")


class FineTuneUnlearner:
    """``method`` in ``ga | npo``; ``scope`` in ``full | ffn_out``. AdamW over the scope."""

    kind = "finetune_unlearner"

    def __init__(self, method: str = "ga", scope: str = "ffn_out", steps: int = 10,
                 lr: float = 1e-5, weight_decay: float = 0.0, beta: float = 0.1,
                 seq_len: int = 128, max_chunks: int = 8, batch_size: int = 4, seed: int = 0):
        if method not in UNLEARN_METHODS:
            raise DataError(f"unknown unlearning method {method!r}; use {', '.join(UNLEARN_METHODS)}")
        if scope not in SCOPES:
            raise DataError(f"unknown scope {scope!r}; use {', '.join(SCOPES)}")
        if steps < 0 or lr <= 0 or beta <= 0:
            raise DataError("steps must be >= 0, lr > 0 and beta > 0")
        self.method, self.scope, self.steps, self.lr = method, scope, int(steps), float(lr)
        self.weight_decay, self.beta, self.seq_len = float(weight_decay), float(beta), int(seq_len)
        self.max_chunks, self.batch_size, self.seed = int(max_chunks), int(batch_size), int(seed)
        self.trained_: dict[str, torch.Tensor] | None = None
        self.losses_: list[float] = []
        self.fingerprint_: dict | None = None

    def _params(self, lm) -> dict[str, torch.nn.Parameter]:
        named = dict(lm.model.named_parameters())
        if self.scope == "full":
            return named
        ids = {id(lm.adapter.value_weight(l)) for l in range(lm.adapter.n_layers)}
        return {n: p for n, p in named.items() if id(p) in ids}

    def fit(self, lm, concept: Concept | str, progress: bool = False) -> "FineTuneUnlearner":
        text = concept.text if isinstance(concept, Concept) else str(concept)
        model = lm.model
        params = self._params(lm)
        chunks = article_chunks(lm.tokenizer, text, self.seq_len, self.max_chunks).to(lm.device)
        batches = [chunks[s:s + self.batch_size] for s in range(0, len(chunks), self.batch_size)]
        ref = None
        if self.method == "npo":
            with torch.no_grad():
                ref = [sequence_logprob(model, b) for b in batches]
        saved = {n: p.detach().clone() for n, p in params.items()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        torch.manual_seed(self.seed)
        try:
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
            opt = torch.optim.AdamW(list(params.values()), lr=self.lr,
                                    weight_decay=self.weight_decay)
            for _ in tqdm(range(self.steps), desc=self.method, disable=not progress, leave=False):
                for bi, ids in enumerate(batches):
                    opt.zero_grad(set_to_none=True)
                    logp = sequence_logprob(model, ids)
                    loss = ga_loss(logp, ids[:, 1:].numel()) if self.method == "ga" else \
                        npo_loss(logp, ref[bi], self.beta)
                    loss.backward()
                    opt.step()
                    self.losses_.append(loss.item())
            self.trained_ = {n: p.detach().clone() for n, p in params.items()}
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
                    p.grad = None
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        self.fingerprint_ = getattr(lm, "fingerprint", None)
        return self

    def _check_fitted(self):
        if self.trained_ is None:
            raise ArtifactError("FineTuneUnlearner is not fitted; call .fit(lm, concept) first")

    @contextlib.contextmanager
    def applied(self, lm):
        """Write the trained weights; restore the originals bit-for-bit on exit."""
        self._check_fitted()
        named = dict(lm.model.named_parameters())
        missing = [n for n in self.trained_ if n not in named]
        if missing:
            raise ArtifactError(f"parameters {missing[:3]} not in this model; load onto the model "
                                f"the unlearner was fitted on")
        saved = {n: named[n].detach().clone() for n in self.trained_}
        try:
            with torch.no_grad():
                for n, t in self.trained_.items():
                    named[n].copy_(t.to(named[n].device, named[n].dtype))
            yield lm
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    named[n].copy_(t)

    def edited_vector(self, lm, layer: int, index: int) -> torch.Tensor:
        """Value vector ``(layer, index)`` as training left it ``[d_model]``."""
        from skilllens.concepts.ablation import value_vector
        with self.applied(lm):
            return value_vector(lm, layer, index)

    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        meta = {k: getattr(self, k) for k in ("method", "scope", "steps", "lr", "weight_decay",
                                              "beta", "seq_len", "max_chunks", "batch_size", "seed")}
        return save_artifact(path, self.trained_, meta, kind=self.kind, fingerprint=self.fingerprint_)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "FineTuneUnlearner":
        t, meta = load_artifact(path, kind=cls.kind, model=model)
        keys = ("method", "scope", "steps", "lr", "weight_decay", "beta", "seq_len", "max_chunks",
                "batch_size", "seed")
        obj = cls(**{k: meta[k] for k in keys})
        obj.trained_, obj.fingerprint_ = t, meta.get("fingerprint")
        return obj
