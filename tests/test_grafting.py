"""GraftLocalizer: base patch, ground truth recovery, exact restore, artifacts, metrics, CLI."""
import copy
import json

import numpy as np
import pytest
import torch

from skilllens import load_model
from skilllens.errors import FingerprintMismatchError, SkillLensError
from skilllens.grafting.finetune import FineTuneConfig, finetune, select_parameters
from skilllens.grafting.metrics import (expected_calibration_error, mask_location, mask_overlap,
                                        overlap_matrix, precision_recall, recovered_fraction)
from skilllens.grafting.tasks import build_task
from skilllens.grafting import GraftError, GraftLocalizer, global_topk_masks, soft_graft, soft_mask


pytestmark = pytest.mark.usefixtures("one_thread")  # lm, one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def task():
    return build_task("synthetic", n_train=32, n_dev=16, n_test=32)


@pytest.fixture(scope="module")
def ft(lm, task):
    torch.set_num_threads(1)
    return finetune(lm, task, FineTuneConfig(steps=25, lr=3e-3, progress=False))


# ------------------------------------------------------------ base patch

def _reference_topk(values, k):
    flat = np.concatenate([v.double().numpy().ravel() for v in values.values()])
    thr = np.sort(flat)[::-1][k - 1]
    return {n: v.double().numpy() >= thr for n, v in values.items()}


@pytest.mark.parametrize("k", [1, 7, 100, 999])
@pytest.mark.parametrize("max_candidates", [1 << 24, 8])
def test_global_topk_matches_sort_reference(k, max_candidates):
    g = torch.Generator().manual_seed(k)
    values = {"a": torch.rand(30, 20, generator=g) + 0.01, "b": torch.rand(500, generator=g) + 0.01,
              "c": torch.rand(3, 4, 5, generator=g) + 0.01}
    got = global_topk_masks(values, k, max_candidates=max_candidates)
    ref = _reference_topk(values, k)
    assert sum(int(m.sum()) for m in got.values()) == k
    for n in values:
        assert np.array_equal(got[n].numpy(), ref[n]), n


def test_global_topk_ties_and_zeros():
    values = {"a": torch.tensor([3.0, 2.0, 2.0, 0.0]), "b": torch.tensor([2.0, 1.0, 0.0])}
    got = global_topk_masks(values, 3)
    assert sum(int(m.sum()) for m in got.values()) == 3  # exactly k despite the 3-way tie
    assert bool(got["a"][0]) and not bool(got["a"][3])
    zeros = global_topk_masks({"a": torch.tensor([1.0, 0.0, 0.0])}, 2)
    assert zeros["a"].tolist() == [True, False, False]  # unchanged entries are never grafted


# ------------------------------------------------------------ ground truth

