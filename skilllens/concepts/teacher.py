"""Teacher-forced scoring of edits, fast: the log-probability of fixed answers, re-using the
unedited model's residual stream below the first edited layer, and attribution scores.

:meth:`TeacherForced.scores` also gives the *greedy agreement*: the share of each original
answer that greedy decoding under the edit would reproduce (the matching prefix before the
first position where the edited model's argmax differs from the answer token). Unlike the mean
log-prob, it sees near-ties flipping, which is what changes generated answers.

An edit of value vectors at layers ``>= l`` leaves everything below layer ``l`` unchanged, so
:class:`TeacherForced` records each block's output once (``fit``) and, for an edit whose lowest
layer is ``l``, replaces blocks ``0..l-1`` by stubs that return the recorded outputs: only the
top ``n_layers - l`` blocks run. Logits are computed only at answer positions. ``fit`` checks
that this shortcut reproduces the full forward pass (it falls back to the full pass if not, e.g.
for an architecture whose blocks return something else).

:meth:`TeacherForced.attribution` is gradient x activation at every FFN neuron (the input of
the down projection): ``sum_{b,t} a[b,t,i] * d obj / d a[b,t,i]`` with ``obj`` the mean over
answers of the per-token log-prob; it predicts, to first order, how much zeroing value vector
``i`` lowers ``obj`` (``[n_layers, max d_ff]``, one forward and backward pass; a layer
narrower than the widest, a per-layer ``d_ff``, is NaN past its own width).
"""
from __future__ import annotations

import torch
from torch import nn

from skilllens.core.batching import (_not_one_string, clamp_length, fit_pair,
                                     generation_prompts, leading_specials, pad_id, right_padded)
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.errors import DataError


