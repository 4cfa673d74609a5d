"""``skilllens localize``: find the sparse graft that carries a fine-tuned skill."""
from __future__ import annotations

from skilllens.cli.common import command, load

EXAMPLE = """examples:
  skilllens localize --model tiny-llama --task synthetic --sparsity 0.01 --out runs/synth
  skilllens localize --task xquad-lang --sparsity 1e-3 --include '*layers.2[2-9].mlp.*' \\
      --n-train 8 --ft-optimizer sgd --ft-steps 30 --ft-lr 0.1 --out runs/lang
  skilllens localize --finetuned runs/lang/finetuned.safetensors --sparsity 1e-4 --out runs/lang4

tasks: xquad-lang, xquad-numeric, gsm8k-calc, synthetic. With --task the model is fine-tuned
first (saved as finetuned.safetensors); with --finetuned the task comes from that file. Fine-tune
with SGD (as the paper) for a meaningful base patch: AdamW moves every trained entry by about
its lr per step, so |ft - pre| is nearly uniform and its top-k close to random.
Writes mask.safetensors, results.json ({"sparsity", "recovered_fraction", "scores": {"pre",
"ft", "graft"}, "ece": {...}}), location.png/.svg, scores.png/.svg and report.md."""


def add_parser(sub):
    p = command(sub, "localize", "localize a fine-tuned skill by sparse grafting", __doc__, EXAMPLE)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task to fine-tune on first")
    src.add_argument("--finetuned", help="finetuned.safetensors written by skilllens")
    p.add_argument("--sparsity", type=float, default=1e-4,
                   help="share of eligible parameters in the base patch, in (0, 1)")
    p.add_argument("--include", default="*layers.*,*.h.*",
                   help="eligible (and trainable) parameter name patterns, comma-separated")
    p.add_argument("--exclude", default="*embed*,*lm_head*,*wte*,*wpe*")
    p.add_argument("--steps", type=int, default=20, help="mask optimisation steps")
    p.add_argument("--lr", type=float, default=1e7, help="mask learning rate")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "normalized"],
                   help="score update: sgd = the reference's S -= lr*grad (lr ~1e7); adam; "
                        "normalized = S -= lr*grad/max|grad| (lr ~1-3)")
    p.add_argument("--bias", type=float, default=10.0,
                   help="score bias b of the soft mask (the reference: 10)")
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty on the soft mask")
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--n-dev", type=int, default=8)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--ft-steps", type=int, default=30)
    p.add_argument("--ft-lr", type=float, default=0.1,
                   help="fine-tuning learning rate (default 0.1, for SGD on SmolLM2's MLPs)")
    p.add_argument("--ft-optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd (default, the paper's): gradient-shaped updates, so the top "
                        "|theta_ft - theta_pre| entries carry the skill; adamw moves every "
                        "entry by about lr and leaves a near-random base patch")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder")
    return p


def run(args) -> int:
    from pathlib import Path

    from skilllens.grafting.finetune import (FineTuneConfig, evaluate_models, finetune,
                                             load_finetuned)
    from skilllens.grafting.metrics import (mask_location, plot_mask_location, plot_scores,
                                            recovered_fraction)
    from skilllens.grafting.tasks import build_task
    from skilllens.grafting.localizer import GraftLocalizer
    from skilllens.io import write_json, write_text

    out = Path(args.out)
    lm = load(args)
    include = tuple(x for x in args.include.split(",") if x)
    exclude = tuple(x for x in args.exclude.split(",") if x)
    loc = GraftLocalizer(sparsity=args.sparsity, include=include, exclude=exclude,
                         steps=args.steps, lr=args.lr, optimizer=args.optimizer, l1=args.l1,
                         bias=args.bias,
                         max_length=args.max_length, progress=not args.no_progress)
    if args.finetuned:
        ft = load_finetuned(args.finetuned, lm)
        spec = dict(ft.task_spec)
        task = build_task(spec.pop("name"), args.data_dir, **spec)
    else:
        task = build_task(args.task, args.data_dir, args.n_train, args.n_dev, args.n_test,
                          args.seed)
        ft = finetune(lm, task, FineTuneConfig(
            steps=args.ft_steps, lr=args.ft_lr, optimizer=args.ft_optimizer, include=include,
            exclude=exclude, max_length=args.max_length, seed=args.seed,
            progress=not args.no_progress))
        ft.save(out / "finetuned.safetensors")
    loc.fit(lm, ft, task)
    loc.save(out / "mask.safetensors")
    scores = evaluate_models({"pre": lm, "ft": ft.lm}, task, max_length=args.max_length)
    scores["graft"] = loc.score(lm, task)
    res = {"task": task.name, "model": lm.name, "sparsity": loc.result_.sparsity,
           "sparsity_target": args.sparsity, "n_selected": loc.result_.n_selected,
           "n_eligible": loc.result_.n_eligible,
           "recovered_fraction": recovered_fraction(scores["pre"].score, scores["ft"].score,
                                                    scores["graft"].score),
           "scores": {k: v.score for k, v in scores.items()},
           "ece": {k: v.ece for k, v in scores.items()},
           "loss": {k: v.loss for k, v in scores.items()},
           "n_test": len(task.test), "best_step": loc.result_.best_step,
           "history": loc.result_.history, "location": mask_location(loc.masks_)}
    write_json(out / "results.json", res)
    plot_mask_location(res["location"], out / "location", f"{task.name}: where the graft sits")
    plot_scores({k: {"score": v.score, "ece": v.ece} for k, v in scores.items()},
                out / "scores", f"{task.name} (test, n={len(task.test)})")
    rf = res["recovered_fraction"]
    lines = [f"# Grafting report: {task.name} on {lm.name}", "",
             f"Graft: {res['n_selected']} of {res['n_eligible']} eligible parameters "
             f"(sparsity {res['sparsity']:.3e}, target {args.sparsity:g}); best step "
             f"{res['best_step']} of {args.steps}.", "",
             "| model | score | ECE | loss |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v.score:.4f} | {v.ece:.4f} | {v.loss:.4f} |" for k, v in scores.items()]
    lines += ["", f"Recovered fraction (graft - pre) / (ft - pre): {rf:.3f}", "",
              "![where the graft sits](location.png)", "", "![scores](scores.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    print(f"wrote {out}/mask.safetensors, results.json, report.md: sparsity "
          f"{res['sparsity']:.2e}, scores pre {res['scores']['pre']:.3f} ft "
          f"{res['scores']['ft']:.3f} graft {res['scores']['graft']:.3f}, recovered {rf:.3f}")
    return 0