def test_ground_truth_sparse_finetune_is_recovered(lm, task):
    """Only a known random 1% of the eligible entries may change; every other entry gets
    float-noise drift, so the localizer must rank by |diff| to find the true set."""
    names = select_parameters(lm.model)
    params = dict(lm.model.named_parameters())
    g = torch.Generator().manual_seed(7)
    truth = {n: torch.rand(params[n].shape, generator=g) < 0.01 for n in names}
    ft = finetune(lm, task, FineTuneConfig(steps=30, lr=1e-2, progress=False),
                  param_masks=truth)
    fparams = dict(ft.model.named_parameters())
    with torch.no_grad():
        for n in names:
            changed = fparams[n] != params[n]
            assert not bool((changed & ~truth[n]).any()), "entries outside the set moved"
            fparams[n].add_(1e-7 * torch.randn(fparams[n].shape, generator=g))
    n_true = sum(int(m.sum()) for m in truth.values())
    n_eligible = sum(params[n].numel() for n in names)
    loc = GraftLocalizer(sparsity=n_true / n_eligible, steps=5, progress=False).fit(lm, ft, task)
    precision, recall = precision_recall(loc.masks_, truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    pre_s = loc.score(lm, task, "test").score
    assert loc.result_.n_eligible == n_eligible
    assert abs(loc.result_.sparsity - n_true / n_eligible) < 0.2 * n_true / n_eligible
    # the graft behaves like the fine-tuned model on held-out items
    from skilllens.grafting.finetune import evaluate_models
    scores = evaluate_models({"ft": ft.lm}, task)
    assert pre_s >= scores["ft"].score - 0.1


# ------------------------------------------------------------ application

def test_grafted_applies_exactly_and_restores(lm, task, ft):
    loc = GraftLocalizer(sparsity=0.02, steps=3, progress=False).fit(lm, ft, task)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    fparams = dict(ft.model.named_parameters())
    assert loc.masks_ and loc.result_.n_selected > 0
    with loc.grafted(lm):
        for n, p in lm.model.named_parameters():
            m = loc.masks_.get(n)
            if m is None:
                assert torch.equal(p, before[n])
            else:  # float64 reference of g*ft + (1-g)*pre
                ref = m.double() * fparams[n].double() + (~m).double() * before[n].double()
                assert torch.equal(p.double(), ref), n
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"
    with pytest.raises(RuntimeError):
        with loc.grafted(lm):
            raise RuntimeError("boom")
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored after an exception"


def test_mask_optimisation_changes_the_mask(lm, task, ft):
    loc = GraftLocalizer(sparsity=1e-3, steps=6, progress=False).fit(lm, ft, task)
    sel = [h["n_selected"] for h in loc.result_.history]
    assert len(sel) == 7 and sel[0] == loc.result_.n_base
    assert len(set(sel)) > 1, "the scores never moved the rounded mask"
    best = loc.result_.history[loc.result_.best_step]
    assert best["n_selected"] == loc.result_.n_selected
    assert all(best["train_score"] + (best["dev_score"] or 0) >=
               h["train_score"] + (h["dev_score"] or 0) for h in loc.result_.history)


def test_soft_graft_gradient():
    g = torch.Generator().manual_seed(0)
    S = (torch.randn(60, generator=g, dtype=torch.float64) * 3 + 8).requires_grad_()
    pre, diff = (torch.randn(60, generator=g, dtype=torch.float64) for _ in range(2))
    base = torch.rand(60, generator=g) < 0.3
    assert torch.autograd.gradcheck(lambda s: soft_graft(s, pre, diff, base, 10.0), (S,))
    gam = soft_mask(torch.zeros(60, dtype=torch.float64), base, 10.0)
    assert bool((gam[base] > 0.99).all()) and bool((gam[~base] < 0.01).all())


@pytest.mark.parametrize("l1", [0.0, 0.3])
def test_workspace_matches_autograd_of_the_soft_graft(l1):
    """The in-place working copy holds the soft graft and turns dL/dtheta into dL/dS exactly as
    autograd does through ``soft_graft`` (float64, random data, two tensors)."""
    from skilllens.grafting import GraftWorkspace

    g = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 5), "b": (11,)}
    pre = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    diff = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    base = {n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}
    w = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    ws = GraftWorkspace(pre, diff, base, 10.0)
    for n, sc in ws.scores.items():
        sc.copy_(torch.randn(shapes[n], generator=g, dtype=torch.float64) * 3 + 9)
    S = {n: sc.clone().requires_grad_() for n, sc in ws.scores.items()}
    soft = {n: soft_graft(S[n], pre[n], diff[n], base[n], 10.0) for n in shapes}
    loss = sum((soft[n] * w[n]).sum() + l1 * soft_mask(S[n], base[n], 10.0).sum() for n in shapes)
    ref = torch.autograd.grad(loss, [S[n] for n in shapes])
    work = ws.apply_soft()
    for n in shapes:
        torch.testing.assert_close(work[n].detach(), soft[n].detach(), rtol=0, atol=0)
    mine_loss = sum((work[n] * w[n]).sum() for n in shapes) + l1 * ws.soft_mask_sum()
    torch.testing.assert_close(mine_loss.detach(), loss.detach(), rtol=1e-12, atol=0)
    grads = ws.score_grads(torch.autograd.grad(mine_loss, list(work.values())), l1)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
    hard = {n: base[n] ^ (torch.rand(shapes[n], generator=g) < 0.2) for n in shapes}
    for n, t in ws.apply_hard(hard).items():
        assert torch.equal(t.detach(), pre[n] + hard[n].double() * diff[n])