class _Stub(nn.Module):
    """Stands in for a block below the edit: returns its recorded output."""

    def __init__(self, out: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple

    def forward(self, *args, **kwargs):
        return (self.out,) if self.as_tuple else self.out


class TeacherForced:
    """Mean per-token log-prob of ``answers`` (their first ``max_answer_tokens`` tokens when
    given) after ``prompts``: ``[n]`` per call.

    >>> tf = TeacherForced(lm, prompts, answers).fit()                     # doctest: +SKIP
    >>> with edit.applied(lm):                                             # doctest: +SKIP
    ...     drop = tf.drop(min_layer=edit.layer)
    """

    def __init__(self, lm, prompts: list[str], answers: list[str] | None, batch_size: int = 32,
                 max_answer_tokens: int | None = None, answer_ids: list[list[int]] | None = None,
                 *, max_new_tokens: int | None = None, max_length: int | None = None):
        """``answer_ids``: token ids as generated (e.g. with the final EOS / stop token).
        ``max_new_tokens``: the generation budget the answers were generated with; the prompts
        are then cut exactly as greedy generation cut them
        (:func:`skilllens.core.batching.generation_prompts`), so verification sees the prompt
        generation saw. Without it, prompt + answer is cut to the model's context by
        :func:`skilllens.core.batching.fit_pair` (BOS and the prompt's end, the answer's start).
        Raises ``DataError`` when the numbers of prompts and answers differ or ``prompts`` /
        ``answers`` is one bare string instead of a list."""
        _not_one_string(prompts, "prompts")
        _not_one_string(answers, "answers")
        n_ans = len(answer_ids) if answer_ids is not None else len(answers or [])
        if len(prompts) != n_ans or not prompts:
            raise DataError(f"need as many answers as prompts (got {len(prompts)} prompts, "
                            f"{n_ans} answers) and at least one")
        self.lm, self.batch_size = lm, int(batch_size)
        tok = lm.tokenizer
        if answer_ids is not None:
            a_ids = [list(a)[:max_answer_tokens] for a in answer_ids]
        else:
            a_ids = [tok(" " + a, add_special_tokens=False)["input_ids"][:max_answer_tokens]
                     if a.strip() else [] for a in answers]
        if max_new_tokens is not None:
            p_ids = generation_prompts(lm.model, tok, list(prompts), max_new_tokens,
                                       max_length)[0]
            self.seqs = [p + a[:max_new_tokens] for p, a in zip(p_ids, a_ids)]
            a_lens = [len(a[:max_new_tokens]) for a in a_ids]
        else:
            p_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
            limit = clamp_length(max_length, lm.model, tok)
            specials = set(getattr(tok, "all_special_ids", None) or [])
            self.seqs, a_lens = [], []
            for p, a in zip(p_ids, a_ids):
                p = list(p)
                seq, n_p = fit_pair(p + a, len(p), leading_specials(p, specials),
                                    limit or len(p) + len(a))
                self.seqs.append(seq)
                a_lens.append(len(seq) - n_p)
        self.n_answer = [min(n, len(s) - 1) for n, s in zip(a_lens, self.seqs)]
        self.targets_ = torch.full((len(a_ids), max(self.n_answer + [1])), -1, dtype=torch.long)
        for i, (s, n) in enumerate(zip(self.seqs, self.n_answer)):
            if n:
                self.targets_[i, :n] = torch.tensor(s[len(s) - n:])
        self.batches: list[dict] = []
        self.base_: torch.Tensor | None = None
        self.shortcut_ = False

    def _encode(self):
        pad = pad_id(self.lm.tokenizer)
        order = sorted(range(len(self.seqs)), key=lambda i: -len(self.seqs[i]))
        dev = self.lm.device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, mask = right_padded(self.seqs, idx, pad)
            rows, pos, tgt, owner, slot = [], [], [], [], []
            for r, i in enumerate(idx):
                seq = self.seqs[i]
                for k, j in enumerate(range(len(seq) - self.n_answer[i], len(seq))):
                    rows.append(r), pos.append(j - 1), tgt.append(seq[j]), owner.append(i)
                    slot.append(k)
            self.batches.append({"ids": ids.to(dev), "mask": mask.to(dev), "index": idx,
                                 "rows": torch.tensor(rows, dtype=torch.long, device=dev),
                                 "pos": torch.tensor(pos, dtype=torch.long, device=dev),
                                 "tgt": torch.tensor(tgt, dtype=torch.long, device=dev),
                                 "owner": torch.tensor(owner, dtype=torch.long),
                                 "slot": torch.tensor(slot, dtype=torch.long)})

    def _reduce(self, b: dict, logits: torch.Tensor, out: torch.Tensor, am: torch.Tensor) -> None:
        """Add the answer tokens' log-probs to ``out``; write the greedy choice at every answer
        position into ``am`` (``[n, max_len]``)."""
        logits = logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, b["tgt"][:, None])[:, 0]
        out.index_add_(0, b["owner"], lp.double().cpu())
        am[b["owner"], b["slot"]] = logits.argmax(-1).cpu()

    def _hits(self) -> torch.Tensor:
        return torch.full((len(self.seqs), max(self.n_answer + [1])), -1, dtype=torch.long)

    def _agreement(self, am: torch.Tensor) -> torch.Tensor:
        """Share of each answer over which the greedy choice is unchanged from the unedited
        model: the prefix before the first changed argmax, over the answer length."""
        hit = am == self.base_argmax_
        prefix = torch.cumprod(hit.long(), 1).sum(1).double()
        n = torch.tensor(self.n_answer, dtype=torch.float64)
        return torch.where(n > 0, prefix.clamp(max=n) / n.clamp(min=1),
                           torch.full_like(n, float("nan")))

    def _finish(self, total: torch.Tensor) -> torch.Tensor:
        n = torch.tensor(self.n_answer, dtype=torch.float64)
        return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))

    @torch.no_grad()
    def fit(self) -> "TeacherForced":
        """Record every block's output on the unedited model and the baseline log-probs."""
        self._encode()
        model, blocks = self.lm.model, self.lm.adapter.blocks
        full, am = torch.zeros(len(self.seqs), dtype=torch.float64), self._hits()
        self.as_tuple = False
        for b in self.batches:
            outs = []

            def rec(_m, _i, o, outs=outs):
                self.as_tuple = isinstance(o, tuple)
                outs.append(o[0] if isinstance(o, tuple) else o)

            hooks = [blk.register_forward_hook(rec) for blk in blocks]
            try:
                res = model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            b["outs"] = outs
            self._reduce(b, res.logits[b["rows"], b["pos"]], full, am)
        self.base_, self.base_argmax_ = self._finish(full), am
        self.base_match_ = self._prefix(am == self.targets_)
        self.shortcut_ = True
        try:
            check = self.logprob(len(blocks) - 1)
            ok = torch.allclose(check.nan_to_num(), self.base_.nan_to_num(), atol=1e-4)
        except Exception:  # an architecture the stubs do not fit: always run the full model
            ok = False
        self.shortcut_ = ok
        return self

    def _prefix(self, hit: torch.Tensor) -> torch.Tensor:
        """Length of the leading run of ``True`` per row, capped at the answer length: ``[n]``."""
        run = torch.cumprod(hit.long(), 1).sum(1)
        return torch.minimum(run, torch.tensor(self.n_answer, dtype=torch.long))

    def matched(self, min_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-answer mean token log-prob and the number of leading answer tokens that greedy
        decoding under the current weights reproduces (argmax == the answer token), capped where
        the unedited model's own teacher-forced argmax first differs from the answer (a
        floating-point near-tie between generation and teacher forcing): ``([n], [n] long)``."""
        total, am = self._run(min_layer)
        k = torch.minimum(self._prefix(am == self.targets_), self.base_match_)
        return self._finish(total), k

    @torch.no_grad()
    def scores(self, min_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the model's current weights, assuming nothing below ``min_layer`` was edited:
        per-answer mean token log-prob and greedy agreement (share of the answer before the first
        position where the greedy choice differs from the unedited model's), both ``[n]`` float64 (NaN when empty)."""
        total, am = self._run(min_layer)
        return self._finish(total), self._agreement(am)

    @torch.no_grad()
    def _run(self, min_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batches:
            raise DataError("TeacherForced is not fitted; call .fit() on the unedited model")
        blocks = self.lm.adapter.blocks
        min_layer = int(min_layer) if self.shortcut_ else 0
        total, am = torch.zeros(len(self.seqs), dtype=torch.float64), self._hits()
        body, head = self.lm.model.base_model, self.lm.model.get_output_embeddings()
        for b in self.batches:
            saved = [blocks[j] for j in range(min_layer)]
            try:
                for j in range(min_layer):
                    blocks[j] = _Stub(b["outs"][j], self.as_tuple)
                if self.shortcut_:
                    hidden = body(input_ids=b["ids"], attention_mask=b["mask"],
                                  use_cache=False).last_hidden_state
                    logits = head(hidden[b["rows"], b["pos"]])
                else:
                    res = self.lm.model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False)
                    logits = res.logits[b["rows"], b["pos"]]
                self._reduce(b, logits, total, am)
            finally:
                for j, blk in enumerate(saved):
                    blocks[j] = blk
        return total, am

    def logprob(self, min_layer: int = 0) -> torch.Tensor:
        """Per-answer mean token log-prob (see :meth:`scores`): ``[n]``."""
        return self.scores(min_layer)[0]

    def drop(self, min_layer: int = 0) -> float:
        """Mean (over answers) drop of the per-token log-prob against the unedited model."""
        now = self.logprob(min_layer)
        ok = ~torch.isnan(now) & ~torch.isnan(self.base_)
        return float((self.base_[ok] - now[ok]).mean()) if ok.any() else 0.0

    def change(self, min_layer: int = 0) -> tuple[float, float]:
        """(mean log-prob drop, mean greedy agreement) over the non-empty answers."""
        now, agree = self.scores(min_layer)
        ok = ~torch.isnan(now) & ~torch.isnan(self.base_)
        if not ok.any():
            return 0.0, 1.0
        return float((self.base_[ok] - now[ok]).mean()), float(agree[ok].mean())

    def attribution(self) -> torch.Tensor:
        """Gradient x activation of every FFN neuron for the mean answer log-prob:
        ``[n_layers, max d_ff]`` float64 (predicted log-prob drop when the value vector is
        zeroed); row ``l`` holds layer ``l``'s ``d_ff_at(l)`` neurons and NaN past them (a
        per-layer FFN width). Raises ``DataError`` before :meth:`fit`."""
        if not self.batches:
            raise DataError("TeacherForced is not fitted; call .fit() on the unedited model")
        ad, model = self.lm.adapter, self.lm.model
        n = sum(1 for x in self.n_answer if x > 0)
        widths = [ad.d_ff_at(layer) for layer in range(ad.n_layers)]
        attr = torch.full((ad.n_layers, max(widths)), float("nan"), dtype=torch.float64)
        for layer, d_ff in enumerate(widths):
            attr[layer, :d_ff] = 0.0
        emb = model.get_input_embeddings()
        for b in self.batches:
            acts: list[torch.Tensor] = []

            def leaf(_m, _i, o):
                return o.detach().requires_grad_(True)

            hooks = [emb.register_forward_hook(leaf)]  # gradients start at the embeddings
            reads = [Hook("key", layer, acts.append) for layer in range(ad.n_layers)]
            try:
                with torch.enable_grad(), hooks_applied(self.lm, reads):
                    res = model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False)
                    lp = torch.log_softmax(res.logits[b["rows"], b["pos"]].float(), -1)
                    lp = lp.gather(-1, b["tgt"][:, None])[:, 0]
                    w = torch.tensor([1.0 / self.n_answer[int(i)] for i in b["owner"]],
                                     device=lp.device)
                    obj = (lp * w).sum() / max(n, 1)
                    grads = torch.autograd.grad(obj, acts)
            finally:
                for h in hooks:
                    h.remove()
            m = b["mask"][..., None].to(acts[0].dtype)
            for layer, (a, g) in enumerate(zip(acts, grads)):
                attr[layer, :widths[layer]] += (a.detach() * g * m).sum((0, 1)).double().cpu()
        return attr
