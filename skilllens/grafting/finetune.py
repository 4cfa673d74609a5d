"""Fine-tuning helper: turn ``theta_pre`` into ``theta_ft`` for a :class:`GraftTask`.

Few-shot (the task's train items, full batch or mini-batches), SGD (the default) or AdamW,
trainable parameters chosen by name patterns (``fnmatch``), and an optional element-wise
``param_masks`` that lets only a known sparse set of entries change (used by the ground-truth
test). The pre-trained model is
never modified: a deep copy is trained, without the hooks installed on it at the time
(:func:`~skilllens.core.models.copy_model`).

>>> from skilllens import load_model
>>> from skilllens.grafting.tasks import build_task
>>> lm = load_model("tiny-llama")
>>> ft = finetune(lm, build_task("synthetic"), FineTuneConfig(steps=2, progress=False))
>>> ft.model is not lm.model
True
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, field

import torch

from skilllens.errors import ArtifactError, DataError
from skilllens.grafting.tasks import GraftTask, encode_task_items, score_task
from skilllens.core.loaded_model import LoadedModel
from skilllens.core.models import copy_model, load_model

#: trainable/eligible by default: everything inside the transformer blocks
DEFAULT_INCLUDE = ("*layers.*", "*.h.*", "*encoder.layer.*")
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*wte*", "*wpe*")


def select_parameters(model: torch.nn.Module, include=DEFAULT_INCLUDE,
                      exclude=DEFAULT_EXCLUDE) -> list[str]:
    """Names of parameters matching any ``include`` and no ``exclude`` pattern (fnmatch)."""
    if isinstance(include, str):
        include = tuple(p for p in include.split(",") if p)
    if isinstance(exclude, str):
        exclude = tuple(p for p in exclude.split(",") if p)
    names = [n for n, _ in model.named_parameters()
             if any(fnmatch.fnmatchcase(n, p) for p in include)
             and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not names:
        sample = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise DataError(f"no parameter matched include={list(include)} exclude={list(exclude)}; "
                        f"parameter names look like: {sample}")
    return names


@dataclass
class FineTuneConfig:
    """``steps`` optimiser steps on the train items (``batch_size=None``: full batch).

    The default is SGD with lr 0.1, the same as ``skilllens localize`` (the paper's choice; on
    SmolLM2-135M lr 0.03-0.1, 30 steps, trains the built-in tasks): SGD updates are
    gradient-shaped and heavy-tailed, so the top-k of ``|theta_ft - theta_pre|`` is informative
    for grafting. ``optimizer="adamw"`` (use a small lr, e.g. 1e-4) moves every trained entry by
    about ``lr`` per step whatever its gradient, which makes ``|ft - pre|`` nearly uniform and
    the grafting base patch close to a random one."""

    steps: int = 30
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    batch_size: int | None = None
    include: tuple = DEFAULT_INCLUDE
    exclude: tuple = DEFAULT_EXCLUDE
    max_length: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise DataError(f"unknown optimizer {self.optimizer!r}; use sgd or adamw")
        if self.steps < 1 or self.lr <= 0:
            raise DataError("steps must be >= 1 and lr > 0")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)


@dataclass
class FineTuned:
    """A fine-tuned copy: ``lm`` (LoadedModel), the trained parameter names and the history."""

    lm: LoadedModel
    trained: list[str]
    config: FineTuneConfig
    task_spec: dict
    losses: list[float] = field(default_factory=list)
    base_fingerprint: dict | None = None
    train_digest: str | None = None  # hash of the train items' ids (stale-result checks)

    @property
    def model(self):
        return self.lm.model

    def save(self, path: str | os.PathLike) -> None:
        """The trained tensors + metadata (config, task, base-model fingerprint)."""
        from skilllens.core.artifacts import save_artifact

        params = dict(self.lm.model.named_parameters())
        save_artifact(path, {n: params[n] for n in self.trained},
                      {"config": asdict(self.config), "task": self.task_spec,
                       "losses": self.losses, "trained": self.trained,
                       "train_digest": self.train_digest},
                      kind="finetuned", fingerprint=self.base_fingerprint)


def load_finetuned(path: str | os.PathLike, base) -> FineTuned:
    """A copy of ``base`` (spec or LoadedModel; must match the saved fingerprint) with the
    saved trained tensors."""
    from skilllens.core.artifacts import load_artifact

    base = load_model(base)
    tensors, meta = load_artifact(path, kind="finetuned", model=base, device=base.device)
    model = copy_model(base.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in params or params[n].shape != t.shape:
                raise ArtifactError(f"{path}: tensor {n!r} does not fit this model; load it onto "
                                    f"the base model it was fine-tuned from")
            params[n].copy_(t)
    cfg = FineTuneConfig(**{k: v for k, v in meta["config"].items()})
    lm = LoadedModel(model, base.tokenizer, type(base.adapter)(model), base.name + "+ft")
    return FineTuned(lm, list(meta["trained"]), cfg, meta["task"], meta.get("losses", []),
                     meta.get("fingerprint"), meta.get("train_digest"))


def finetune(lm, task: GraftTask, config: FineTuneConfig | None = None,
             param_masks: dict[str, torch.Tensor] | None = None) -> FineTuned:
    """Fine-tune a copy of ``lm`` on ``task.train`` (the original stays untouched).

    ``param_masks``: name -> bool tensor; only True entries may change (others are restored
    after every step, so any optimiser keeps them exact). Their names must be trainable.
    """
    from tqdm.auto import tqdm

    config = config or FineTuneConfig()
    lm = load_model(lm)
    base_fp = lm.fingerprint
    model = copy_model(lm.model)
    trained = select_parameters(model, config.include, config.exclude)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trained)
    frozen = {}
    for n, m in (param_masks or {}).items():
        if n not in trained:
            raise DataError(f"param_masks names {n!r}, which is not trainable under "
                            f"include={config.include} exclude={config.exclude}")
        m = m.to(params[n].device, torch.bool)
        frozen[n] = (~m, params[n].detach().clone())
    if param_masks is not None:  # parameters without a mask stay frozen entirely
        for n in trained:
            if n not in frozen:
                params[n].requires_grad_(False)
        trained = [n for n in trained if n in frozen]
    opt_params = [params[n] for n in trained]
    opt = torch.optim.SGD(opt_params, lr=config.lr, weight_decay=config.weight_decay) \
        if config.optimizer == "sgd" else \
        torch.optim.AdamW(opt_params, lr=config.lr, weight_decay=config.weight_decay)
    data = encode_task_items(task.train, lm.tokenizer, task.kind, task.label_words,
                             config.max_length, lm.device, lm.model)
    gen = torch.Generator().manual_seed(config.seed)
    bs = config.batch_size or data.n_items
    losses = []
    from skilllens.grafting.tasks import task_loss

    model.train()
    for _ in tqdm(range(config.steps), desc=f"fine-tune {task.name}", disable=not config.progress):
        idx = torch.randperm(data.n_items, generator=gen)[:bs].sort().values.tolist()
        batch = data if bs >= data.n_items else data.subset(idx)
        loss = task_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, (keep, orig) in frozen.items():
                params[n].copy_(torch.where(keep, orig, params[n]))
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = LoadedModel(model, lm.tokenizer, type(lm.adapter)(model), lm.name + "+ft")
    return FineTuned(out, trained, config, dict(task.spec or {"name": task.name}), losses, base_fp,
                     train_digest(task))


def train_digest(task: GraftTask) -> str:
    """Short hash of the ids of ``task.train`` (which items a fine-tune saw)."""
    import hashlib
    return hashlib.sha256("\n".join(it.id for it in task.train).encode()).hexdigest()[:16]


def evaluate_models(models: dict, task: GraftTask, split: str = "test", max_length: int = 128,
                    batch_size: int = 16) -> dict:
    """``{name: TaskScore}`` for several LoadedModels on one split of ``task``."""
    items = getattr(task, split)
    out = {}
    for name, lm in models.items():
        data = encode_task_items(items, lm.tokenizer, task.kind, task.label_words, max_length,
                                 lm.device, lm.model)
        out[name] = score_task(lm.model, data, batch_size)
    return out
