"""Last-prompt-token vectors read during a teacher-forced evaluation pass (KSD's queries on the
items an audit scores anyway): :class:`PromptVectorRecorder`. Exactness as in
:mod:`skilllens.core.prompt_vectors`."""
from __future__ import annotations

import contextlib

import torch

from skilllens.core.batching import clamp_length, encode_items
from skilllens.core.collect import last_prompt_vectors
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.core.moe_collect import is_moe_key
from skilllens.core.prompt_vectors import mismatched_prompts


class PromptVectorRecorder:
    """Each item's last-prompt-token vector at ``key = (site, layer)``, read while a
    teacher-forced pass over the same items runs (``evaluate(..., on_batch=rec.on_batch)``
    inside ``with rec:``), exactly as a prompt-only pass gives it (module docstring): items
    the pass did not cover, or whose ids do not start with the prompt's own ids, get a
    prompt-only pass in :meth:`vectors`. ``active=False`` records nothing (every vector then
    comes from the prompt-only pass); so does a key a plain hook cannot read (an expert layer
    of a mixture-of-experts model: ``collect`` reads it through the expert hooks).

    >>> rec = PromptVectorRecorder(lm, ("key", -1), items, max_length=384)
    >>> with rec:
    ...     score = evaluate(lm, items, on_batch=rec.on_batch)
    >>> rec.vectors().shape   # [n_items, d_ff]
    """

    def __init__(self, lm, key: tuple[str, int], items, max_length: int = 512,
                 batch_size: int = 8, active: bool = True):
        self.lm, self.items = lm, list(items)
        self.key = (key[0], lm.adapter.check_layers([key[1]])[0])
        self.max_length = clamp_length(max_length, lm.model, lm.tokenizer)
        self.batch_size = batch_size
        self.active = active and not is_moe_key(lm.adapter, self.key)
        self._rows: dict[int, torch.Tensor] = {}
        self._batch = None
        self._stack = None

    def on_batch(self, batch) -> None:
        """Called with each :class:`~skilllens.core.batching.Batch` before its forward pass."""
        self._batch = batch

    def _hook(self, act: torch.Tensor) -> None:
        b = self._batch
        if b is None:
            return
        rows = act[torch.arange(act.shape[0], device=act.device),
                   b.prompt_lens.to(act.device) - 1].detach().to(torch.float32).cpu()
        for r, i in enumerate(b.index.tolist()):
            self._rows[i] = rows[r]

    def __enter__(self) -> "PromptVectorRecorder":
        self._stack = contextlib.ExitStack()
        if self.active:
            self._stack.enter_context(hooks_applied(self.lm, [Hook(*self.key, self._hook)]))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._batch = None

    def vectors(self) -> torch.Tensor:
        """``[n_items, d]`` float32, in item order (prompt-only pass for the exceptions)."""
        enc = encode_items(self.items, self.lm.tokenizer, self.max_length)
        bad = set(mismatched_prompts(enc, self.items, self.lm.tokenizer, self.max_length))
        todo = [i for i in range(len(self.items)) if i in bad or i not in self._rows]
        rows = dict(self._rows)
        if todo:
            got = last_prompt_vectors(self.lm, [self.items[i] for i in todo], [self.key],
                                      batch_size=self.batch_size,
                                      max_length=self.max_length)[self.key]
            rows.update(zip(todo, got))
        return torch.stack([rows[i] for i in range(len(self.items))])
