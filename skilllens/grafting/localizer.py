"""Skill localization by model grafting (Panigrahi et al. 2023; ``shared/METHODS.md`` s. 1).

Find a sparse binary mask ``g`` over the eligible parameters so that the graft
``theta_g = g * theta_ft + (1 - g) * theta_pre`` scores about as well as ``theta_ft``:

1. base patch: the global top-k entries of ``|theta_ft - theta_pre|`` (k = sparsity x #eligible),
   from a global threshold found with per-tensor ``topk`` + ``kthvalue`` (no sort of everything);
2. scores ``S`` (zeros), soft mask ``g = base * (1 - sig(S - b)) + (1 - base) * sig(S - b)``;
3. minimise the task loss of the soft graft (+ optional ``l1 * mean(g)``) w.r.t. ``S`` only;
4. round (0.5), keep the mask with the best train + dev score, report its actual sparsity.

Everything stays on the model's device; only tensors where the two models differ are optimised,
through one working copy that holds the soft graft (:class:`GraftWorkspace`).

>>> from skilllens import load_model
>>> from skilllens.grafting.finetune import finetune, FineTuneConfig
>>> from skilllens.grafting.tasks import build_task
>>> lm, task = load_model("tiny-llama"), build_task("synthetic")
>>> ft = finetune(lm, task, FineTuneConfig(steps=3, lr=1e-2, progress=False))
>>> loc = GraftLocalizer(sparsity=0.01, steps=2, progress=False).fit(lm, ft, task)
>>> with loc.grafted(lm):
...     pass  # lm now carries the graft; restored exactly on exit
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch

from skilllens.core.artifacts import check_fingerprint
from skilllens.errors import ArtifactError, FingerprintMismatchError
from skilllens.grafting.finetune import (DEFAULT_EXCLUDE, DEFAULT_INCLUDE, FineTuned,
                                         select_parameters)
from skilllens.grafting.tasks import GraftTask, encode_task_items, score_task, task_loss
from skilllens.core.fingerprint import fingerprints_match, model_fingerprint
from skilllens.core.loaded_model import LoadedModel, eval_mode
from skilllens.core.models import load_model
from skilllens.grafting.workspace import (GraftError, GraftWorkspace, check_same_shapes,
                                          global_topk_masks)

KIND = "graft-mask"
#: score updates: the reference's plain SGD, Adam, and SGD normalised by the largest gradient
OPTIMIZERS = ("sgd", "adam", "normalized")


def _lm(x) -> LoadedModel:
    return x.lm if isinstance(x, FineTuned) else load_model(x)


@dataclass
class GraftFitResult:
    """What :meth:`GraftLocalizer.fit` found: target and actual sparsity, counts, history."""

    sparsity_target: float
    sparsity: float
    n_eligible: int
    n_selected: int
    n_base: int
    best_step: int
    history: list[dict] = field(default_factory=list)


def _patterns(p) -> tuple[str, ...]:
    """Name patterns as a tuple (one string is one pattern)."""
    return (p,) if isinstance(p, str) else tuple(p)


class GraftLocalizer:
    """Find the sparse region of parameters that carries a fine-tuned skill.

    ``sparsity`` in (0, 1): share of eligible parameters in the base patch. ``steps`` optimiser
    steps on the scores (0: the base patch only). ``optimizer="sgd"``: the reference's update
    ``S -= lr * grad`` (``lr`` 1e7, since sig'(-10) ~ 5e-5); ``"adam"``: Adam with ``lr`` (try
    0.5; it moves every score with a non-zero gradient by about ``lr`` per step);
    ``"normalized"`` (not in the reference): ``S -= lr * grad / max|grad|``, so the entry with
    the largest gradient moves by ``lr`` (try 1-3 with ``bias`` 10) whatever the scale of the
    loss, and entries flip in the order of their gradients. ``l1`` adds
    ``l1 * (sum g) / n_eligible`` to the loss (Localize-and-Stitch). ``history``: per step the
    rounded mask's size, entries added to / removed from the base patch (``n_added``/
    ``n_removed``) and the largest score gradient (``max_grad``).
    """

    def __init__(self, sparsity: float = 1e-4, include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE,
                 steps: int = 20, lr: float = 1e7, bias: float = 10.0, l1: float = 0.0,
                 optimizer: str = "sgd", max_length: int = 128, batch_size: int = 16,
                 progress: bool = True):
        if not (isinstance(sparsity, (int, float)) and 0 < float(sparsity) < 1):
            raise GraftError(f"sparsity must be in (0, 1) (a share of eligible parameters, e.g. "
                             f"1e-4 for 0.01%), got {sparsity!r}")
        if optimizer not in OPTIMIZERS:
            raise GraftError(f"unknown optimizer {optimizer!r}; use one of "
                             f"{', '.join(OPTIMIZERS)}")
        if steps < 0 or lr <= 0 or l1 < 0:
            raise GraftError("steps must be >= 0, lr > 0 and l1 >= 0")
        self.sparsity, self.steps, self.lr, self.bias, self.l1 = float(sparsity), steps, lr, \
            bias, l1
        self.include, self.exclude = _patterns(include), _patterns(exclude)
        self.optimizer, self.max_length, self.batch_size = optimizer, max_length, batch_size
        self.progress = progress
        self.masks_: dict[str, torch.Tensor] = {}
        self.values_: dict[str, torch.Tensor] = {}
        self.result_: GraftFitResult | None = None
        self.meta_: dict = {}

    def get_params(self) -> dict:
        """Constructor arguments (saved with the mask; :meth:`load` passes them back)."""
        return {k: getattr(self, k) for k in ("sparsity", "include", "exclude", "steps", "lr",
                                              "bias", "l1", "optimizer", "max_length",
                                              "batch_size", "progress")}

    def __repr__(self) -> str:
        from skilllens.grafting.display import localizer_display
        return localizer_display(self).text

    def _repr_html_(self) -> str:
        from skilllens.grafting.display import localizer_display
        return localizer_display(self)._repr_html_()

    # ------------------------------------------------------------ fitting
    def fit(self, pre, ft, task: GraftTask) -> "GraftLocalizer":
        """Localize ``task``'s skill: ``pre``/``ft`` are specs, LoadedModels or FineTuned."""
        from tqdm.auto import tqdm

        pre, ftm = _lm(pre), _lm(ft)
        check_same_shapes(pre.model, ftm.model)
        eligible = select_parameters(pre.model, self.include, self.exclude)
        pre_p = {n: p.detach() for n, p in pre.model.named_parameters() if n in eligible}
        ft_all = dict(ftm.model.named_parameters())
        dev = pre.device
        diff = {}
        with torch.no_grad():
            for n in eligible:
                d = ft_all[n].detach().to(dev, pre_p[n].dtype) - pre_p[n]
                if bool((d != 0).any()):
                    diff[n] = d
        n_eligible = sum(pre_p[n].numel() for n in eligible)
        k = max(1, round(self.sparsity * n_eligible))
        if not diff:
            raise GraftError("the fine-tuned model equals the pre-trained one on every eligible "
                             "parameter; fine-tune first or widen include/exclude")
        base = global_topk_masks({n: d.abs() for n, d in diff.items()}, k)
        n_base = sum(int(m.sum()) for m in base.values())
        ws = GraftWorkspace({n: pre_p[n] for n in diff}, diff, base, self.bias)
        scores = ws.scores
        opt = torch.optim.Adam(scores.values(), lr=self.lr) if self.optimizer == "adam" else None
        tok = pre.tokenizer
        enc = lambda items: encode_task_items(items, tok, task.kind, task.label_words,  # noqa
                                              self.max_length, dev, pre.model)
        train = enc(task.train)
        dev_data = enc(task.dev) if task.dev else None
        model = pre.model
        mode = eval_mode(model)  # each module's own train/eval flag comes back afterwards
        mode.__enter__()
        best, history, prev = None, [], None
        try:
            for step in tqdm(range(self.steps + 1), desc=f"graft {task.name}",
                             disable=not self.progress):
                with torch.no_grad():
                    hard = {n: (base[n] ^ (scores[n] > self.bias)) for n in diff}
                    if prev is None or not all(torch.equal(hard[n], prev[0][n]) for n in diff):
                        hp = ws.apply_hard(hard)
                        tr = score_task(model, train, self.batch_size, hp)
                        dv = score_task(model, dev_data, self.batch_size, hp) if dev_data \
                            else None
                    else:  # the rounded mask did not change: same scores as the last step
                        tr, dv = prev[1], prev[2]
                    prev = (hard, tr, dv)
                sel = sum(int(m.sum()) for m in hard.values())
                added = sum(int((hard[n] & ~base[n]).sum()) for n in diff)
                total = tr.score * train.n_items + (dv.score * dev_data.n_items if dv else 0)
                rec = {"step": step, "train_score": tr.score, "train_loss": tr.loss,
                       "dev_score": dv.score if dv else None, "n_selected": sel,
                       "sparsity": sel / n_eligible, "n_added": added,
                       "n_removed": n_base - (sel - added)}
                key = (total, -tr.loss)
                if best is None or key > best[0]:
                    best = (key, step, {n: m.clone() for n, m in hard.items()})
                if step == self.steps:
                    history.append(rec)
                    break
                work = ws.apply_soft()
                loss = task_loss(model, train, work)
                if self.l1:
                    loss = loss + self.l1 * ws.soft_mask_sum() / n_eligible
                grads = ws.score_grads(torch.autograd.grad(loss, list(work.values())),
                                       self.l1 / n_eligible)
                gmax = max(max(float(g.max()), -float(g.min())) for g in grads)
                rec["soft_loss"] = float(loss.detach())
                rec["max_grad"] = gmax
                history.append(rec)
                with torch.no_grad():
                    if opt is None:
                        lr = self.lr if self.optimizer == "sgd" else \
                            (self.lr / gmax if gmax > 0 else 0.0)
                        for s, g in zip(scores.values(), grads):
                            s.sub_(g.mul_(lr))
                    else:
                        for s, g in zip(scores.values(), grads):
                            s.grad = g
                        opt.step()
        finally:
            mode.__exit__(None, None, None)
        _, best_step, masks = best
        self.masks_ = {n: m for n, m in masks.items() if bool(m.any())}
        self.values_ = {n: ft_all[n].detach().to(dev)[m] for n, m in self.masks_.items()}
        n_sel = sum(int(m.sum()) for m in self.masks_.values())
        self.result_ = GraftFitResult(self.sparsity, n_sel / n_eligible, n_eligible, n_sel,
                                      n_base, best_step, history)
        self.meta_ = {"fingerprint": pre.fingerprint, "finetuned_fingerprint": ftm.fingerprint,
                      "task": dict(task.spec or {"name": task.name}), "eligible": eligible}
        return self

    # ------------------------------------------------------------ applying
    def _check_fitted(self):
        if not self.masks_ and self.result_ is None:
            raise GraftError("this GraftLocalizer is not fitted; call fit(pre, ft, task) or "
                             "GraftLocalizer.load(path, model) first")

    def _check_model(self, model: torch.nn.Module) -> dict:
        fp, ft_fp = self.meta_.get("fingerprint"), self.meta_.get("finetuned_fingerprint")
        if fp is not None:
            have = model_fingerprint(model)
            if ft_fp and ft_fp.get("scheme") == have.get("scheme") and \
                    fingerprints_match(have, ft_fp) and not fingerprints_match(have, fp):
                raise FingerprintMismatchError(
                    f"this is the fine-tuned model ({have.get('id')}) of this graft; apply the "
                    f"graft to its pre-trained model ({fp.get('id')})")
            check_fingerprint({"fingerprint": fp}, have, "this graft")
        params = dict(model.named_parameters())
        for n, m in self.masks_.items():
            if n not in params or params[n].shape != m.shape:
                raise GraftError(f"mask for {n!r} does not fit this model; apply the graft to "
                                 f"the pre-trained model it was fitted on")
        return params

    @contextlib.contextmanager
    def grafted(self, model):
        """Write the fine-tuned values at the mask into ``model`` (pre-trained) in place;
        restore the exact original values on exit."""
        self._check_fitted()
        m = model.model if isinstance(model, (LoadedModel, FineTuned)) else model
        params = self._check_model(m)
        saved = {}
        try:
            with torch.no_grad():
                for n, mask in self.masks_.items():
                    p = params[n]
                    mask = mask.to(p.device)
                    saved[n] = (mask, p[mask].clone())
                    p[mask] = self.values_[n].to(p.device, p.dtype)
            yield model
        finally:
            with torch.no_grad():
                for n, (mask, old) in saved.items():
                    params[n][mask] = old

    def score(self, pre, task: GraftTask, split: str = "test"):
        """:class:`TaskScore` of the graft on ``split`` of ``task``."""
        lm = _lm(pre)
        data = encode_task_items(getattr(task, split), lm.tokenizer, task.kind, task.label_words,
                                 self.max_length, lm.device, lm.model)
        with self.grafted(lm.model):
            return score_task(lm.model, data, self.batch_size)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Safetensors: ``mask.NAME`` (bool, parameter shape) and ``value.NAME`` (the fine-tuned
        values at the mask) per parameter; metadata carries both models' fingerprints."""
        from skilllens.core.artifacts import save_artifact

        self._check_fitted()
        tensors = {f"mask.{n}": m for n, m in self.masks_.items()}
        tensors.update({f"value.{n}": v for n, v in self.values_.items()})
        cfg = self.get_params()
        cfg["include"], cfg["exclude"] = list(self.include), list(self.exclude)
        meta = {k: v for k, v in self.meta_.items() if k != "fingerprint"}
        save_artifact(path, tensors, {"config": cfg, "result": asdict(self.result_), **meta},
                      kind=KIND, fingerprint=self.meta_.get("fingerprint"))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "GraftLocalizer":
        """Load a mask artifact; with ``model`` (the pre-trained model) the fingerprint and
        shapes are checked and tensors land on its device."""
        from skilllens.core.artifacts import load_artifact

        m = model.model if isinstance(model, (LoadedModel, FineTuned)) else model
        device = next(m.parameters()).device if m is not None else None
        tensors, meta = load_artifact(path, kind=KIND, device=device)  # model: below
        cfg = dict(meta["config"])
        cfg.setdefault("progress", False)  # files written before progress was saved
        obj = cls(**cfg)
        obj.masks_ = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
        obj.values_ = {k[6:]: v for k, v in tensors.items() if k.startswith("value.")}
        if set(obj.masks_) != set(obj.values_):
            raise ArtifactError(f"{path}: masks and values name different parameters; the file "
                                f"is damaged, re-run the localizer")
        for n, v in obj.values_.items():
            if v.numel() != int(obj.masks_[n].sum()):
                raise ArtifactError(f"{path}: {n}: {v.numel()} values for "
                                    f"{int(obj.masks_[n].sum())} mask entries; re-run the "
                                    f"localizer")
        obj.result_ = GraftFitResult(**meta["result"])
        obj.meta_ = {k: meta.get(k) for k in ("fingerprint", "finetuned_fingerprint", "task",
                                              "eligible")}
        if m is not None:
            obj._check_model(m)
        return obj