def test_graft_loss_gradient_matches_reference_chain_rule(lm, task, ft):
    """d loss / d S from the soft graft equals the reference's hand-written chain
    dL/dtheta * (ft - pre) * d gamma / dS evaluated with the soft graft written into the model."""
    from skilllens.grafting.tasks import encode_task_items, task_loss

    names = select_parameters(lm.model)
    pre = {n: p.detach() for n, p in lm.model.named_parameters() if n in names}
    fp = dict(ft.model.named_parameters())
    diff = {n: (fp[n].detach() - pre[n]).double() for n in names}
    base = global_topk_masks({n: d.abs() for n, d in diff.items()}, 50)
    g = torch.Generator().manual_seed(1)
    scores = {n: (4 * torch.rand(pre[n].shape, generator=g, dtype=torch.float64) + 6)
              .requires_grad_() for n in names}
    data = encode_task_items(task.train, lm.tokenizer, task.kind, task.label_words)
    model = copy.deepcopy(lm.model).double()
    pre64 = {n: p.double() for n, p in pre.items()}
    loss = task_loss(model, data, {n: soft_graft(scores[n], pre64[n], diff[n], base[n], 10.0)
                                   for n in names})
    got = torch.autograd.grad(loss, [scores[n] for n in names])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(pre64[n] + soft_mask(scores[n], base[n], 10.0) * diff[n])
    model.zero_grad()
    task_loss(model, data).backward()
    for n, gs in zip(names, got):
        sig = torch.sigmoid(scores[n].detach() - 10.0)
        dg = torch.where(base[n], -sig * (1 - sig), sig * (1 - sig))
        torch.testing.assert_close(gs, params[n].grad * diff[n] * dg, rtol=1e-6, atol=1e-14)
    assert any(bool((gs != 0).any()) for gs in got)


def test_normalized_update_flips_entries_and_logs_them(lm, task, ft):
    loc = GraftLocalizer(sparsity=1e-3, steps=4, lr=4.0, optimizer="normalized",
                         progress=False).fit(lm, ft, task)
    h = loc.result_.history
    assert h[0]["n_added"] == 0 and h[0]["n_removed"] == 0
    assert all(x["max_grad"] > 0 for x in h[:-1])
    assert h[-1]["n_added"] + h[-1]["n_removed"] > 0  # lr 4 x 3 steps > bias 10
    for x in h:
        assert x["n_selected"] == loc.result_.n_base + x["n_added"] - x["n_removed"]
    with pytest.raises(GraftError, match="unknown optimizer"):
        GraftLocalizer(optimizer="rmsprop")


def test_save_load_roundtrip_and_fingerprints(lm, task, ft, tmp_path):
    loc = GraftLocalizer(sparsity=0.01, steps=2, progress=False).fit(lm, ft, task)
    path = tmp_path / "mask.safetensors"
    loc.save(path)
    from skilllens.core.artifacts import read_metadata
    meta = read_metadata(path)
    assert meta["fingerprint"]["id"] == lm.fingerprint["id"]
    assert meta["finetuned_fingerprint"]["id"] == ft.lm.fingerprint["id"]
    back = GraftLocalizer.load(path, lm)
    assert set(back.masks_) == set(loc.masks_)
    for n in loc.masks_:
        assert back.masks_[n].dtype == torch.bool and torch.equal(back.masks_[n], loc.masks_[n])
        assert torch.equal(back.values_[n], loc.values_[n])
    assert back.score(lm, task).score == loc.score(lm, task).score
    other = copy.deepcopy(lm.model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(FingerprintMismatchError):
        GraftLocalizer.load(path, other)
    with pytest.raises(FingerprintMismatchError):
        with loc.grafted(other):
            pass
    with pytest.raises(SkillLensError):
        GraftLocalizer.load(path, load_model("tiny-mistral").model)


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("s", [0, 1, -0.1, 1.5, "0.1"])
def test_sparsity_out_of_range(s):
    with pytest.raises(GraftError, match="sparsity"):
        GraftLocalizer(sparsity=s)


def test_mismatched_models_name_first_tensor(lm, task):
    gpt2 = load_model("tiny-gpt2")
    with pytest.raises(GraftError, match="model.embed_tokens.weight"):
        GraftLocalizer(steps=0, progress=False).fit(lm, gpt2, task)
    wide = load_model("tiny-llama")
    wide_model = copy.deepcopy(wide.model)
    wide_model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(65, 32))
    with pytest.raises(GraftError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(64, 32\)"):
        GraftLocalizer(steps=0, progress=False).fit(lm, (wide_model, wide.tokenizer), task)


def test_no_eligible_and_identical_models(lm, task, ft):
    with pytest.raises(SkillLensError, match="no parameter matched"):
        GraftLocalizer(include=("*nothing*",), progress=False).fit(lm, ft, task)
    with pytest.raises(GraftError, match="equals the pre-trained"):
        GraftLocalizer(progress=False).fit(lm, lm, task)


# ------------------------------------------------------------ metrics

def test_ece_matches_reference():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, 500)
    corr = rng.uniform(size=500) < conf ** 2
    ref = 0.0
    for b in range(10):
        sel = (conf > b / 10) & (conf <= (b + 1) / 10)
        if sel.any():
            ref += sel.mean() * abs(corr[sel].mean() - conf[sel].mean())
    assert expected_calibration_error(torch.tensor(conf), torch.tensor(corr)) == \
        pytest.approx(ref, abs=1e-12)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.9, 0.9], [False, False]) == pytest.approx(0.9)


