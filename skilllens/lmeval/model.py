"""The ``skilllens`` model type for lm-evaluation-harness 0.4 (``pip install skilllens[lmeval]``).

``SkillLensLM`` is lm-eval's own ``hf`` model (``HFLM``) over a skilllens ``LoadedModel``, with
skilllens edits active during every request: with no edit its numbers are the ``hf`` model
type's on the same weights (tested). Edits are saved artifacts (``edits=`` paths, loaded by
kind, fingerprint-checked: :mod:`skilllens.lmeval.edits`) or fitted objects (``methods=``).

Abstention (a KSD detector among the edits; Li et al. 2025): each request's context (the text
lm-eval sends, few-shot examples included) is shown to every abstainer; if one abstains:

* ``generate_until`` returns the refusal (``refusal=``, default KSD's ``"I cannot help with
  that."``); nothing is generated.
* ``loglikelihood`` returns ``(-inf, False)`` for every continuation of that context: the model
  puts no probability on any answer and none is greedy. Any metric built on log-likelihoods
  therefore scores it as badly as possible (perplexity infinite, ``acc`` of lambada-style
  tasks 0). For multiple choice, the tasks shipped with skilllens
  (``skilllens_mmlu_redux``) count an all-``-inf`` question as wrong, like every skilllens
  metric; lm-eval's own multiple-choice tasks break the all-equal tie by taking the first
  choice, so there an abstained question scores what always answering "A" scores (chance by
  position), never what the edited model's knowledge would earn.
* ``loglikelihood_rolling`` returns ``-inf``.

The counts go into lm-eval's results under ``config.skilllens`` (``get_model_info``).
Numbers with Neuron Adjust depend on the random draws, which depend on batch composition: an NA
score is reproducible under the same batch size and items, not equal across harnesses.
"""
from __future__ import annotations

import math
from pathlib import Path

from skilllens.errors import SkillLensError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - the optional extra
    raise SkillLensError("the lm-eval bridge needs lm-evaluation-harness 0.4: pip install "
                         "'skilllens[lmeval]' (or 'lm-eval>=0.4,<0.5')") from e

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@register_model("skilllens")
class SkillLensLM(HFLM):
    """lm-eval model over ``pretrained`` (any :func:`skilllens.load_model` spec) or ``lm`` (a
    ``LoadedModel``), with ``edits`` (artifact paths, ``a.safetensors+b.safetensors`` on the
    command line) and ``methods`` (fitted objects) applied. Raises FingerprintMismatchError when
    an artifact belongs to another model."""

    def __init__(self, pretrained: str = "smollm2-135m", edits=None, *, lm=None, methods=(),
                 refusal: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size=1, max_length: int | None = None,
                 **kwargs):
        from skilllens.core.models import load_model
        from skilllens.lmeval.edits import is_abstainer, load_edit, parse_edits
        from skilllens.unlearning.key_space import REFUSAL

        kwargs.pop("max_batch_size", None)
        if lm is None:
            import torch
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "auto"  # lm_eval's --device defaults to cuda; run where we can
            lm = load_model(pretrained, device=device or "auto", dtype=dtype)
        self.skilllens_lm = lm
        self.edit_paths = parse_edits(edits)
        self.edits = [load_edit(p, lm) for p in self.edit_paths] + list(methods or ())
        self.abstainers = [e for e in self.edits if is_abstainer(e)]
        for e in self.abstainers:
            e.applied(lm).__enter__()  # KSD's applied() checks the fingerprint, changes nothing
        self.refusal = REFUSAL if refusal is None else refusal
        self.n_abstained = {"loglikelihood": 0, "loglikelihood_rolling": 0,
                            "generate_until": 0}
        self.n_requests = dict.fromkeys(self.n_abstained, 0)
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, backend="causal",
                         batch_size=int(batch_size) if str(batch_size).isdigit() else batch_size,
                         max_length=max_length, **kwargs)

    # ---- abstention and edits ---------------------------------------------------------------
    def abstained(self, contexts: list[str]) -> list[bool]:
        """Whether any abstainer abstains on each context (decided once per distinct text)."""
        if not self.abstainers:
            return [False] * len(contexts)
        import torch

        from skilllens.data import Item

        distinct = sorted({c for c in contexts if c.strip()})
        items = [Item(f"lm-eval/{i}", c) for i, c in enumerate(distinct)]
        hit = torch.zeros(len(items), dtype=torch.bool)
        for a in self.abstainers:
            if items:
                hit |= torch.as_tensor(a.abstains(self.skilllens_lm, items))
        decided = dict(zip(distinct, hit.tolist()))
        return [decided.get(c, False) for c in contexts]

    def _run(self, kind: str, requests, fn, abstained_value):
        ab = self.abstained([r.args[0] for r in requests])
        keep = [r for r, a in zip(requests, ab) if not a]
        self.n_requests[kind] += len(requests)
        self.n_abstained[kind] += sum(ab)
        from skilllens.lmeval.edits import applied

        with applied([e for e in self.edits if e not in self.abstainers], self.skilllens_lm):
            got = iter(fn(keep) if keep else [])
        return [abstained_value if a else next(got) for a in ab]

    # ---- lm-eval's request types ------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run("loglikelihood", requests,
                         lambda rs: super(SkillLensLM, self).loglikelihood(rs, disable_tqdm),
                         (-math.inf, False))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run("loglikelihood_rolling", requests,
                         lambda rs: super(SkillLensLM, self).loglikelihood_rolling(
                             rs, disable_tqdm), -math.inf)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run("generate_until", requests,
                         lambda rs: super(SkillLensLM, self).generate_until(rs, disable_tqdm),
                         self.refusal)

    def get_model_info(self) -> dict:
        try:
            info = super().get_model_info()
        except Exception:  # noqa: BLE001 - hf's info needs a hub name; ours is a LoadedModel
            info = {}
        info["skilllens"] = {"model": self.skilllens_lm.name, "edits": self.edit_paths,
                             "methods": [repr(e) for e in self.edits],
                             "abstained": dict(self.n_abstained),
                             "requests": dict(self.n_requests), "refusal": self.refusal}
        return info


def task_manager(include_path=None):
    """lm-eval's ``TaskManager`` that also knows the offline ``skilllens_*`` tasks."""
    from lm_eval.tasks import TaskManager
    paths = [str(TASKS_DIR)] + ([str(p) for p in include_path] if isinstance(
        include_path, (list, tuple)) else [str(include_path)] if include_path else [])
    return TaskManager(include_path=paths)
