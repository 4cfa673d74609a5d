"""Time and peak memory per mask-optimisation step: skilllens vs a reference-style loop.

* ``skilllens``: the step of ``GraftLocalizer.fit``: ``theta_ft - theta_pre`` and the scores
  live on the model's device, ``skilllens.grafting.GraftWorkspace`` writes the soft graft in
  place into one working copy of the eligible tensors (one ``addcmul`` per tensor plus a sparse
  fix-up of the base patch), autograd gives ``dL/dtheta`` for that copy only, and the score
  gradient is formed in place in the sigmoid buffers.
* ``reference``: as in the released code, both model copies stay on the CPU; every step copies
  the pre-trained weights, the fine-tuned weights (to build the graft in the model's parameters)
  and the pre-trained weights again (to restore) to the device, and chains the parameter
  gradient into the scores by hand.

Each variant runs in its own subprocess so that peak memory (CUDA: max allocated; CPU: max RSS
of the process) is its own; the two alternate (``--rounds``) so that load changes hit both.
Same model, data, eligible set, sparsity and updates for both. skilllens computes gradients
for the working copy only; the reference computes them for every parameter, as the released
code does (``--reference-grads all``, default) or only for the eligible ones
(``--reference-grads eligible``, the strictest comparison). Both report a checksum of the final scores and of the rounded
mask (``S > b`` flips of the base patch), which must agree.

    python benchmarks/grafting.py --model smollm2-135m --steps 3 [--rounds 2] [--no-append]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def setup(a):
    import torch

    from skilllens import load_model
    from skilllens.grafting.finetune import select_parameters
    from skilllens.grafting.tasks import build_task, encode_task_items
    from skilllens.grafting import global_topk_masks

    lm = load_model(a.model, device=a.device)
    task = build_task(a.task, None, n_train=a.n_items, n_dev=1, n_test=1)
    data = encode_task_items(task.train, lm.tokenizer, task.kind, task.label_words, 64, lm.device)
    names = select_parameters(lm.model, tuple(a.include.split(",")))
    params = dict(lm.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    # a synthetic fine-tuned copy: small random deltas on every eligible entry (CPU tensors)
    ft_cpu = {n: params[n].detach().cpu() + 1e-3 * torch.randn(params[n].shape, generator=g)
              for n in names}
    pre_cpu = {n: params[n].detach().cpu().clone() for n in names}
    n_el = sum(t.numel() for t in pre_cpu.values())
    base = global_topk_masks({n: (ft_cpu[n] - pre_cpu[n]).abs().to(lm.device) for n in names},
                             max(1, int(a.sparsity * n_el)))
    return lm, data, names, params, pre_cpu, ft_cpu, base


def run_variant(a) -> dict:
    import torch

    from skilllens.grafting.tasks import task_loss
    from skilllens.grafting import soft_graft

    torch.set_num_threads(a.threads)
    lm, data, names, params, pre_cpu, ft_cpu, base = setup(a)
    dev, b, lr = lm.device, 10.0, 1e7
    model = lm.model
    scores = {n: torch.zeros(pre_cpu[n].shape, device=dev) for n in names}
    for p in model.parameters():  # reference "all": as the released code, every parameter
        p.requires_grad_(a.variant == "reference" and a.reference_grads == "all")
    if a.variant == "skilllens":
        from skilllens.grafting import GraftWorkspace

        ws = GraftWorkspace({n: params[n].detach() for n in names},
                            {n: ft_cpu[n].to(dev) - params[n].detach() for n in names}, base, b)
        scores = ws.scores

        def step():  # the same calls as GraftLocalizer.fit's optimisation step (sgd)
            work = ws.apply_soft()
            loss = task_loss(model, data, work)
            grads = ws.score_grads(torch.autograd.grad(loss, list(work.values())))
            with torch.no_grad():
                for s, gr in zip(scores.values(), grads):
                    s.sub_(gr.mul_(lr))
    else:
        for n in names:
            params[n].requires_grad_(True)

        def step():
            pre = {n: pre_cpu[n].to(dev) for n in names}              # copy 1
            ft = {n: ft_cpu[n].to(dev) for n in names}                # copy 2
            with torch.no_grad():
                gam = {n: torch.where(base[n], 1 - torch.sigmoid(scores[n] - b),
                                      torch.sigmoid(scores[n] - b)) for n in names}
                for n in names:
                    params[n].copy_(pre[n] + gam[n] * (ft[n] - pre[n]))
            model.zero_grad(set_to_none=True)
            task_loss(model, data).backward()
            with torch.no_grad():
                for n in names:
                    sig = torch.sigmoid(scores[n] - b)
                    dg = torch.where(base[n], -sig * (1 - sig), sig * (1 - sig))
                    scores[n].sub_(lr * params[n].grad * (ft[n] - pre[n]) * dg)
                restore = {n: pre_cpu[n].to(dev) for n in names}      # copy 3
                for n in names:
                    params[n].copy_(restore[n])

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flips = [(scores[n] > b).reshape(-1).nonzero().squeeze(1) for n in names]
    return {"variant": a.variant, "step_s": sorted(times)[len(times) // 2], "times": times,
            "cpu_times": cpu,
            "score_sum": float(sum(scores[n].double().abs().sum() for n in names)),
            "n_flipped": int(sum(f.numel() for f in flips)),
            "flip_hash": int(sum(int(((f + 1) * (i + 7)).sum()) for i, f in enumerate(flips))),
            "peak_mib": peak, "peak_kind": "cuda max allocated" if dev.type == "cuda"
            else "process max RSS", "n_eligible": sum(t.numel() for t in pre_cpu.values()),
            "device": str(dev)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--task", default="xquad-numeric")
    p.add_argument("--n-items", type=int, default=4)
    p.add_argument("--include", default="*layers.*")
    p.add_argument("--sparsity", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", default="both", choices=["both", "skilllens", "reference"])
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess runs each")
    p.add_argument("--reference-grads", default="all", choices=["all", "eligible"],
                   help="parameters the reference loop computes gradients for: all (as the "
                        "released code: embeddings/LM head too) or only the eligible ones")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args(argv)
    if a.variant != "both":
        print(json.dumps(run_variant(a)))
        return 0
    runs = {"skilllens": [], "reference": []}
    load0 = os.getloadavg()
    for _ in range(a.rounds):  # alternate the variants so that load changes hit both
        for v in runs:
            args = [sys.executable, __file__] + [x for x in (argv or sys.argv[1:])] + \
                ["--variant", v]
            out = subprocess.run(args, capture_output=True, text=True, check=True)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load1 = os.getloadavg()
    res = {v: dict(r[0], step_s=statistics.median(t for x in r for t in x["times"]),
                   best_step_s=min(min(x["times"]) for x in r),
                   cpu_step_s=statistics.median(t for x in r for t in x["cpu_times"]),
                   rounds=[x["times"] for x in r]) for v, r in runs.items()}
    ratio = res["reference"]["step_s"] / res["skilllens"]["step_s"]
    cpu_ratio = res["reference"]["cpu_step_s"] / res["skilllens"]["cpu_step_s"]
    best_ratio = res["reference"]["best_step_s"] / res["skilllens"]["best_step_s"]
    same = len({(x["n_flipped"], x["flip_hash"]) for x in runs["skilllens"] + runs["reference"]}) == 1
    rel = abs(res["skilllens"]["score_sum"] / res["reference"]["score_sum"] - 1)
    summary = {"model": a.model, "task": a.task, "n_items": a.n_items, "include": a.include,
               "n_eligible": res["skilllens"]["n_eligible"], "device": res["skilllens"]["device"],
               "machine": platform.machine(), "threads": a.threads, "results": res,
               "speedup": ratio, "speedup_best": best_ratio, "speedup_cpu_time": cpu_ratio, "same_masks": same,
               "score_sum_rel_diff": rel, "load_avg": [load0[0], load1[0]]}
    lines = [f"| variant | median step (s) | best step (s) | median CPU time per step (s) | peak "
             f"memory (MiB, {res['skilllens']['peak_kind']}) | flipped entries |",
             "|---|---:|---:|---:|---:|---:|"]
    for v in runs:
        lines.append(f"| {v} | {res[v]['step_s']:.3f} | {res[v]['best_step_s']:.3f} | "
                     f"{res[v]['cpu_step_s']:.3f} | {res[v]['peak_mib']:.0f} | "
                     f"{res[v]['n_flipped']} |")
    cmd = "python benchmarks/grafting.py " + " ".join(argv or sys.argv[1:])
    text = (f"\n### Mask-optimisation step, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
            f"{summary['device']} ({os.cpu_count()} cores, {platform.machine()})\n\n"
            f"Command: `{cmd.strip()}` ({summary['n_eligible']:,} eligible parameters, sparsity "
            f"{a.sparsity:g}, {a.n_items} items, {a.threads} thread(s), {a.steps} timed steps x "
            f"{a.rounds} alternating rounds; reference gradients: {a.reference_grads}; "
            f"load average {load0[0]:.2f} before, "
            f"{load1[0]:.2f} after).\n\n" + "\n".join(lines) +
            f"\n\nSpeed-up of skilllens over the reference-style loop: **{ratio:.2f}x** (median "
            f"steps), {best_ratio:.2f}x (best steps), {cpu_ratio:.2f}x (median CPU time per step, "
            f"robust to a shared machine with 1 thread); same rounded masks: {same}; sum |S| "
            f"relative difference {rel:.1e}.\n")
    print(text)
    if a.json:
        from skilllens.io import write_json
        write_json(a.json, summary)
    if not a.no_append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
