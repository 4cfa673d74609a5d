"""The skill unlearning audit: probe, fit, evaluate before/after each method, write a report.

``run_audit(AuditConfig(...))`` (CLI: ``skilllens audit``) loads the model, draws disjoint probe
and evaluation items for the forget skill and each retain skill, scores the unmodified model,
fits the requested methods on the probe items (``ksd``: Key Space Detection; ``na``: Neuron
Adjust, one entry per ``na_percent``; ``sp``: Selective Pruning; ``experts``: routing away from
the forget skill's experts, added on mixture-of-experts models together with per-skill routing
statistics in ``results["experts"]``), scores each method, and writes
``results.json``, figures (PNG + SVG, drawn from ``results.json``), ``report.md`` and
``report.html`` into ``out``.

Fits and KSD's calibration see samples of the probe parts only, scores samples of the eval
parts; ``results.json["data"]`` says which part and how many items of how many each used.
KSD's alpha is calibrated by default (:mod:`skilllens.unlearning.calibration`: searched over
``(0, ksd_alpha_cap]``, largest held-out forget probe catch with at most ``ksd_max_fpr`` of the
retain probes inside, margin ``ksd_margin``); the choice and its curve are in
``methods.ksd.params.calibration``.

KSD changes neither weights nor activations, so its scores are the baseline item scores with
abstained items set to 0 (the decision itself is a prompt-only forward pass). This is the same
number ``evaluate(..., abstainer=ksd)`` returns, without scoring every kept item a second time.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from skilllens.errors import SkillLensError
from skilllens.unlearning.language_matrix import run_language_matrix  # noqa: F401  (public here)
from skilllens.unlearning.parts import skill_parts, with_abstention  # noqa: F401
from skilllens.unlearning.experts import expert_method, expert_report

METHODS = ("ksd", "na", "sp", "experts")
DEFAULT_METHODS = ("ksd", "na", "sp")  # + "experts", added on mixture-of-experts models
DEFAULT_FORGET = "gsm8k"
DEFAULT_RETAIN = ("humaneval", "xquad-en", "mmlu-redux")
ABSTENTION_RULE = ("an abstained item counts in every mean: score 0 (token accuracy and "
                   "generation metrics), NLL log(V) nats/token (nll; the uniform distribution)")


@dataclass
class AuditConfig:
    """Everything an audit depends on (goes into ``results.json`` and the manifest)."""

    model: str = "smollm2-135m"
    forget: str = DEFAULT_FORGET
    retain: list[str] = field(default_factory=lambda: list(DEFAULT_RETAIN))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    probe_items: int = 48
    eval_items: int = 24
    out: str = "audit"
    data_dir: str | None = None
    metric: str = "token_accuracy"
    seed: int = 0
    alpha: float = 2.0
    ksd_calibrate: bool = True
    ksd_max_fpr: float = 0.05
    ksd_alpha_cap: float = 100.0
    ksd_margin: float = 0.1
    ksd_layer: int = -1
    na_percent: list[float] = field(default_factory=lambda: [1.5])
    na_rule: str = "signed"
    sp_percent: float = 1.5
    batch_size: int = 8
    max_length: int = 384
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True
    neuron_views: int = 2  # neurons per method shown in the report (0: none)
    neuron_view_items: int = 12  # probe items per skill the neuron views read

    def check(self) -> "AuditConfig":
        from skilllens.unlearning.key_space import _check_alpha
        from skilllens.unlearning.selection import check_percent

        self.retain = [r for r in self.retain if r]
        if not self.retain:
            raise SkillLensError("no retain skill: pass --retain SKILL[,SKILL...]")
        if self.forget in self.retain:
            raise SkillLensError(f"{self.forget!r} is both the forget skill and a retain skill; "
                                 f"drop it from --retain")
        if len(set(self.retain)) != len(self.retain):
            raise SkillLensError(f"--retain names a skill twice: {self.retain}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise SkillLensError(f"unknown method(s) {unknown or self.methods}; choose from "
                                 f"{','.join(METHODS)}")
        if self.probe_items < 2 or self.eval_items < 1:
            raise SkillLensError("--probe-items must be >= 2 and --eval-items >= 1")
        if self.neuron_views < 0 or self.neuron_view_items < 1:
            raise SkillLensError("--neuron-views must be >= 0 and --neuron-view-items >= 1")
        _check_alpha(self.alpha)
        _check_alpha(self.ksd_alpha_cap)
        if not float(self.ksd_margin) >= 0.0:
            raise SkillLensError(f"--ksd-margin must be >= 0, got {self.ksd_margin}")
        if not 0.0 <= float(self.ksd_max_fpr) < 1.0:
            raise SkillLensError(f"--ksd-max-fpr must be in [0, 1), got {self.ksd_max_fpr}")
        self.na_percent = [check_percent(p, "--na-percent") for p in self.na_percent]
        check_percent(self.sp_percent, "--sp-percent")
        return self


def _score_entry(s) -> dict:
    return s.to_dict(per_item=False)


def _relative(scores: dict, baseline: dict, metric: str) -> dict:
    """Direction-aware relative score per skill (``< 1``: worse; :func:`evaluation.relative`)."""
    from skilllens.eval import relative
    return {k: relative(v["score"], baseline[k]["score"], metric) for k, v in scores.items()}


def relative_definition(metric: str) -> str:
    """How ``relative`` is computed for ``metric`` (written into results.json)."""
    from skilllens.eval import higher_is_better
    return ("score after / score before" if higher_is_better(metric) else
            "score before / score after (lower is better)") + "; < 1 means worse at the skill"


def _is_language_audit(cfg: AuditConfig) -> bool:
    return all(s.startswith("xquad-") for s in [cfg.forget, *cfg.retain])


def run_audit(cfg: AuditConfig, lm=None) -> dict:
    """Run the audit described by ``cfg``; write everything into ``cfg.out``; return results."""
    from skilllens.core.collect import collect
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.core.models import load_model
    from skilllens.data import combine_skills
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.selective_pruning import SelectivePruner

    cfg.check()
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    lm = lm if lm is not None else load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [cfg.forget, *cfg.retain]
    parts = {s: skill_parts(s, cfg.probe_items, cfg.eval_items, cfg.seed, cfg.data_dir)
             for s in names}
    ev = dict(metric=cfg.metric, batch_size=cfg.batch_size, max_length=cfg.max_length,
              progress=cfg.progress)

    def timed(key, fn):
        t = time.perf_counter()
        res = fn()
        timing[key] = round(time.perf_counter() - t, 2)
        return res

    ksd = KeySpaceDetector(alpha=cfg.alpha, layer=cfg.ksd_layer, batch_size=cfg.batch_size,
                           max_length=cfg.max_length) if "ksd" in cfg.methods else None
    recorders = {}  # KSD's eval queries, read during the baseline pass (core.prompt_recorder)
    if ksd is not None:
        from skilllens.core.prompt_recorder import PromptVectorRecorder
        qkey = (ksd.site, lm.adapter.check_layers([ksd.layer])[0])
        recorders = {s: PromptVectorRecorder(lm, qkey, parts[s][1].items, cfg.max_length,
                                             cfg.batch_size) for s in names}

    from skilllens.unlearning import columns as mcq  # multiple-choice skills (MMLU-Redux)
    mc_names = mcq.multiple_choice_skills({s: parts[s] for s in cfg.retain})
    baseline, mc_base = timed("baseline", lambda: mcq.score_skills(lm, parts, names, mc_names,
                                                                   ev, recorders))
    results: dict = {"model": lm.name, "forget": cfg.forget, "retain": list(cfg.retain),
                     "metric": cfg.metric, "relative_definition": relative_definition(cfg.metric),
                     "abstention": ABSTENTION_RULE,
                     "data": {s: {"probe": p.describe(), "eval": e.describe(),
                                  "n_probe": len(p), "n_eval": len(e), "counts": p.counts}
                              for s, (p, e) in parts.items()},
                     "baseline": {s: _score_entry(v) for s, v in baseline.items()},
                     "methods": {}, "neurons": {}}
    from skilllens.eval.scores import baseline_warnings
    results["warnings"] = baseline_warnings(baseline, {s: parts[s][1] for s in names})
    for w in results["warnings"]:  # at/near 0 or at chance: relative says nothing
        warnings.warn(w, RuntimeWarning, stacklevel=2)
    if mc_names:
        from skilllens.eval.multiple_choice import CHANCE
        results["multiple_choice"] = {"chance": CHANCE, "baseline": mcq.entry(mc_base),
                                      "methods": {}}
    methods = results["methods"]

    fitters = []
    if "na" in cfg.methods:
        for p in cfg.na_percent:
            name = "na" if len(cfg.na_percent) == 1 else f"na-{p:g}%"
            fitters.append((name, NeuronAdjuster(percent=p, rule=cfg.na_rule, seed=cfg.seed,
                                                 batch_size=cfg.batch_size,
                                                 max_length=cfg.max_length)))
    if "sp" in cfg.methods:
        fitters.append(("sp", SelectivePruner(percent=cfg.sp_percent, batch_size=cfg.batch_size,
                                              max_length=cfg.max_length)))
    moe = bool(getattr(lm.adapter, "moe_layers", None))
    if "experts" in cfg.methods or moe:
        fitters.append(("experts", expert_method(lm, cfg)))
    probe_vecs = None  # KSD's probe queries, read from the statistics pass when there is one
    if fitters:
        retain_probe = combine_skills([parts[s][0] for s in cfg.retain])
        kw = dict(sites=["gate", "key"] + (["routing"] if moe else []), tokens="all",
                  batch_size=cfg.batch_size,
                  max_length=cfg.max_length, progress=cfg.progress,
                  stats=("moments", "abs") + (("positive",) if moe else ()))
        if ksd is not None:  # the last-prompt-token keys = a prompt-only pass (core.prompt_vectors)
            kw["sites"] += [] if ksd.site in kw["sites"] else [ksd.site]
            kw.update(store=[qkey], store_tokens="last")
        fs, rs = timed("probe_statistics", lambda: (collect(lm, parts[cfg.forget][0], **kw),
                                                    collect(lm, retain_probe, **kw)))
        if ksd is not None:
            probe_vecs = fs.vectors.pop(qkey), rs.vectors.pop(qkey)

    if ksd is not None:
        def ksd_run():
            ksd.fit(lm, parts[cfg.forget][0], progress=cfg.progress,
                    vectors=probe_vecs[0] if probe_vecs else None)
            if cfg.ksd_calibrate:  # alpha from the forget and retain *probe* items only
                ksd.calibrate_vectors(probe_vecs[1] if probe_vecs else
                                      torch.cat([ksd.query_vectors(lm, parts[s][0])
                                                 for s in cfg.retain]),
                                      max_fpr=cfg.ksd_max_fpr, margin=cfg.ksd_margin,
                                      alpha_max=cfg.ksd_alpha_cap)
            vecs = {s: recorders[s].vectors() for s in names}
            scores = {s: with_abstention(baseline[s], ksd.inside(vecs[s]).tolist())
                      for s in names}
            report = ksd.report(vecs[cfg.forget], torch.cat([vecs[s] for s in cfg.retain]))
            return scores, report, vecs
        scores, report, vecs = timed("ksd", ksd_run)
        ksd.save(out / "ksd.safetensors")
        entry = {s: _score_entry(v) for s, v in scores.items()}
        methods["ksd"] = {"params": {**ksd.get_params(), "k": ksd.k_, "k_exact": ksd.k_exact_,
                                     "calibration": ksd.calibration_},
                          "scores": entry,
                          "relative": _relative(entry, results["baseline"], cfg.metric),
                          "abstained": {s: v.n_abstained for s, v in scores.items()}}
        results["detector"] = asdict(report)
        if mc_names:
            from skilllens.eval.multiple_choice import with_abstention as mc_abstain
            results["multiple_choice"]["methods"]["ksd"] = mcq.entry(
                {s: mc_abstain(mc_base[s], ksd.inside(vecs[s]).tolist()) for s in mc_names},
                mc_base)
        methods["ksd"]["alpha_sweep"] = _alpha_sweep(ksd, vecs, baseline, names, cfg.metric)

    for name, method in fitters:
        method.fit_stats(fs, rs, lm)
        method.meta_ = {"forget": cfg.forget, "retain": retain_probe.name}

        def run_method(method=method):
            with method.applied(lm):
                return mcq.score_skills(lm, parts, names, mc_names, ev)
        scores, mc = timed(name, run_method)
        if mc_names:
            results["multiple_choice"]["methods"][name] = mcq.entry(mc, mc_base)
        method.save(out / f"{name.replace('%', '')}.safetensors")
        entry = {s: _score_entry(v) for s, v in scores.items()}
        methods[name] = {"params": method.get_params(), "scores": entry,
                         "relative": _relative(entry, results["baseline"], cfg.metric)}
        if name == "experts":
            results["experts"] = expert_report(lm, method, parts, cfg, fs, rs)
        else:
            results["neurons"][name] = _neuron_summary(method, fs, rs)

    from skilllens.unlearning.neuron_report import audit_neuron_views
    results["neuron_views"] = timed("neuron_views", lambda: audit_neuron_views(
        lm, dict(fitters), results, {s: parts[s][0] for s in names}, cfg.neuron_views,
        max_items=cfg.neuron_view_items, batch_size=cfg.batch_size,
        max_length=min(cfg.max_length, 256)))
    if _is_language_audit(cfg):
        results["language_matrix"] = {
            "forgotten": [cfg.forget], "tested": names,
            "methods": {m: [[v["relative"][s] for s in names]] for m, v in methods.items()}}
    timing["total"] = round(time.perf_counter() - t_start, 2)
    from skilllens.unlearning.report import manifest, write_report
    results["manifest"] = manifest(cfg, lm, parts, timing)
    from skilllens.io import write_json
    write_json(out / "results.json", results)
    write_report(out)  # figures and report are drawn from the saved results.json
    from skilllens.unlearning.display import AuditResults
    return AuditResults(results)  # a dict; displays as the score and relative tables


ALPHA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


def _alpha_sweep(ksd, vecs: dict, baseline: dict, names: list[str],
                 metric: str = "token_accuracy") -> list[dict]:
    """Relative scores and abstention rates of KSD over a grid of ``alpha`` (exact: KSD leaves
    kept items untouched, so each point is the baseline with the abstained items set to 0)."""
    rows = []
    for a in sorted(set(ALPHA_GRID) | {ksd.alpha}):
        rel, rate = {}, {}
        for s in names:
            inside = ksd.inside(vecs[s], alpha=a).tolist()
            sc = with_abstention(baseline[s], inside)
            rel[s] = _relative({s: {"score": sc.score}}, {s: {"score": baseline[s].score}},
                               metric)[s]
            rate[s] = sum(inside) / max(1, len(inside))
        rows.append({"alpha": a, "relative": rel, "abstention_rate": rate})
    return rows


def _neuron_summary(method, fs, rs, n_top: int = 6) -> dict:
    """Selected neurons per layer and, for the top ones, forget/retain Gaussians (NA) or mean
    |activation| (SP) for the distribution figure."""
    site = method.site
    per_layer = {str(l): n for l, n in method.selected_per_layer().items()}
    top = []
    if hasattr(method, "top_neurons"):
        top = method.top_neurons(n_top)
    else:
        layers = method.fitted_layers_
        flat = [(float(method.scores_[layers.index(l), i]), l, int(i))
                for l, idx in method.selected_.items() for i in idx]
        for score, l, i in sorted(flat, reverse=True)[:n_top]:
            f, r = fs[site, l], rs[site, l]
            top.append({"layer": l, "neuron": i, "score": score,
                        "mu_f": float(f.mean[i]), "sd_f": float(f.std[i]),
                        "mu_r": float(r.mean[i]), "sd_r": float(r.std[i]),
                        "mean_abs_f": float(f.mean_abs[i]), "mean_abs_r": float(r.mean_abs[i])})
    return {"site": site, "per_layer": per_layer, "n_selected": method.n_selected, "top": top}


def parse_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def default_out() -> str:
    return os.path.join("audit", time.strftime("%Y%m%d-%H%M%S"))
