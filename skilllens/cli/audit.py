"""``skilllens audit``: probe, fit and evaluate training-free unlearning methods; write a report."""
from __future__ import annotations

from skilllens.cli.common import command

EXAMPLE = """examples:
  skilllens audit                                   # smollm2-135m, forget gsm8k, keep humaneval,xquad-en,mmlu-redux
  skilllens audit --forget gsm8k --retain humaneval,xquad-en --methods ksd,na,sp --out runs/gsm8k
  skilllens audit --forget xquad-de --retain xquad-en,xquad-es --methods ksd --alpha 1.5
  skilllens audit --model tiny-llama --probe-items 4 --eval-items 4 --out /tmp/smoke
  skilllens audit --methods na --na-percent 0.5,1.5,3 --out runs/na-tradeoff

DIR receives results.json (baseline and per-method scores, relative performance, detector ROC,
selected neurons, reproducibility manifest), figures/*.png|svg, report.md and report.html."""


def add_parser(sub):
    from skilllens.unlearning.audit import AuditConfig

    d = AuditConfig()
    p = command(sub, "audit", "audit skill unlearning methods (KSD, Neuron Adjust, pruning)",
                __doc__, EXAMPLE, model=False)
    p.add_argument("--model", default=d.model, help=f"model spec (default: {d.model})")
    p.add_argument("--forget", default=d.forget, help=f"skill to forget (default: {d.forget})")
    p.add_argument("--retain", default=",".join(d.retain),
                   help=f"comma-separated skills to keep (default: {','.join(d.retain)})")
    p.add_argument("--methods", default=",".join(d.methods),
                   help="comma-separated subset of ksd,na,sp (default: all); experts "
                   "(routing away from the skill's experts) is added on MoE models")
    p.add_argument("--probe-items", type=int, default=d.probe_items,
                   help=f"probe (fitting) items per skill (default: {d.probe_items})")
    p.add_argument("--eval-items", type=int, default=d.eval_items,
                   help=f"evaluation items per skill (default: {d.eval_items})")
    p.add_argument("--out", default=None, help="output folder (default: audit/DATE-TIME)")
    p.add_argument("--metric", default=d.metric,
                   help="token_accuracy (default), nll, exact_match, pass@1, f1, substring")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="KSD cube scale with --no-ksd-calibrate (default 2.0, the reference's "
                        "GSM8K value); calibration ignores it")
    p.add_argument("--no-ksd-calibrate", dest="ksd_calibrate", action="store_false",
                   help="use --alpha as is (the reference); by default alpha is searched over "
                        "(0, --ksd-alpha-cap] on probe items only: the largest held-out catch of "
                        "forget probe queries with at most --ksd-max-fpr of the retain probe "
                        "queries in the cube")
    p.add_argument("--ksd-max-fpr", type=float, default=d.ksd_max_fpr,
                   help="share of retain probe queries allowed inside the calibrated cube "
                        "(default 0.05)")
    p.add_argument("--ksd-alpha-cap", type=float, default=d.ksd_alpha_cap,
                   help=f"largest alpha calibration may choose (default {d.ksd_alpha_cap:g})")
    p.add_argument("--ksd-margin", type=float, default=d.ksd_margin,
                   help=f"calibration margin: retain probe queries stay a factor 1 + margin "
                        f"outside the cube (default {d.ksd_margin:g})")
    p.add_argument("--na-percent", default=",".join(f"{x:g}" for x in d.na_percent),
                   help="Neuron Adjust percent(s), comma-separated (default 1.5)")
    p.add_argument("--na-rule", default=d.na_rule,
                   choices=["signed", "abs_standardized", "divergence"])
    p.add_argument("--sp-percent", type=float, default=d.sp_percent,
                   help="Selective Pruning percent (default 1.5)")
    p.add_argument("--neuron-views", type=int, default=d.neuron_views,
                   help=f"neurons per method shown in report.html (default {d.neuron_views}; "
                        f"0: none)")
    p.add_argument("--neuron-view-items", type=int, default=d.neuron_view_items,
                   help=f"probe items per skill the neuron views read (default "
                        f"{d.neuron_view_items})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available, else CPU), cpu, cuda ...")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    import sys

    from skilllens.unlearning.audit import AuditConfig, default_out, parse_list, run_audit
    from skilllens.errors import SkillLensError
    from skilllens.core.models import resolve_device

    device = str(resolve_device(args.device))
    print(f"device: {device}", file=sys.stderr)

    try:
        na_percent = [float(x) for x in parse_list(args.na_percent)]
    except ValueError:
        raise SkillLensError(f"--na-percent must be numbers like 0.5,1.5,3; got "
                             f"{args.na_percent!r}") from None
    cfg = AuditConfig(model=args.model, forget=args.forget, retain=parse_list(args.retain),
                      methods=parse_list(args.methods), probe_items=args.probe_items,
                      eval_items=args.eval_items, out=args.out or default_out(),
                      data_dir=args.data_dir, metric=args.metric, seed=args.seed,
                      alpha=args.alpha, ksd_calibrate=args.ksd_calibrate,
                      ksd_max_fpr=args.ksd_max_fpr, ksd_alpha_cap=args.ksd_alpha_cap,
                      ksd_margin=args.ksd_margin, na_percent=na_percent, na_rule=args.na_rule,
                      sp_percent=args.sp_percent, batch_size=args.batch_size,
                      max_length=args.max_length, device=device,
                      neuron_views=args.neuron_views,
                      neuron_view_items=args.neuron_view_items,
                      progress=not args.no_progress)
    res = run_audit(cfg)
    from skilllens.eval.scores import format_relative
    print(f"wrote {cfg.out}/results.json, report.md, report.html "
          f"({res['manifest']['timing_s']['total']:.0f} s)")
    for s, d in res["data"].items():
        print(f"  {s}: fitted on {d['probe']}; scored on {d['eval']}")
    cal = res["methods"].get("ksd", {}).get("params", {}).get("calibration")
    if cal:
        print(f"  ksd: alpha {cal['alpha']:.4g} calibrated on probe items (held-out forget "
              f"probe catch {cal['forget_probe_catch']:.2f}, retain probe FPR "
              f"{cal['retain_probe_fpr']:.3f} <= {cal['max_fpr']:g}; feasible up to "
              f"{cal['alpha_feasible_max']:.4g}, cap {cal['alpha_cap']:g})")
    for m, v in res["methods"].items():
        rel = ", ".join(f"{s} {format_relative(r, res['baseline'][s]['score'])}"
                        for s, r in v["relative"].items())
        print(f"  {m}: relative {rel}")
    from skilllens.unlearning.columns import format_columns
    print("relative performance, the papers' columns (< 1: worse; MMLU: lm-eval acc):")
    print("\n".join(format_columns(res)))
    return 0