def test_recovered_fraction_overlap_location():
    assert recovered_fraction(0.5, 0.9, 0.86) == pytest.approx(0.9)
    assert np.isnan(recovered_fraction(0.5, 0.5, 0.7))
    g = torch.Generator().manual_seed(3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.1.input_layernorm.weight"]
    a = {n: torch.rand(40, 7, generator=g) < 0.3 for n in names}
    b = {n: torch.rand(40, 7, generator=g) < 0.1 for n in names}
    sa = {(n, i) for n in names for i in a[n].reshape(-1).nonzero()[:, 0].tolist()}
    sb = {(n, i) for n in names for i in b[n].reshape(-1).nonzero()[:, 0].tolist()}
    o = mask_overlap(a, b)
    assert o["a_in_b"] == pytest.approx(len(sa & sb) / len(sb))
    assert o["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb))
    m = overlap_matrix({"a": a, "b": b})
    assert m["asymmetric"][0][0] == 1.0 and m["asymmetric"][1][0] == pytest.approx(
        len(sa & sb) / len(sa))
    assert precision_recall(b, a) == pytest.approx((len(sa & sb) / len(sb),
                                                    len(sa & sb) / len(sa)))
    loc = mask_location(a)
    assert loc["by_layer"] == {0: int(a[names[0]].sum()),
                               1: int(a[names[1]].sum() + a[names[2]].sum())}
    assert loc["by_type"]["q"] == int(a[names[0]].sum())
    assert loc["by_type"]["down"] == int(a[names[1]].sum())
    assert loc["by_type"]["norm"] == int(a[names[2]].sum())


# ------------------------------------------------------------ CLI

def test_cli_localize_task_then_finetuned(tmp_path):
    from skilllens.cli import main

    out = tmp_path / "run"
    assert main(["localize", "--model", "tiny-llama", "--task", "synthetic", "--sparsity",
                 "0.01", "--steps", "2", "--ft-steps", "20", "--ft-lr", "3e-3", "--n-train",
                 "32", "--n-test", "32", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"sparsity", "recovered_fraction", "scores", "ece"} <= set(res)
    assert set(res["scores"]) == {"pre", "ft", "graft"} == set(res["ece"])
    assert 0 < res["sparsity"] < 0.1
    assert res["scores"]["ft"] > res["scores"]["pre"]
    for f in ("mask.safetensors", "finetuned.safetensors", "report.md", "location.png",
              "location.svg", "scores.png"):
        assert (out / f).exists(), f
    out2 = tmp_path / "again"
    assert main(["localize", "--model", "tiny-llama", "--finetuned",
                 str(out / "finetuned.safetensors"), "--sparsity", "0.01", "--steps", "2",
                 "--no-progress", "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["scores"]["ft"] == res["scores"]["ft"]
    assert main(["localize", "--model", "tiny-llama", "--task", "synthetic", "--sparsity", "2",
                 "--out", str(tmp_path / "bad")]) == 2


def test_classification_splits_are_label_balanced_and_disjoint(data_dir):
    from collections import Counter

    from skilllens.grafting.tasks import build_task
    task = build_task("xquad-numeric", str(data_dir), n_train=8, n_dev=8, n_test=64)
    for split, n in ((task.train, 8), (task.dev, 8), (task.test, 64)):
        counts = Counter(it.meta["label"] for it in split)
        assert len(split) == n and counts[0] == counts[1] == n // 2   # numbers are the rare class
    ids = [it.id for it in task.train + task.dev + task.test]
    assert len(ids) == len(set(ids))
