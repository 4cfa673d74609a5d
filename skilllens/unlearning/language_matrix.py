"""Forgotten-language x tested-language matrix of relative scores (``run_language_matrix``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from skilllens.errors import SkillLensError
from skilllens.unlearning.parts import skill_parts, with_abstention


def _copy_stats(sc):
    from skilllens.core.collect import StatsCollection
    return StatsCollection.from_state(sc.state_dict(), dict(sc.meta))


def run_language_matrix(langs: list[str], out: str | os.PathLike, *, model="smollm2-135m",
                        methods=("ksd", "na"), probe_items: int = 16, eval_items: int = 12,
                        alphas=(1.0, 2.0), na_percent: float = 1.5, seed: int = 0,
                        data_dir=None, batch_size: int = 8, max_length: int = 384,
                        progress: bool = True, lm=None, calibrate_max: float | None = 100.0,
                        max_fpr: float = 0.05) -> dict:
    """Forgotten-language x tested-language matrix of relative scores, forgetting each of
    ``langs`` in turn while keeping the others. Baselines, key vectors and per-language
    statistics are computed once and reused (the pooled retain statistics are exact merges).

    Besides the fixed ``alphas``, ``calibrate_max`` adds a row set ``ksd@auto``: per forgotten
    language, alpha is calibrated on the other languages' *probe* items
    (:meth:`KeySpaceDetector.calibrate_vectors`: held-out catch of its own probe items, at
    most ``max_fpr`` of the others' inside, cap ``calibrate_max``)."""
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
            ksd_rows["ksd@auto"], chosen, cal = [], {}, {}

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
                ksd.calibrate_vectors(torch.cat([probe_v[t] for t in langs if t != f]),
                                      max_fpr=max_fpr, alpha_max=calibrate_max)
                chosen[f] = ksd.alpha
                cal[f] = {k: ksd.calibration_[k] for k in ("alpha_feasible_max",
                                                          "forget_probe_catch",
                                                          "retain_probe_fpr")}
                ksd_rows["ksd@auto"].append(row(ksd.alpha))
        res["methods"].update(ksd_rows)
        if calibrate_max is not None:
            res["params"].update(calibrated_alpha=chosen, calibrate_max=calibrate_max,
                                 max_fpr=max_fpr, calibration=cal)
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
