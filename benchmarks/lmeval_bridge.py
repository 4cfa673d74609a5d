"""lm-eval's own command line on skilllens edits vs skilllens's own scoring, on the embedded
SmolLM2-135M and the offline ``skilllens_mmlu_redux`` task (no network).

    python benchmarks/lmeval_bridge.py --na audit/na.safetensors --ksd audit/ksd.safetensors

(the artifacts of ``skilllens audit --out audit``). For each edit set it runs
``lm_eval --model skilllens --model_args pretrained=smollm2-135m,edits=... --tasks
skilllens_mmlu_redux --limit N`` (lm-eval's console script, found through
``skilllens-lmeval.pth``) and ``evaluate_multiple_choice`` on the same N questions with the same
edits (``abstainer=ksd``; NA through ``na.applied``), then prints acc of both, the largest
difference of the per-choice log-likelihoods and the abstentions, and appends the table to
``benchmarks/RESULTS.md``. Neuron Adjust draws random values per token in batch order, so with
NA the two harnesses agree in distribution, not draw for draw.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _record import command, record


def run_lm_eval(edits: list[str], limit: int, batch_size: int, out: Path,
                task: str = "skilllens_mmlu_redux") -> tuple[dict, list]:
    exe = shutil.which("lm_eval")
    if exe is None:
        raise SystemExit("lm_eval is not on PATH: pip install -e '.[lmeval]'")
    args = "pretrained=smollm2-135m" + (f",edits={'+'.join(edits)}" if edits else "")
    cmd = [exe, "--model", "skilllens", "--model_args", args, "--tasks", task,
           "--limit", str(limit), "--device", "cpu", "--batch_size", str(batch_size),
           "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl")
               for line in f.read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    metric = "acc,none" if task == "skilllens_mmlu_redux" else "exact_match,none"
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples] \
        if task == "skilllens_mmlu_redux" else [s["filtered_resps"][0] for s in samples]
    return {"acc": res["results"][task][metric], "seconds": secs,
            "command": " ".join(["lm_eval", *cmd[1:]]),
            "abstained": res["config"]["skilllens"]["abstained"]}, lls


def run_skilllens(lm, items, na, ksd, batch_size: int) -> tuple[dict, list]:
    import contextlib

    from skilllens.data import Skill
    from skilllens.eval.multiple_choice import evaluate_multiple_choice

    t = time.perf_counter()
    with na.applied(lm) if na is not None else contextlib.nullcontext():
        sc = evaluate_multiple_choice(lm, Skill("mmlu-redux", items), abstainer=ksd,
                                      batch_size=batch_size, progress=False)
    lls = [r["lls"] or [float("-inf")] * 4 for r in sc.per_item]
    return {"acc": sc.acc, "seconds": time.perf_counter() - t,
            "abstained": sc.n_abstained}, lls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--na", required=True, help="Neuron Adjust artifact (na.safetensors)")
    ap.add_argument("--ksd", required=True, help="KSD artifact (ksd.safetensors)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--gsm8k-limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    import skilllens
    from skilllens.data import load_skill
    from skilllens.unlearning.key_space import KeySpaceDetector
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    lm = skilllens.load_model("smollm2-135m")
    items = list(load_skill("mmlu-redux", None, "eval").items)[:a.limit]
    ksd = KeySpaceDetector.load(a.ksd, model=lm)
    na = NeuronAdjuster.load(a.na, model=lm)
    rows = []
    for name, edits, nav in (("KSD", [a.ksd], None), ("NA + KSD", [a.na, a.ksd], na)):
        with tempfile.TemporaryDirectory() as d:
            le, le_lls = run_lm_eval([str(Path(e).resolve()) for e in edits], a.limit,
                                     a.batch_size, Path(d))
        sl, sl_lls = run_skilllens(lm, items, nav, ksd, a.batch_size)
        finite = [abs(x - y) for p, q in zip(le_lls, sl_lls) for x, y in zip(p, q)
                  if x != float("-inf") or y != float("-inf")]
        rows.append({"edits": name, "lm_eval": le, "skilllens": sl,
                     "max_ll_diff": max(finite) if finite else 0.0,
                     "same_predictions": sum(max(range(4), key=p.__getitem__) ==
                                             max(range(4), key=q.__getitem__)
                                             for p, q in zip(le_lls, sl_lls))})
        print(json.dumps(rows[-1]))
    lines = [f"\n## lm-eval bridge: lm_eval --model skilllens vs skilllens ({time.strftime('%Y-%m-%d')})\n",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch "
             f"{__import__('torch').__version__}. Command: `{command(__file__, argv)}`. "
             f"SmolLM2-135M, float32, first {a.limit} `skilllens_mmlu_redux` questions.\n",
             "| edits | lm_eval acc | skilllens acc | max |ll difference| | same argmax | "
             "abstained (lm_eval ll requests / skilllens questions) | lm_eval s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['edits']} | {r['lm_eval']['acc']:.3f} | {r['skilllens']['acc']:.3f}"
                     f" | {r['max_ll_diff']:.2e} | {r['same_predictions']}/{a.limit} | "
                     f"{r['lm_eval']['abstained']['loglikelihood']} / "
                     f"{r['skilllens']['abstained']} | {r['lm_eval']['seconds']:.0f} |")
    with tempfile.TemporaryDirectory() as d:  # generation: KSD's refusals inside lm-eval
        le, outs = run_lm_eval([str(Path(a.ksd).resolve())], a.gsm8k_limit, a.batch_size,
                               Path(d), task="skilllens_gsm8k")
    from skilllens.eval import evaluate
    from skilllens.unlearning.key_space import REFUSAL
    t = time.perf_counter()
    sc = evaluate(lm, load_skill("gsm8k", None, "eval").head(a.gsm8k_limit), "exact_match", abstainer=ksd, n_shots=0, batch_size=a.batch_size,
                  progress=False)
    refused = sum(str(o).strip() == REFUSAL for o in outs)
    lines += ["", f"GSM8K (`skilllens_gsm8k`, first {a.gsm8k_limit} questions, 0-shot, KSD "
              f"only): lm_eval exact match {le['acc']:.3f} with "
              f"{le['abstained']['generate_until']} refusals ({refused} responses equal to the "
              f"refusal text; {le['seconds']:.0f} s); skilllens `evaluate(metric='exact_match', "
              f"abstainer=ksd, n_shots=0)` {sc.score:.3f} with {sc.n_abstained} abstained "
              f"({time.perf_counter() - t:.0f} s)."]
    rows.append({"edits": "KSD (gsm8k)", "lm_eval": le, "skilllens": {"exact_match": sc.score,
                                                                      "abstained": sc.n_abstained}})
    print(json.dumps(rows[-1]))
    lines.append(f"\nlm_eval commands: `{rows[0]['lm_eval']['command']}`; "
                 f"`{rows[1]['lm_eval']['command']}`; `{rows[2]['lm_eval']['command']}`\n")
    record("\n".join(lines) + "\n", append=not a.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
