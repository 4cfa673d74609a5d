"""Grafting experiment: fine-tune per task, localize at several sparsities, report.

Reproduces the recovery-vs-sparsity curve, the ECE table (pre / ft / graft) and the task-overlap
heatmap. Defaults = the recorded run in ``benchmarks/results/grafting``: SGD fine-tuning (as the
paper; lr 0.1, gsm8k-calc 0.03, 30 full-batch steps on 8 items) of the MLPs of layers 22-29,
then the reference's grafting (base patch + 10 plain-SGD score steps, lr 1e7, bias 10, no L1),
scored on 192 held-out items (gsm8k-calc: 96). Everything is saved under ``--out`` (fine-tuned
tensors, which are re-used when present, masks, ``results.json``, ``table.md``, figures);
``--figures-only`` redraws from ``results.json``, ``--confidence`` re-scores the saved models and
masks (mean confidence vs accuracy, ``confidence.json``).

    python analyses/grafting.py --model smollm2-135m --out benchmarks/results/grafting
    python analyses/grafting.py --model tiny-llama --tasks synthetic --quick --out /tmp/g
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skilllens import load_model  # noqa: E402
from skilllens.grafting.finetune import (FineTuneConfig, evaluate_models, finetune,  # noqa: E402
                                         load_finetuned, train_digest)
from skilllens.grafting.metrics import (mask_count, mask_location, overlap_matrix,  # noqa: E402
                                        plot_mask_location, plot_overlap_heatmap,
                                        plot_recovery_curve, recovered_fraction)
from skilllens.grafting.tasks import build_task  # noqa: E402
from skilllens.grafting import GraftLocalizer  # noqa: E402
from skilllens.io import write_json, write_text  # noqa: E402


def per_task(value: str, task: str, cast=float):
    """``"0.1"`` (every task) or ``"xquad-lang=0.1,gsm8k-calc=0.03"`` (per task; a bare value
    in the list is the default for the others)."""
    default, table = None, {}
    for part in str(value).split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            table[k.strip()] = cast(v)
        elif part.strip():
            default = cast(part)
    if task in table:
        return table[task]
    if default is None:
        raise SystemExit(f"no value for task {task!r} in {value!r}")
    return default


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="xquad-lang,xquad-numeric,gsm8k-calc")
    p.add_argument("--sparsities", default="1e-5,1e-4,1e-3,1e-2")
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-dev", type=int, default=8)
    p.add_argument("--n-test", default="192,gsm8k-calc=96",
                   help="int, or per task: name=int,... (generation scoring is costly)")
    p.add_argument("--lang-per-paragraph", type=int, default=3,
                   help="xquad-lang: snippets per paragraph (3 gives 267 held-out items)")
    p.add_argument("--ft-optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="the paper fine-tunes with SGD (gradient-shaped, heavy-tailed updates)")
    p.add_argument("--ft-steps", default="30", help="int, or per task: name=int,...")
    p.add_argument("--ft-lr", default="0.1,gsm8k-calc=0.03",
                   help="float, or per task: name=float,...")
    p.add_argument("--graft-steps", type=int, default=10)
    p.add_argument("--graft-optimizer", default="sgd", choices=["sgd", "adam", "normalized"])
    p.add_argument("--graft-lr", type=float, default=1e7)
    p.add_argument("--graft-l1", type=float, default=0.0)
    p.add_argument("--graft-bias", type=float, default=10.0)
    p.add_argument("--include", default="*layers.2[2-9].mlp.*",
                   help="trainable = eligible parameter patterns (comma-separated fnmatch)")
    p.add_argument("--exclude", default="*embed*,*lm_head*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings for tests/notebooks")
    p.add_argument("--figures-only", action="store_true")
    p.add_argument("--confidence", action="store_true",
                   help="only re-score the saved models and masks: mean confidence vs "
                        "accuracy (confidence.json)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_dev, a.n_test, a.ft_steps, a.graft_steps = 32, 16, "32", "30", 4
        a.sparsities, a.ft_lr, a.include, a.ft_optimizer = "1e-3,1e-2", "3e-3", "*layers.*", \
            "adamw"
    return a


def run_task(lm, name, a, out: Path) -> dict:
    opts = {"per_paragraph": a.lang_per_paragraph} if name == "xquad-lang" and \
        a.lang_per_paragraph != 1 else {}
    task = build_task(name, a.data_dir, a.n_train, a.n_dev, per_task(a.n_test, name, int),
                      **opts)
    tdir = out / name
    ft_path = tdir / "finetuned.safetensors"
    include, exclude = tuple(a.include.split(",")), tuple(a.exclude.split(","))
    cfg = FineTuneConfig(steps=per_task(a.ft_steps, name, int), lr=per_task(a.ft_lr, name),
                         optimizer=a.ft_optimizer, include=include, exclude=exclude)
    t0 = time.time()
    ft = load_finetuned(ft_path, lm) if ft_path.exists() else None
    if ft is not None and (ft.train_digest != train_digest(task) or any(
            getattr(ft.config, k) != getattr(cfg, k)
            for k in ("steps", "lr", "optimizer", "include", "exclude"))):
        print(f"{name}: {ft_path} was fine-tuned on other items or settings; fine-tuning again",
              flush=True)
        ft = None
    if ft is None:
        ft = finetune(lm, task, cfg)
        ft.save(ft_path)
    t_ft = time.time() - t0
    base = evaluate_models({"pre": lm, "ft": ft.lm}, task)
    print(f"{name}: fine-tuned in {t_ft:.0f}s ({ft.config.optimizer} lr {ft.config.lr:g}, "
          f"{ft.config.steps} steps, train loss {ft.losses[0]:.3f} -> {ft.losses[-1]:.3f}); "
          f"test pre {base['pre'].score:.3f} ft {base['ft'].score:.3f}", flush=True)
    points = []
    for s in [float(x) for x in a.sparsities.split(",")]:
        t0 = time.time()
        loc = GraftLocalizer(sparsity=s, steps=a.graft_steps, lr=a.graft_lr,
                             optimizer=a.graft_optimizer, l1=a.graft_l1, bias=a.graft_bias,
                             include=include, exclude=exclude).fit(lm, ft, task)
        loc.save(tdir / f"mask_{s:g}.safetensors")
        g = loc.score(lm, task)
        r = loc.result_
        best, last = r.history[r.best_step], r.history[-1]
        base_only = r.history[0]
        points.append({"sparsity_target": s, "sparsity": r.sparsity, "n_selected": r.n_selected,
                       "n_base": r.n_base, "n_eligible": r.n_eligible, "best_step": r.best_step,
                       "n_added": best["n_added"], "n_removed": best["n_removed"],
                       "n_added_last": last["n_added"], "n_removed_last": last["n_removed"],
                       "base_train_dev": [base_only["train_score"], base_only["dev_score"]],
                       "best_train_dev": [best["train_score"], best["dev_score"]],
                       "score": g.score, "ece": g.ece, "loss": g.loss,
                       "confidence": g.confidence,
                       "fit_seconds": time.time() - t0,
                       "recovered_fraction": recovered_fraction(base["pre"].score,
                                                                base["ft"].score, g.score),
                       "history": r.history, "location": mask_location(loc.masks_)})
        print(f"{name} sparsity {s:g}: actual {r.sparsity:.2e} (best step {r.best_step}, "
              f"+{best['n_added']}/-{best['n_removed']} vs base; last step "
              f"+{last['n_added']}/-{last['n_removed']}), score {g.score:.3f} "
              f"(pre {base['pre'].score:.3f}, ft {base['ft'].score:.3f}), recovered "
              f"{points[-1]['recovered_fraction']:.2f}, ece {g.ece:.3f} (pre "
              f"{base['pre'].ece:.3f}, ft {base['ft'].ece:.3f}), {time.time() - t0:.0f}s",
              flush=True)
    return {"task": name, "kind": task.kind, "n_train": len(task.train), "n_dev": len(task.dev),
            "n_test": len(task.test), "task_spec": task.spec, "finetune": {
                "optimizer": ft.config.optimizer, "lr": ft.config.lr, "steps": ft.config.steps},
            "finetune_seconds": t_ft, "ft_losses": ft.losses,
            "pre": vars(base["pre"]), "ft": vars(base["ft"]), "grafts": points}


def figures(results: dict, out: Path) -> None:
    curves = {t: r["grafts"] for t, r in results["tasks"].items()}
    plot_recovery_curve(curves, out / "recovery_curve")
    if "overlap" in results and len(results["overlap"]["names"]) > 1:
        plot_overlap_heatmap(results["overlap"], out / "overlap_asymmetric", "asymmetric")
        plot_overlap_heatmap(results["overlap"], out / "overlap_jaccard", "jaccard")
    for t, r in results["tasks"].items():
        if r["grafts"]:
            plot_mask_location(r["grafts"][-1]["location"], out / f"location_{t}",
                               f"{t}: graft of {r['grafts'][-1]['sparsity']:.2e}")
    rows = ["Recovery and calibration on held-out test items (score: accuracy for classification, "
            "teacher-forced token accuracy for generation; recovered = (graft - pre) / (ft - pre);"
            " +added/-removed: entries the score optimisation added to / removed from the base "
            "patch at the kept step).", "",
            "| task | kind | n test | pre score | ft score | target sparsity | actual sparsity | "
            "graft entries | +added/-removed | graft score | recovered | ECE pre | ECE ft | "
            "ECE graft |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, r in results["tasks"].items():
        for g in r["grafts"]:
            rf = g["recovered_fraction"]
            rows.append(f"| {t} | {r['kind']} | {r['n_test']} | {r['pre']['score']:.3f} | "
                        f"{r['ft']['score']:.3f} | {g.get('sparsity_target', float('nan')):g} | "
                        f"{g['sparsity']:.2e} | {g['n_selected']} | "
                        f"+{g.get('n_added', 0)}/-{g.get('n_removed', 0)} | {g['score']:.3f} | "
                        f"{'nan' if math.isnan(rf) else f'{rf:.2f}'} | {r['pre']['ece']:.3f} | "
                        f"{r['ft']['ece']:.3f} | {g['ece']:.3f} |")
    for o in results.get("overlaps", []):
        rows += ["", f"Overlap |g_i & g_j| / |g_j| at target sparsity {o.get('sparsity')} "
                 f"(chance, i.e. independent masks: ~{o.get('chance', float('nan')):.2e}):",
                 "", "| i \\ j | " + " | ".join(o["names"]) + " |",
                 "|---|" + "---:|" * len(o["names"])]
        rows += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                 for n, row in zip(o["names"], o["asymmetric"])]
    if "overlaps" not in results and "overlap" in results:
        o = results["overlap"]
        rows += ["", f"Overlap |g_i & g_j| / |g_j| at sparsity {o.get('sparsity')}:", "",
                 "| i \\ j | " + " | ".join(o["names"]) + " |",
                 "|---|" + "---:|" * len(o["names"])]
        rows += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                 for n, row in zip(o["names"], o["asymmetric"])]
    write_text(out / "table.md", "\n".join(rows) + "\n")


def confidence_table(lm, out: Path) -> dict:
    """Mean confidence next to accuracy and ECE of pre / ft / every graft, re-scored from the
    saved fine-tuned tensors and masks (``--confidence``; writes ``confidence.json``)."""
    res = json.loads((out / "results.json").read_text())
    rows = {}
    for t, r in res["tasks"].items():
        spec = dict(r["task_spec"])
        task = build_task(spec.pop("name"), res["args"].get("data_dir"), **spec)
        ft = load_finetuned(out / t / "finetuned.safetensors", lm)
        scores = evaluate_models({"pre": lm, "ft": ft.lm}, task)
        for g in r["grafts"]:
            s = g["sparsity_target"]
            scores[f"graft {s:g}"] = GraftLocalizer.load(out / t / f"mask_{s:g}.safetensors",
                                                         lm).score(lm, task)
        rows[t] = {k: {"score": v.score, "confidence": v.confidence, "ece": v.ece}
                   for k, v in scores.items()}
        print(t, " ".join(f"{k}: acc {v.score:.3f} conf {v.confidence:.3f} ece {v.ece:.3f};"
                          for k, v in scores.items()), flush=True)
    write_json(out / "confidence.json", rows)
    return rows


def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out)
    import torch

    torch.set_num_threads(a.threads)
    if a.figures_only:
        figures(json.loads((out / "results.json").read_text()), out)
        return 0
    lm = load_model(a.model)
    if a.confidence:
        confidence_table(lm, out)
        return 0
    tasks = a.tasks.split(",")
    t0 = time.time()
    results = {"model": a.model, "args": vars(a), "tasks": {}}
    for name in tasks:
        results["tasks"][name] = run_task(lm, name, a, out)
        write_json(out / "results.json", results)
    # overlap of the task masks at every sparsity; the heatmap shows the largest one
    results["overlaps"] = []
    for s in sorted(float(x) for x in a.sparsities.split(",")):
        masks = {t: GraftLocalizer.load(out / t / f"mask_{s:g}.safetensors", lm).masks_
                 for t in tasks}
        n_el = results["tasks"][tasks[0]]["grafts"][0]["n_eligible"]
        chance = sum(mask_count(m) for m in masks.values()) / len(masks) / n_el
        results["overlaps"].append({**overlap_matrix(masks), "sparsity": s, "chance": chance})
    results["overlap"] = results["overlaps"][-1]
    results["total_seconds"] = time.time() - t0
    write_json(out / "results.json", results)
    figures(results, out)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
