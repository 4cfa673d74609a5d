"""Key Space Detection (Li, Sun & Weng, NAACL 2025, METHODS.md 2b): abstain on queries of the
forget skill, decided from the prompt alone before any generation.

Probe: the ``key`` vector (``d_ff`` neuron coefficients) of the last layer at the last prompt
token of each forget query. Hypercube: per-dimension mean ``m`` and std ``s``; ``k`` is the
smallest scale with every probe vector inside ``m +- k*s`` (binary search on [0, 1e4], checked
against the exact value ``max |v - m| / s``); the cube used is ``m +- alpha*k*s``. A query is in
the forget skill iff its vector lies inside the cube on every dimension.

On a mixture-of-experts layer the probe is the flattened expert-neuron vector (``MoeAdapter``:
expert ``e``'s coefficients at offset ``e``), zero for the experts the token was not routed to,
so the cube also encodes the routing pattern (ARCHITECTURE.md, "Mixture-of-experts models").

Dimensions with ``s == 0`` (every probe vector equal there) cannot scale a cube; they are left
out of the decision and counted in ``n_degenerate_dims``.

Which items: ``fit`` and ``calibrate`` read the *probe* part of a spec (``"gsm8k"``,
``["humaneval", "xquad-en"]``), ``evaluate_detection`` and ``abstains`` the *eval* part
(:func:`skilllens.data.resolve_skills`); ``Skill``s, items and texts are used as given, and a bare
string is a spec, never a sequence of one-character queries. ``calibrate`` chooses ``alpha`` in
``(0, cap]`` from probe queries only (:mod:`skilllens.unlearning.calibration`).

>>> import skilllens
>>> from skilllens.unlearning.key_space import KeySpaceDetector
>>> lm = skilllens.load_model("tiny-llama")
>>> ksd = KeySpaceDetector(alpha=1.0).fit(lm, ["2+2=", "3*3=", "7-1="], progress=False)
>>> ksd.abstains(lm, ["2+2="]).tolist()  # a probe query lies inside the cube
[True]
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skilllens._compat import DeprecatedAlias
from skilllens.core.artifacts import check_fingerprint, load_artifact, save_artifact
from skilllens.data import Item, resolve_skills, sample_skill
from skilllens.errors import DataError, SkillLensError
from skilllens.unlearning.calibration import (ALPHA_CAP, K_MAX, MARGIN, choose_alpha,  # noqa: F401
                                             exact_k, heldout_scores, search_k)

#: artifact metadata keys that are not fit metadata (``meta_``)
_SAVED_STATE = ("params", "k", "k_exact", "calibration", "fingerprint", "kind",
                "skilllens_version", "created", "probe_heldout_scores")
REFUSAL = "I cannot help with that."


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise SkillLensError(f"alpha must be a positive number, got {alpha!r}") from None
    if not a > 0 or math.isinf(a):
        raise SkillLensError(f"alpha must be > 0 (it scales the hypercube; reference values: "
                             f"GSM8K 2.0, MBPP 1.4, languages 0.06), got {alpha}")
    return a


@dataclass
class DetectorReport:
    """How well the cube separates forget from retain queries (JSON-ready)."""

    alpha: float
    k: float
    auc: float
    fpr: float              # retain queries inside the cube at ``alpha``
    tpr: float              # forget queries inside the cube at ``alpha``
    n_forget: int
    n_retain: int
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)
    roc_thresholds: list[float] = field(default_factory=list)  # alpha values of the ROC points
    forget_scores: list[float] = field(default_factory=list)
    retain_scores: list[float] = field(default_factory=list)
    retain_rejecting_dims: list[int] = field(default_factory=list)  # dims rejecting each query
    top_deciding_dims: list[dict] = field(default_factory=list)     # {"dim", "n_rejected"}
    n_degenerate_dims: int = 0

    def __repr__(self) -> str:  # the summary, not every ROC point
        from skilllens.unlearning.display import report_display
        return report_display(self).text

    def _repr_html_(self) -> str:  # ROC curve, AUC, deciding dimensions
        from skilllens.unlearning.display import report_display
        return report_display(self)._repr_html_()


class KeySpaceDetector:
    """KSD hypercube at ``site`` (``key``) of ``layer`` (default the last), scaled by ``alpha``.

    Implements the abstainer protocol: ``abstains(lm, items) -> BoolTensor[n]`` from the prompts
    only (one truncated forward pass per batch, no generation).

    Fitted attributes (scikit-learn convention): ``m_``, ``s_`` (``[d_ff]`` cube centre and
    spread), ``k_``/``k_exact_``, ``calibration_`` (how ``alpha`` was chosen, or None),
    ``fingerprint_``, ``meta_``. The names without ``_`` are deprecated aliases.
    """

    m = DeprecatedAlias("m_")
    s = DeprecatedAlias("s_")
    k = DeprecatedAlias("k_")
    k_exact = DeprecatedAlias("k_exact_")
    calibration = DeprecatedAlias("calibration_")
    fingerprint = DeprecatedAlias("fingerprint_")
    meta = DeprecatedAlias("meta_")

    def __init__(self, alpha: float = 2.0, layer: int = -1, site: str = "key",
                 batch_size: int = 8, max_length: int = 512):
        self.alpha = _check_alpha(alpha)
        self.layer, self.site = int(layer), site
        self.batch_size, self.max_length = batch_size, max_length
        self.m_: torch.Tensor | None = None   # [d_ff] float64
        self.s_: torch.Tensor | None = None   # [d_ff] float64
        self.k_: float | None = None
        self.k_exact_: float | None = None
        self.fingerprint_: dict | None = None
        self.meta_: dict = {}
        self.calibration_: dict | None = None  # set by calibrate(): how alpha was chosen
        self.probe_heldout_scores_: torch.Tensor | None = None  # [n_probe] cross-fitted scores

    def get_params(self) -> dict:
        return {"alpha": self.alpha, "layer": self.layer, "site": self.site,
                "batch_size": self.batch_size, "max_length": self.max_length}

    # -- vectors --
    def query_vectors(self, lm, items, progress: bool = False, *, part: str = "probe",
                      data_dir=None) -> torch.Tensor:
        """``[n, d_ff]`` key vectors at the last prompt token (a forward pass stopped right after
        the hooked layer; no answer tokens, no generation). ``items``: anything
        :func:`~skilllens.data.resolve_skills` takes; a spec gives its ``part``."""
        from skilllens.core.collect import last_prompt_vectors
        from skilllens.core.models import load_model

        lm = load_model(lm)
        key = (self.site, lm.adapter.check_layers([self.layer])[0])
        items = resolve_skills(items, data_dir, part=part).items  # prompts only: answers unseen
        return last_prompt_vectors(lm, items, [key], batch_size=self.batch_size,
                                   max_length=self.max_length, progress=progress)[key]

    # -- fitting --
    def fit(self, lm, forget, *, data_dir=None, progress: bool = True,
            vectors: torch.Tensor | None = None) -> "KeySpaceDetector":
        """Probe ``forget`` (spec: its probe part; Skill, items or texts) and build the cube.
        ``vectors``: the items' query vectors ``[n, d_ff]`` if already computed (e.g.
        ``collect(..., store=[(site, layer)], store_tokens="last")``, which gives exactly
        :meth:`query_vectors`); else a query pass runs. Returns ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        skill = resolve_skills(forget, data_dir, part="probe")
        if len(skill) < 2:
            raise SkillLensError(f"KSD needs at least 2 probe queries to estimate a spread; "
                                 f"{skill.name!r} has {len(skill)}")
        if vectors is None:
            vectors = self.query_vectors(lm, skill.items, progress=progress)
        elif vectors.ndim != 2 or vectors.shape[0] != len(skill):
            raise SkillLensError(f"vectors must be [{len(skill)}, d] (one per probe item of "
                                 f"{skill.name!r}), got {tuple(vectors.shape)}")
        self.meta_ = {"forget": skill.name, "forget_hash": skill.digest(), "n_probe": len(skill),
                     "forget_source": skill.source, "forget_part": skill.describe()}
        self.fingerprint_ = lm.fingerprint
        return self.fit_vectors(vectors)

    def fit_vectors(self, vectors: torch.Tensor) -> "KeySpaceDetector":
        """Build the cube from probe vectors ``[n, d]``; also keeps each probe query's held-out
        score (``probe_heldout_scores_``, K-fold cross-fitted) for :meth:`calibrate`."""
        from skilllens.stats.neuron_stats import NeuronStats

        if vectors.ndim != 2 or vectors.shape[0] < 2:
            raise SkillLensError("fit_vectors needs a [n >= 2, d] tensor of probe vectors")
        st = NeuronStats(vectors.shape[1], ("moments",), backend="torch").update(vectors.double())
        self.m_, self.s_ = st.mean.cpu().double(), st.std.cpu().double()
        self.k_ = search_k(vectors, self.m_, self.s_)
        self.k_exact_ = exact_k(vectors, self.m_, self.s_)
        if not math.isclose(self.k_, self.k_exact_, rel_tol=1e-6, abs_tol=1e-9):
            raise SkillLensError(f"internal check failed: binary-search k={self.k_} differs from "
                                 f"the exact k={self.k_exact_}")
        self.probe_heldout_scores_ = heldout_scores(vectors)
        return self

    # -- calibration --
    def calibrate(self, lm, retain, *, max_fpr: float = 0.05, margin: float = MARGIN,
                  alpha_max: float | None = ALPHA_CAP, data_dir=None,
                  progress: bool = False) -> "KeySpaceDetector":
        """Choose ``alpha`` in ``(0, alpha_max]`` from probe queries only (never evaluation
        items): the largest held-out catch of the forget probe queries subject to at most a
        ``max_fpr`` share of the ``retain`` *probe* queries inside the cube, with ``margin``
        (rule: :mod:`skilllens.unlearning.calibration`). The search goes in both directions
        from the current ``alpha``; ``alpha_max`` (default 100; ``None``: the same) caps it.
        The default ``max_fpr`` of 5% spends half of a 10% retain-loss budget on false
        detections. Sets ``alpha`` and ``calibration`` (the choice and its curve); returns
        ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        skill = resolve_skills(retain, data_dir, part="probe")
        vecs = self.query_vectors(lm, skill.items, progress=progress)
        self.calibrate_vectors(vecs, max_fpr=max_fpr, margin=margin, alpha_max=alpha_max)
        self.calibration_["retain_part"] = skill.describe()
        return self

    def calibrate_vectors(self, retain_vectors: torch.Tensor, *, max_fpr: float = 0.05,
                          margin: float = MARGIN, alpha_max: float | None = ALPHA_CAP
                          ) -> "KeySpaceDetector":
        """:meth:`calibrate` on retain probe vectors ``[n, d]`` (the forget probe queries'
        held-out scores come from the fit)."""
        self._check_fitted()
        if retain_vectors.ndim != 2 or retain_vectors.shape[0] == 0:
            raise SkillLensError("calibration needs at least one retain probe query")
        if self.probe_heldout_scores_ is None:
            raise SkillLensError("this detector has no held-out probe scores (saved by an older "
                                 "version); refit it to calibrate")
        cap = _check_alpha(ALPHA_CAP if alpha_max is None else alpha_max)
        self.calibration_ = choose_alpha(self.probe_heldout_scores_, self.scores(retain_vectors),
                                        max_fpr=max_fpr, margin=margin, cap=cap)
        self.calibration_["alpha_max"] = cap  # the cap, under its old name
        self.alpha = self.calibration_["alpha"]
        return self

    # -- decisions --
    def _check_fitted(self):
        if self.m_ is None:
            raise SkillLensError("KeySpaceDetector is not fitted: call fit(lm, forget) or "
                                 "KeySpaceDetector.load(path, model) first")

    @property
    def n_degenerate_dims(self) -> int:
        self._check_fitted()
        return int((self.s_ <= 0).sum())

    def normalized_deviation(self, vectors: torch.Tensor) -> torch.Tensor:
        """``|v - m| / (k*s)`` per live dimension: ``[n, d_live]`` (``<= alpha`` = inside)."""
        self._check_fitted()
        live = self.s_ > 0
        k = max(self.k_, 1e-30)
        return (vectors.double()[:, live] - self.m_[live]).abs() / (k * self.s_[live])

    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[n]`` max normalised deviation; inside the cube iff ``score <= alpha`` (lower = more
        in-skill)."""
        dev = self.normalized_deviation(vectors)
        return dev.max(dim=1).values if dev.shape[1] else torch.zeros(dev.shape[0])

    def inside(self, vectors: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        return self.scores(vectors) <= (self.alpha if alpha is None else _check_alpha(alpha))

    def abstains(self, lm, items) -> torch.Tensor:
        """``BoolTensor[n]``: True where the prompt's key vector lies inside the cube
        (``items``: items, a Skill, texts, or a spec: its eval part)."""
        self._check_fitted()
        self._check_model(lm)
        if not isinstance(items, (str, Item)) and not hasattr(items, "items"):
            items = list(items)
            if not items:
                return torch.zeros(0, dtype=torch.bool)
        return self.inside(self.query_vectors(lm, items, part="eval"))

    def _check_model(self, lm):
        from skilllens.core.models import load_model
        if self.fingerprint_ is not None:
            check_fingerprint({"fingerprint": self.fingerprint_}, load_model(lm),
                              "this KeySpaceDetector")

    def generate(self, lm, prompts: list[str], max_new_tokens: int = 32,
                 refusal: str = REFUSAL) -> list[str]:
        """Greedy answers (batched, returned in prompt order); prompts inside the cube get
        ``refusal`` and are never generated."""
        from skilllens.core.models import load_model

        if isinstance(prompts, str):
            raise DataError("generate takes a list of prompts; wrap one prompt as [prompt]")
        lm = load_model(lm)
        prompts = list(prompts)
        items = [Item(f"q{i}", p) for i, p in enumerate(prompts)]
        abstain = self.abstains(lm, items).tolist()
        out = [refusal if a else None for a in abstain]
        todo = [i for i, a in enumerate(abstain) if not a]
        if todo:  # batched like every generation path: length-sorted, left-padded, no cut
            from skilllens.eval import generate_texts
            texts = generate_texts(lm, [prompts[i] for i in todo], max_new_tokens=max_new_tokens,
                                   max_length=1 << 30, progress=False, desc="ksd generate")
            for i, text in zip(todo, texts):
                out[i] = text
        return out

    @contextlib.contextmanager
    def applied(self, lm):
        """KSD changes no weights or activations: it acts through ``abstains`` (pass the detector
        as ``abstainer=`` to the evaluation, or use :meth:`generate`). This block only checks
        the detector belongs to ``lm``, for a uniform method API."""
        self._check_fitted()
        self._check_model(lm)
        yield self

    # -- evaluation of the detector --
    def report(self, forget_vectors: torch.Tensor, retain_vectors: torch.Tensor,
               top_dims: int = 20) -> DetectorReport:
        """ROC AUC (forget = positive, score = -deviation), FPR/TPR at ``alpha`` and which dims
        reject the retain queries (scikit-learn ``roc_curve``/``roc_auc_score``)."""
        from sklearn.metrics import roc_auc_score, roc_curve

        f, r = self.scores(forget_vectors), self.scores(retain_vectors)
        if len(f) == 0 or len(r) == 0:
            raise SkillLensError("the detector report needs forget and retain queries")
        y = [1] * len(f) + [0] * len(r)
        sc = (-torch.cat([f, r])).tolist()
        auc = float(roc_auc_score(y, sc))
        fpr, tpr, thr = roc_curve(y, sc)
        live_dims = torch.nonzero(self.s_ > 0).flatten()
        outside = self.normalized_deviation(retain_vectors) > self.alpha   # [n_r, d_live]
        per_dim = outside.sum(0)
        order = torch.argsort(per_dim, descending=True, stable=True)[:top_dims]
        top = [{"dim": int(live_dims[i]), "n_rejected": int(per_dim[i])} for i in order
               if per_dim[i] > 0]
        finite = lambda v: float(v) if math.isfinite(float(v)) else 1e308  # noqa: E731
        return DetectorReport(
            alpha=self.alpha, k=float(self.k_), auc=auc,
            fpr=float((r <= self.alpha).double().mean()), tpr=float((f <= self.alpha).double().mean()),
            n_forget=len(f), n_retain=len(r), roc_fpr=fpr.tolist(), roc_tpr=tpr.tolist(),
            roc_thresholds=[finite(-t) for t in thr], forget_scores=f.tolist(),
            retain_scores=r.tolist(), retain_rejecting_dims=outside.sum(1).tolist(),
            top_deciding_dims=top, n_degenerate_dims=self.n_degenerate_dims)

    def evaluate_detection(self, lm, forget_items, retain_items, top_dims: int = 20, *,
                           max_items: int | None = None, seed: int = 0,
                           data_dir=None) -> DetectorReport:
        """:meth:`report` on the key vectors of held-out forget and retain queries: specs
        (``"gsm8k"``, ``["humaneval", "xquad-en"]``) give their *eval* part, never the probe
        part the cube was fitted on; ``Skill``s, items and texts are used as given.
        ``max_items``: at most that many of each side (seeded sample, ``seed``)."""
        f, r = (sample_skill(resolve_skills(x, data_dir, part="eval"), max_items, seed)
                for x in (forget_items, retain_items))
        return self.report(self.query_vectors(lm, f), self.query_vectors(lm, r), top_dims)

    # -- persistence --
    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        meta = {"params": self.get_params(), "k": self.k_, "k_exact": self.k_exact_, **self.meta_,
                "calibration": self.calibration_,
                "probe_heldout_scores": None if self.probe_heldout_scores_ is None
                else self.probe_heldout_scores_.tolist()}
        return save_artifact(path, {"m": self.m_, "s": self.s_}, meta, kind="key_space",
                             fingerprint=self.fingerprint_)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "KeySpaceDetector":
        """Load a saved detector; with ``model`` its fingerprint must match."""
        tensors, meta = load_artifact(path, kind="key_space", model=model)
        obj = cls(**meta["params"])
        obj.m_, obj.s_ = tensors["m"].double(), tensors["s"].double()
        obj.k_, obj.k_exact_, obj.fingerprint_ = meta["k"], meta["k_exact"], meta.get("fingerprint")
        obj.meta_ = {k: v for k, v in meta.items() if k not in _SAVED_STATE}  # all fit metadata
        obj.calibration_ = meta.get("calibration")
        if meta.get("probe_heldout_scores") is not None:
            obj.probe_heldout_scores_ = torch.tensor(meta["probe_heldout_scores"],
                                                     dtype=torch.float64)
        return obj

    def __repr__(self) -> str:
        state = f"k={self.k_:.4g}" if self.k_ is not None else "not fitted"
        return f"KeySpaceDetector(alpha={self.alpha}, layer={self.layer}, {state})"

    def _repr_html_(self) -> str:  # notebook display: parameters, fitted on, selection
        from skilllens.unlearning.display import detector_display
        return detector_display(self)._repr_html_()
