"""The skill unlearning audit: probe, fit, evaluate before/after each method, write a report.

``run_audit(AuditConfig(...))`` (CLI: ``skilllens audit``) loads the model, draws disjoint probe
and evaluation items for the forget skill and each retain skill, scores the unmodified model,
fits the requested methods on the probe items (``ksd``: Key Space Detection; ``na``: Neuron
Adjust, one entry per ``na_percent``; ``sp``: Selective Pruning; ``experts``: routing away from
the forget skill's experts, added on mixture-of-experts models together with per-skill routing
statistics in ``results["experts"]``), scores each method, and writes
``results.json``, figures (PNG + SVG, drawn from ``results.json``), ``report.md`` and
``report.html`` into ``out``.

KSD changes neither weights nor activations, so its scores are the baseline item scores with
abstained items set to 0 (the decision itself is a prompt-only forward pass). This is the same
number ``evaluate(..., abstainer=ksd)`` returns, without scoring every kept item a second time.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from skilllens.data import Skill, load_skill, sample_skill
from skilllens.errors import SkillLensError
from skilllens.unlearning.experts import expert_method, expert_report

METHODS = ("ksd", "na", "sp", "experts")
DEFAULT_METHODS = ("ksd", "na", "sp")  # + "experts", added on mixture-of-experts models
DEFAULT_FORGET = "gsm8k"
DEFAULT_RETAIN = ("humaneval", "xquad-en")
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
    ksd_layer: int = -1
    na_percent: list[float] = field(default_factory=lambda: [1.5])
    na_rule: str = "signed"
    sp_percent: float = 1.5
    batch_size: int = 8
    max_length: int = 384
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True

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
        _check_alpha(self.alpha)
        if not 0.0 <= float(self.ksd_max_fpr) < 1.0:
            raise SkillLensError(f"--ksd-max-fpr must be in [0, 1), got {self.ksd_max_fpr}")
        self.na_percent = [check_percent(p, "--na-percent") for p in self.na_percent]
        check_percent(self.sp_percent, "--sp-percent")
        return self


def skill_parts(spec: str, n_probe: int, n_eval: int, seed: int, data_dir=None) -> tuple[Skill, Skill]:
    """Disjoint probe and eval samples of one skill (checked: no shared ids or prompts)."""
    probe = sample_skill(load_skill(spec, data_dir, part="probe"), n_probe, seed)
    evals = sample_skill(load_skill(spec, data_dir, part="eval"), n_eval, seed)
    if {it.id for it in probe} & {it.id for it in evals} or \
            {it.prompt for it in probe} & {it.prompt for it in evals}:
        raise SkillLensError(f"probe and eval items of {spec!r} overlap; use disjoint files")
    return probe, evals


def with_abstention(base, mask: list[bool]):
    """A baseline ``SkillScore`` with the abstained items scored as ``evaluate`` scores them
    (0, or ``abstain_nll`` for NLL; :mod:`skilllens.eval.evaluation`), i.e. what ``evaluate`` returns
    with an abstainer on an unmodified model. Same aggregation code path as ``evaluate``."""
    from skilllens.eval import abstained_row, summarize

    if len(mask) != len(base.per_item):
        raise SkillLensError(f"abstention mask has {len(mask)} entries for "
                             f"{len(base.per_item)} items")
    rows = [{**r, **abstained_row(base.metric, base.abstain_nll), "abstained": True} if a
            else dict(r) for r, a in zip(base.per_item, mask)]
    return summarize(base.skill, base.metric, rows, base.abstain_nll)


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
    from skilllens.eval import evaluate
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

    baseline = timed("baseline", lambda: {s: evaluate(lm, parts[s][1], **ev) for s in names})
    results: dict = {"model": lm.name, "forget": cfg.forget, "retain": list(cfg.retain),
                     "metric": cfg.metric, "relative_definition": relative_definition(cfg.metric),
                     "abstention": ABSTENTION_RULE,
                     "baseline": {s: _score_entry(v) for s, v in baseline.items()},
                     "methods": {}, "neurons": {}}
    methods = results["methods"]

    if "ksd" in cfg.methods:
        ksd = KeySpaceDetector(alpha=cfg.alpha, layer=cfg.ksd_layer, batch_size=cfg.batch_size,
                               max_length=cfg.max_length)

        def ksd_run():
            ksd.fit(lm, parts[cfg.forget][0], progress=cfg.progress)
            if cfg.ksd_calibrate:  # narrow the cube on the retain *probe* items only
                ksd.calibrate_vectors(torch.cat([ksd.query_vectors(lm, parts[s][0])
                                                 for s in cfg.retain]),
                                      max_fpr=cfg.ksd_max_fpr, alpha_max=cfg.alpha)
            vecs = {s: ksd.query_vectors(lm, parts[s][1]) for s in names}
            scores = {s: with_abstention(baseline[s], ksd.inside(vecs[s]).tolist())
                      for s in names}
            report = ksd.report(vecs[cfg.forget], torch.cat([vecs[s] for s in cfg.retain]))
            return scores, report, vecs
        scores, report, vecs = timed("ksd", ksd_run)
        ksd.save(out / "ksd.safetensors")
        entry = {s: _score_entry(v) for s, v in scores.items()}
        methods["ksd"] = {"params": {**ksd.get_params(), "k": ksd.k, "k_exact": ksd.k_exact,
                                     "calibration": ksd.calibration},
                          "scores": entry,
                          "relative": _relative(entry, results["baseline"], cfg.metric),
                          "abstained": {s: v.n_abstained for s, v in scores.items()}}
        results["detector"] = asdict(report)
        methods["ksd"]["alpha_sweep"] = _alpha_sweep(ksd, vecs, baseline, names, cfg.metric)

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
    if fitters:
        retain_probe = combine_skills([parts[s][0] for s in cfg.retain])
        kw = dict(sites=["gate", "key"] + (["routing"] if moe else []), tokens="all",
                  batch_size=cfg.batch_size,
                  max_length=cfg.max_length, progress=cfg.progress,
                  stats=("moments", "abs") + (("positive",) if moe else ()))
        fs, rs = timed("probe_statistics", lambda: (collect(lm, parts[cfg.forget][0], **kw),
                                                    collect(lm, retain_probe, **kw)))
        for name, method in fitters:
            method.fit_stats(fs, rs, lm)
            method.meta = {"forget": cfg.forget, "retain": retain_probe.name}

            def run_method(method=method):
                with method.applied(lm):
                    return {s: evaluate(lm, parts[s][1], **ev) for s in names}
            scores = timed(name, run_method)
            method.save(out / f"{name.replace('%', '')}.safetensors")
            entry = {s: _score_entry(v) for s, v in scores.items()}
            methods[name] = {"params": method.get_params(), "scores": entry,
                             "relative": _relative(entry, results["baseline"], cfg.metric)}
            if name == "experts":
                results["experts"] = expert_report(lm, method, parts, cfg, fs, rs)
            else:
                results["neurons"][name] = _neuron_summary(method, fs, rs)

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
    return results


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
        layers = method.fitted_layers
        flat = [(float(method.scores[layers.index(l), i]), l, int(i))
                for l, idx in method.selected.items() for i in idx]
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


def _copy_stats(sc):
    from skilllens.core.collect import StatsCollection
    return StatsCollection.from_state(sc.state_dict(), dict(sc.meta))


def run_language_matrix(langs: list[str], out: str | os.PathLike, *, model="smollm2-135m",
                        methods=("ksd", "na"), probe_items: int = 16, eval_items: int = 12,
                        alphas=(1.0, 2.0), na_percent: float = 1.5, seed: int = 0,
                        data_dir=None, batch_size: int = 8, max_length: int = 384,
                        progress: bool = True, lm=None, calibrate_max: float | None = 5.0,
                        max_fpr: float = 0.05) -> dict:
    """Forgotten-language x tested-language matrix of relative scores, forgetting each of
    ``langs`` in turn while keeping the others. Baselines, key vectors and per-language
    statistics are computed once and reused (the pooled retain statistics are exact merges).

    Besides the fixed ``alphas``, ``calibrate_max`` adds a row set ``ksd@auto``: per forgotten
    language, alpha is calibrated on the other languages' *probe* items
    (:meth:`KeySpaceDetector.calibrate_vectors`, upper bound ``calibrate_max``)."""
    from skilllens.eval import evaluate, relative
    from skilllens.io import write_json
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.core.models import load_model
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    if len(set(langs)) != len(langs) or len(langs) < 2:
        raise SkillLensError("give at least two different languages, e.g. xquad-en,xquad-de")
    t0 = time.perf_counter()
    lm = lm if lm is not None else load_model(model)
    parts = {s: skill_parts(s, probe_items, eval_items, seed, data_dir) for s in langs}
    ev = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    base = {s: evaluate(lm, parts[s][1], **ev) for s in langs}
    res = {"model": lm.name, "metric": "token_accuracy", "forgotten": list(langs),
           "tested": list(langs), "baseline": {s: base[s].score for s in langs},
           "methods": {}, "detector_auc": {}, "params": {
               "probe_items": probe_items, "eval_items": eval_items, "alphas": list(alphas),
               "na_percent": na_percent, "seed": seed, "max_length": max_length}}
    if "ksd" in methods:
        ksd = KeySpaceDetector(alpha=alphas[0], batch_size=batch_size, max_length=max_length)
        probe_v = {s: ksd.query_vectors(lm, parts[s][0]) for s in langs}
        eval_v = {s: ksd.query_vectors(lm, parts[s][1]) for s in langs}
        ksd_rows = {f"ksd@{a:g}": [] for a in alphas}
        if calibrate_max is not None:
            ksd_rows["ksd@auto"], chosen = [], {}

        def row(alpha: float) -> list[float]:
            return [relative(with_abstention(base[t], ksd.inside(eval_v[t], alpha=alpha)
                                             .tolist()).score, base[t].score) for t in langs]
        for f in langs:  # the cube (m, s, k) depends on the forgotten language, not on alpha
            ksd.fit_vectors(probe_v[f])
            res["detector_auc"][f] = ksd.report(
                eval_v[f], torch.cat([eval_v[t] for t in langs if t != f])).auc
            for a in alphas:
                ksd_rows[f"ksd@{a:g}"].append(row(float(a)))
            if calibrate_max is not None:
                ksd.alpha = float(calibrate_max)
                ksd.calibrate_vectors(torch.cat([probe_v[t] for t in langs if t != f]),
                                      max_fpr=max_fpr)
                chosen[f] = ksd.alpha
                ksd_rows["ksd@auto"].append(row(ksd.alpha))
        res["methods"].update(ksd_rows)
        if calibrate_max is not None:
            res["params"].update(calibrated_alpha=chosen, calibrate_max=calibrate_max,
                                 max_fpr=max_fpr)
    if "na" in methods:
        from skilllens.core.collect import collect
        kw = dict(sites=["gate"], tokens="all", batch_size=batch_size, max_length=max_length,
                  stats=("moments",), progress=progress)
        stats = {s: collect(lm, parts[s][0], **kw) for s in langs}
        rows = []
        for f in langs:
            others = [t for t in langs if t != f]
            pooled = _copy_stats(stats[others[0]])
            for t in others[1:]:
                pooled.merge(stats[t])
            na = NeuronAdjuster(percent=na_percent, seed=seed).fit_stats(stats[f], pooled, lm)
            with na.applied(lm):
                rows.append([relative(evaluate(lm, parts[t][1], **ev).score, base[t].score)
                             for t in langs])
        res["methods"][f"na@{na_percent:g}%"] = rows
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "language_matrix.json", res)
    from skilllens.unlearning.figures import language_matrix
    language_matrix({"language_matrix": res}, out)
    return res
