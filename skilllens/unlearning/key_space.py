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

from skilllens.core.artifacts import check_fingerprint, load_artifact, save_artifact
from skilllens.data import Item, resolve_skills
from skilllens.errors import SkillLensError

K_MAX = 1e4
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


def search_k(vectors: torch.Tensor, m: torch.Tensor, s: torch.Tensor, lo: float = 0.0,
             hi: float = K_MAX, tol: float = 1e-9) -> float:
    """Smallest ``k`` in ``[lo, hi]`` with every row of ``vectors`` inside ``m +- k*s`` (binary
    search; dims with ``s == 0`` are ignored). Raises if even ``hi`` does not contain them."""
    live = s > 0
    dev = (vectors[:, live] - m[live]).abs().double()
    bound = s[live].double()

    def inside(k: float) -> bool:
        return bool((dev <= k * bound).all())

    if not inside(hi):
        raise SkillLensError(f"the probe vectors do not fit in the cube even at k={hi}; the probe "
                             f"set has extreme outliers: remove them or use more probe items")
    for _ in range(200):
        if hi - lo <= tol * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if inside(mid):
            hi = mid
        else:
            lo = mid
    return hi


def exact_k(vectors: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> float:
    """``max over rows and dims with s > 0 of |v - m| / s`` (the closed form of :func:`search_k`)."""
    live = s > 0
    if not live.any():
        return 0.0
    return float(((vectors[:, live].double() - m[live].double()).abs() / s[live].double()).max())


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


class KeySpaceDetector:
    """KSD hypercube at ``site`` (``key``) of ``layer`` (default the last), scaled by ``alpha``.

    Implements the abstainer protocol: ``abstains(lm, items) -> BoolTensor[n]`` from the prompts
    only (one truncated forward pass per batch, no generation).
    """

    def __init__(self, alpha: float = 2.0, layer: int = -1, site: str = "key",
                 batch_size: int = 8, max_length: int = 512):
        self.alpha = _check_alpha(alpha)
        self.layer, self.site = int(layer), site
        self.batch_size, self.max_length = batch_size, max_length
        self.m: torch.Tensor | None = None   # [d_ff] float64
        self.s: torch.Tensor | None = None   # [d_ff] float64
        self.k: float | None = None
        self.k_exact: float | None = None
        self.fingerprint: dict | None = None
        self.meta: dict = {}
        self.calibration: dict | None = None  # set by calibrate(): how alpha was chosen

    def get_params(self) -> dict:
        return {"alpha": self.alpha, "layer": self.layer, "site": self.site,
                "batch_size": self.batch_size, "max_length": self.max_length}

    # -- vectors --
    def query_vectors(self, lm, items, progress: bool = False) -> torch.Tensor:
        """``[n, d_ff]`` key vectors at the last prompt token (a forward pass stopped right after
        the hooked layer; no answer tokens, no generation)."""
        from skilllens.core.collect import collect
        from skilllens.core.models import load_model

        lm = load_model(lm)
        layer = lm.adapter.check_layers([self.layer])[0]
        items = resolve_skills(items).items  # a Skill, items, texts or specs (probe part)
        items = [Item(it.id, it.prompt) for it in items]  # the prompt only: answers never seen
        res = collect(lm, items, sites=[self.site], layers=[layer], tokens="last",
                      batch_size=self.batch_size, max_length=self.max_length, stats=("moments",),
                      store=[(self.site, layer)], progress=progress)
        return res.vectors[(self.site, layer)]

    # -- fitting --
    def fit(self, lm, forget, *, data_dir=None, progress: bool = True) -> "KeySpaceDetector":
        """Probe ``forget`` (spec, Skill, items or texts) and build the cube. Returns ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        skill = resolve_skills(forget, data_dir)  # specs: their probe part
        if len(skill) < 2:
            raise SkillLensError(f"KSD needs at least 2 probe queries to estimate a spread; "
                                 f"{skill.name!r} has {len(skill)}")
        vectors = self.query_vectors(lm, skill.items, progress=progress)
        self.meta = {"forget": skill.name, "forget_hash": skill.digest(), "n_probe": len(skill),
                     "forget_source": skill.source}
        self.fingerprint = lm.fingerprint
        return self.fit_vectors(vectors)

    def fit_vectors(self, vectors: torch.Tensor) -> "KeySpaceDetector":
        """Build the cube from probe vectors ``[n, d]``."""
        from skilllens.stats.neuron_stats import NeuronStats

        if vectors.ndim != 2 or vectors.shape[0] < 2:
            raise SkillLensError("fit_vectors needs a [n >= 2, d] tensor of probe vectors")
        st = NeuronStats(vectors.shape[1], ("moments",), backend="torch").update(vectors.double())
        self.m, self.s = st.mean.cpu().double(), st.std.cpu().double()
        self.k = search_k(vectors, self.m, self.s)
        self.k_exact = exact_k(vectors, self.m, self.s)
        if not math.isclose(self.k, self.k_exact, rel_tol=1e-6, abs_tol=1e-9):
            raise SkillLensError(f"internal check failed: binary-search k={self.k} differs from "
                                 f"the exact k={self.k_exact}")
        return self

    # -- calibration --
    def calibrate(self, lm, retain, *, max_fpr: float = 0.05, margin: float = 0.1,
                  alpha_max: float | None = None, data_dir=None,
                  progress: bool = False) -> "KeySpaceDetector":
        """Choose ``alpha`` from held-out *retain probe* queries (never the evaluation items).

        ``alpha`` becomes ``min(alpha_max, r / (1 + margin))`` where ``r`` is the
        ``(floor(max_fpr * n) + 1)``-th smallest cube score of the retain probe queries, so at
        most a ``max_fpr`` share of them falls inside the cube (``alpha_max`` defaults to the
        current ``alpha``: calibration only ever narrows the cube). The default ``max_fpr`` of
        5% spends half of a 10% retain-loss budget on false detections. Returns ``self``."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
        skill = resolve_skills(retain, data_dir)  # specs and lists of specs: probe parts
        vecs = self.query_vectors(lm, skill.items, progress=progress)
        return self.calibrate_vectors(vecs, max_fpr=max_fpr, margin=margin, alpha_max=alpha_max)

    def calibrate_vectors(self, retain_vectors: torch.Tensor, *, max_fpr: float = 0.05,
                          margin: float = 0.1, alpha_max: float | None = None
                          ) -> "KeySpaceDetector":
        """:meth:`calibrate` on retain probe vectors ``[n, d]``."""
        self._check_fitted()
        if not 0.0 <= float(max_fpr) < 1.0:
            raise SkillLensError(f"max_fpr must be in [0, 1) (the share of retain probe queries "
                                 f"allowed inside the cube), got {max_fpr}")
        if not float(margin) >= 0.0:
            raise SkillLensError(f"margin must be >= 0, got {margin}")
        if retain_vectors.ndim != 2 or retain_vectors.shape[0] == 0:
            raise SkillLensError("calibration needs at least one retain probe query")
        cap = _check_alpha(self.alpha if alpha_max is None else alpha_max)
        r = self.scores(retain_vectors).sort().values
        n_fp = int(math.floor(float(max_fpr) * len(r)))
        if n_fp >= len(r):
            alpha = cap
        else:
            alpha = min(cap, float(r[n_fp]) / (1.0 + float(margin)))
        if not alpha > 0:
            raise SkillLensError("calibration found a retain probe query at the cube's centre "
                                 "(score 0); the forget and retain probes are not separable here")
        self.alpha = alpha
        self.calibration = {"alpha_max": cap, "max_fpr": float(max_fpr), "margin": float(margin),
                            "n_retain_probe": len(r), "alpha": alpha,
                            "retain_probe_fpr": float((r <= alpha).double().mean()),
                            "min_retain_probe_score": float(r[0])}
        return self

    # -- decisions --
    def _check_fitted(self):
        if self.m is None:
            raise SkillLensError("KeySpaceDetector is not fitted: call fit(lm, forget) or "
                                 "KeySpaceDetector.load(path, model) first")

    @property
    def n_degenerate_dims(self) -> int:
        self._check_fitted()
        return int((self.s <= 0).sum())

    def normalized_deviation(self, vectors: torch.Tensor) -> torch.Tensor:
        """``|v - m| / (k*s)`` per live dimension: ``[n, d_live]`` (``<= alpha`` = inside)."""
        self._check_fitted()
        live = self.s > 0
        k = max(self.k, 1e-30)
        return (vectors.double()[:, live] - self.m[live]).abs() / (k * self.s[live])

    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[n]`` max normalised deviation; inside the cube iff ``score <= alpha`` (lower = more
        in-skill)."""
        dev = self.normalized_deviation(vectors)
        return dev.max(dim=1).values if dev.shape[1] else torch.zeros(dev.shape[0])

    def inside(self, vectors: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        return self.scores(vectors) <= (self.alpha if alpha is None else _check_alpha(alpha))

    def abstains(self, lm, items) -> torch.Tensor:
        """``BoolTensor[n]``: True where the prompt's key vector lies inside the cube."""
        self._check_fitted()
        self._check_model(lm)
        items = list(items)
        if not items:
            return torch.zeros(0, dtype=torch.bool)
        return self.inside(self.query_vectors(lm, items))

    def _check_model(self, lm):
        from skilllens.core.models import load_model
        if self.fingerprint is not None:
            check_fingerprint({"fingerprint": self.fingerprint}, load_model(lm),
                              "this KeySpaceDetector")

    def generate(self, lm, prompts: list[str], max_new_tokens: int = 32,
                 refusal: str = REFUSAL) -> list[str]:
        """Greedy answers (batched, returned in prompt order); prompts inside the cube get
        ``refusal`` and are never generated."""
        from skilllens.core.models import load_model

        lm = load_model(lm)
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
        live_dims = torch.nonzero(self.s > 0).flatten()
        outside = self.normalized_deviation(retain_vectors) > self.alpha   # [n_r, d_live]
        per_dim = outside.sum(0)
        order = torch.argsort(per_dim, descending=True, stable=True)[:top_dims]
        top = [{"dim": int(live_dims[i]), "n_rejected": int(per_dim[i])} for i in order
               if per_dim[i] > 0]
        finite = lambda v: float(v) if math.isfinite(float(v)) else 1e308  # noqa: E731
        return DetectorReport(
            alpha=self.alpha, k=float(self.k), auc=auc,
            fpr=float((r <= self.alpha).double().mean()), tpr=float((f <= self.alpha).double().mean()),
            n_forget=len(f), n_retain=len(r), roc_fpr=fpr.tolist(), roc_tpr=tpr.tolist(),
            roc_thresholds=[finite(-t) for t in thr], forget_scores=f.tolist(),
            retain_scores=r.tolist(), retain_rejecting_dims=outside.sum(1).tolist(),
            top_deciding_dims=top, n_degenerate_dims=self.n_degenerate_dims)

    def evaluate_detection(self, lm, forget_items, retain_items, top_dims: int = 20) -> DetectorReport:
        """:meth:`report` on the key vectors of held-out forget and retain queries."""
        return self.report(self.query_vectors(lm, list(forget_items)),
                           self.query_vectors(lm, list(retain_items)), top_dims)

    # -- persistence --
    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        meta = {"params": self.get_params(), "k": self.k, "k_exact": self.k_exact, **self.meta,
                "calibration": self.calibration}
        return save_artifact(path, {"m": self.m, "s": self.s}, meta, kind="key_space",
                             fingerprint=self.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "KeySpaceDetector":
        """Load a saved detector; with ``model`` its fingerprint must match."""
        tensors, meta = load_artifact(path, kind="key_space", model=model)
        obj = cls(**meta["params"])
        obj.m, obj.s = tensors["m"].double(), tensors["s"].double()
        obj.k, obj.k_exact, obj.fingerprint = meta["k"], meta["k_exact"], meta.get("fingerprint")
        obj.meta = {k: meta[k] for k in ("forget", "forget_hash", "n_probe") if k in meta}
        obj.calibration = meta.get("calibration")
        return obj

    def __repr__(self) -> str:
        state = f"k={self.k:.4g}" if self.k is not None else "not fitted"
        return f"KeySpaceDetector(alpha={self.alpha}, layer={self.layer}, {state})"
