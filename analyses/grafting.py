"""Grafting experiment: fine-tune per task, localize at several sparsities, report.

Reproduces the recovery-vs-sparsity curve, the ECE table (pre / ft / graft) and the task-overlap
heatmap. Each stage is saved under ``--out`` (fine-tuned tensors, masks, ``results.json``) and
re-used when present; ``--figures-only`` redraws everything from the saved ``results.json``.

    python analyses/grafting.py --model smollm2-135m --out runs/grafting
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
from skilllens.finetune import (FineTuneConfig, evaluate_models, finetune,  # noqa: E402
                                load_finetuned)
from skilllens.graft_metrics import (mask_location, overlap_matrix, plot_mask_location,  # noqa
                                     plot_overlap_heatmap, plot_recovery_curve, recovered_fraction)
from skilllens.graft_tasks import build_task  # noqa: E402
from skilllens.grafting import GraftLocalizer  # noqa: E402
from skilllens.io import write_json, write_text  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="xquad-lang,xquad-numeric,gsm8k-calc")
    p.add_argument("--sparsities", default="1e-5,1e-4,1e-3,1e-2")
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-dev", type=int, default=8)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--ft-steps", type=int, default=20)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--graft-steps", type=int, default=8)
    p.add_argument("--graft-lr", type=float, default=1e7)
    p.add_argument("--include", default="*layers.2[2-9].mlp.*",
                   help="trainable = eligible parameter patterns (comma-separated fnmatch)")
    p.add_argument("--exclude", default="*embed*,*lm_head*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings for tests/notebooks")
    p.add_argument("--figures-only", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_dev, a.n_test, a.ft_steps, a.graft_steps = 32, 16, 32, 30, 4
        a.sparsities, a.ft_lr, a.include = "1e-3,1e-2", 3e-3, "*layers.*"
    return a


def run_task(lm, name, a, out: Path) -> dict:
    task = build_task(name, a.data_dir, a.n_train, a.n_dev, a.n_test)
    tdir = out / name
    ft_path = tdir / "finetuned.safetensors"
    t0 = time.time()
    if ft_path.exists():
        ft = load_finetuned(ft_path, lm)
    else:
        ft = finetune(lm, task, FineTuneConfig(steps=a.ft_steps, lr=a.ft_lr,
                                               include=tuple(a.include.split(",")),
                                               exclude=tuple(a.exclude.split(","))))
        ft.save(ft_path)
    t_ft = time.time() - t0
    base = evaluate_models({"pre": lm, "ft": ft.lm}, task)
    points = []
    for s in [float(x) for x in a.sparsities.split(",")]:
        t0 = time.time()
        loc = GraftLocalizer(sparsity=s, steps=a.graft_steps, lr=a.graft_lr,
                             include=tuple(a.include.split(",")),
                             exclude=tuple(a.exclude.split(","))).fit(lm, ft, task)
        loc.save(tdir / f"mask_{s:g}.safetensors")
        g = loc.score(lm, task)
        points.append({"sparsity_target": s, "sparsity": loc.result_.sparsity,
                       "n_selected": loc.result_.n_selected, "n_eligible": loc.result_.n_eligible,
                       "best_step": loc.result_.best_step, "score": g.score, "ece": g.ece,
                       "loss": g.loss, "fit_seconds": time.time() - t0,
                       "recovered_fraction": recovered_fraction(base["pre"].score,
                                                                base["ft"].score, g.score),
                       "location": mask_location(loc.masks_)})
        print(f"{name} sparsity {s:g}: actual {loc.result_.sparsity:.2e}, score {g.score:.3f} "
              f"(pre {base['pre'].score:.3f}, ft {base['ft'].score:.3f}), ece {g.ece:.3f}",
              flush=True)
    return {"task": name, "kind": task.kind, "n_train": len(task.train), "n_dev": len(task.dev),
            "n_test": len(task.test), "finetune_seconds": t_ft, "ft_losses": ft.losses,
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
    rows = ["| task | kind | pre score | ft score | sparsity (actual) | graft score | recovered "
            "| ECE pre | ECE ft | ECE graft |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, r in results["tasks"].items():
        for g in r["grafts"]:
            rf = g["recovered_fraction"]
            rows.append(f"| {t} | {r['kind']} | {r['pre']['score']:.3f} | {r['ft']['score']:.3f} "
                        f"| {g['sparsity']:.2e} | {g['score']:.3f} | "
                        f"{'nan' if math.isnan(rf) else f'{rf:.2f}'} | {r['pre']['ece']:.3f} | "
                        f"{r['ft']['ece']:.3f} | {g['ece']:.3f} |")
    if "overlap" in results:
        o = results["overlap"]
        rows += ["", f"Overlap |g_i & g_j| / |g_j| at sparsity {o.get('sparsity')}:", "",
                 "| i \\ j | " + " | ".join(o["names"]) + " |",
                 "|---|" + "---:|" * len(o["names"])]
        rows += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                 for n, row in zip(o["names"], o["asymmetric"])]
    write_text(out / "table.md", "\n".join(rows) + "\n")


def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out)
    import torch

    torch.set_num_threads(a.threads)
    if a.figures_only:
        figures(json.loads((out / "results.json").read_text()), out)
        return 0
    lm = load_model(a.model)
    tasks = a.tasks.split(",")
    t0 = time.time()
    results = {"model": a.model, "args": vars(a), "tasks": {}}
    for name in tasks:
        results["tasks"][name] = run_task(lm, name, a, out)
        write_json(out / "results.json", results)
    # overlap of the masks at the largest common sparsity
    s = max(float(x) for x in a.sparsities.split(","))
    masks = {t: GraftLocalizer.load(out / t / f"mask_{s:g}.safetensors", lm).masks_
             for t in tasks}
    results["overlap"] = {**overlap_matrix(masks), "sparsity": s}
    results["total_seconds"] = time.time() - t0
    write_json(out / "results.json", results)
    figures(results, out)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
