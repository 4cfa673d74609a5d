"""Fine-tuning helper and grafting tasks: parameter subsets, sparse masks, artifacts, scoring."""
import pytest
import torch

from skilllens import load_model
from skilllens.errors import DataError, FingerprintMismatchError, SkillLensError
from skilllens.grafting.finetune import (FineTuneConfig, evaluate_models, finetune, load_finetuned,
                                         select_parameters)
from skilllens.grafting.tasks import (build_task, encode_task_items, label_token_ids, score_task,
                                      task_logits, task_loss)


pytestmark = pytest.mark.usefixtures("one_thread")  # lm, one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def task():
    return build_task("synthetic", n_train=32, n_dev=8, n_test=32)


@pytest.mark.parametrize("optimizer,lr", [("adamw", 3e-3), ("sgd", 0.1)])
def test_finetune_trains_subset_and_leaves_base_untouched(lm, task, optimizer, lr):
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cfg = FineTuneConfig(steps=15, lr=lr, optimizer=optimizer, include=("*layers.1.mlp.*",),
                         progress=False)
    ft = finetune(lm, task, cfg)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"base parameter {n} changed"
    assert ft.trained == [n for n in before if n.startswith("model.layers.1.mlp.")]
    for n, p in ft.model.named_parameters():
        assert torch.equal(p, before[n]) != (n in ft.trained), n
    assert ft.losses[-1] < ft.losses[0]


def test_param_masks_keep_other_entries_exact(lm, task):
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.down_proj.weight"
    w = dict(lm.model.named_parameters())[name]
    mask = torch.rand(w.shape, generator=g) < 0.05
    ft = finetune(lm, task, FineTuneConfig(steps=5, lr=1e-2, weight_decay=0.1, progress=False),
                  param_masks={name: mask})
    assert ft.trained == [name]
    new = dict(ft.model.named_parameters())[name]
    assert torch.equal(new[~mask], w[~mask])
    assert bool((new[mask] != w[mask]).all())
    with pytest.raises(DataError, match="not trainable"):
        finetune(lm, task, FineTuneConfig(steps=1, include=("*mlp*",), progress=False),
                 param_masks={"model.layers.0.self_attn.q_proj.weight": mask})


def test_save_load_finetuned(lm, task, tmp_path):
    ft = finetune(lm, task, FineTuneConfig(steps=3, lr=1e-2, include=("*layers.0.*",),
                                           progress=False))
    path = tmp_path / "ft.safetensors"
    ft.save(path)
    back = load_finetuned(path, lm)
    for (n, a), (_, b) in zip(ft.model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(a, b), n
    assert back.trained == ft.trained and back.task_spec["name"] == "synthetic"
    from skilllens.grafting.finetune import train_digest
    assert back.train_digest == ft.train_digest == train_digest(task)  # which items it saw
    with pytest.raises(FingerprintMismatchError):
        load_finetuned(path, load_model("tiny-mistral"))


def test_default_optimizer_is_sgd_like_the_cli():
    """Defect 12: the default was AdamW (lr 1e-4), which the docs and CLI call meaningless for
    a grafting base patch; the one default is now SGD with the CLI's lr."""
    import argparse

    from skilllens.cli.localize import add_parser
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    cfg = FineTuneConfig()
    assert cfg.optimizer == "sgd"
    args = sub.choices["localize"].parse_args(["--task", "synthetic", "--out", "x"])
    assert (cfg.optimizer, cfg.lr, cfg.steps) == (args.ft_optimizer, args.ft_lr, args.ft_steps)


def test_bad_config():
    with pytest.raises(DataError):
        FineTuneConfig(optimizer="lbfgs")
    with pytest.raises(DataError):
        FineTuneConfig(steps=0)
    with pytest.raises(DataError, match="no parameter matched"):
        select_parameters(load_model("tiny-llama").model, include=("*nope*",))


def test_classification_logits_match_full_forward(lm, task):
    data = encode_task_items(task.train[:6], lm.tokenizer, task.kind, task.label_words)
    got = task_logits(lm.model, data).double()
    with torch.no_grad():
        full = lm.model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    ref = full.double()[data.rows, data.cols][:, data.label_ids]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for it, r, c in zip(task.train[:6], data.rows, data.cols):
        n_prompt = len(lm.tokenizer(it.prompt)["input_ids"])
        assert int(c) == n_prompt - 1
    assert data.targets.tolist() == [it.meta["label"] for it in task.train[:6]]


def test_generation_loss_matches_manual_nll(lm, data_dir):
    task = build_task("gsm8k-calc", data_dir, n_train=3, n_dev=1, n_test=1)
    data = encode_task_items(task.train, lm.tokenizer, task.kind, max_length=512)
    with torch.no_grad():
        loss = task_loss(lm.model, data).double()
        logits = lm.model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    nll = []
    for r, it in enumerate(task.train):
        p = len(lm.tokenizer(it.prompt)["input_ids"])
        a = lm.tokenizer(it.answer, add_special_tokens=False)["input_ids"]
        lp = torch.log_softmax(logits[r].double(), -1)
        nll += [-lp[p - 1 + i, t] for i, t in enumerate(a)]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    sc = score_task(lm.model, data)
    assert sc.n_predictions == len(nll) and 0 <= sc.score <= 1 and 0 <= sc.ece <= 1


def test_builtin_tasks(data_dir, lm):
    for name in ("xquad-lang", "xquad-numeric", "gsm8k-calc"):
        t = build_task(name, data_dir, n_train=8, n_dev=4, n_test=16)
        ids = lambda items: {it.id for it in items}  # noqa: E731
        assert not (ids(t.train) & ids(t.test)) and not (ids(t.dev) & ids(t.test))
        assert len(t.train) == 8 and len(t.test) == 16
        if t.kind == "classification":
            labels = [it.meta["label"] for it in t.train]
            assert len(set(labels)) == len(t.label_words)
            assert all(it.answer == t.label_words[it.meta["label"]] for it in t.test)
        else:
            assert all("<<" in it.answer for it in t.train)
    with pytest.raises(SkillLensError, match="unknown task"):
        build_task("nope", data_dir)
    with pytest.raises(DataError, match="distinct"):
        label_token_ids(lm.tokenizer, ["apple", "avocado"])


def test_evaluate_models_finetune_improves(lm, task):
    ft = finetune(lm, task, FineTuneConfig(steps=25, lr=3e-3, optimizer="adamw", progress=False))
    s = evaluate_models({"pre": lm, "ft": ft.lm}, task)
    assert s["ft"].score > s["pre"].score and s["ft"].loss < s["pre"].loss


@pytest.mark.slow
def test_smollm2_label_logits_and_graft_end_to_end(smollm2, data_dir):
    """SmolLM2: the restricted-head logits equal the full forward; a 3-step fine-tune of two
    layers' MLPs lowers the train loss and a 1-step graft runs and restores the weights."""
    from skilllens.grafting import GraftLocalizer

    task = build_task("xquad-numeric", data_dir, n_train=4, n_dev=2, n_test=4)
    data = encode_task_items(task.train, smollm2.tokenizer, task.kind, task.label_words)
    got = task_logits(smollm2.model, data)
    with torch.no_grad():
        full = smollm2.model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    torch.testing.assert_close(got, full[data.rows, data.cols][:, data.label_ids], rtol=1e-4,
                               atol=1e-4)
    inc = ("*layers.2[89].mlp.*",)
    ft = finetune(smollm2, task, FineTuneConfig(steps=3, lr=1e-3, include=inc, progress=False))
    assert ft.losses[-1] < ft.losses[0]
    before = smollm2.model.model.layers[29].mlp.up_proj.weight.clone()
    loc = GraftLocalizer(sparsity=1e-3, steps=1, include=inc, progress=False).fit(smollm2, ft,
                                                                                   task)
    assert loc.result_.n_eligible == 2 * 3 * 576 * 1536
    with loc.grafted(smollm2):
        pass
    assert torch.equal(smollm2.model.model.layers[29].mlp.up_proj.weight, before)


def test_xquad_lang_snippets_per_paragraph(data_dir):
    one = build_task("xquad-lang", data_dir, n_train=8, n_dev=4, n_test=48)
    assert one.test == build_task("xquad-lang", data_dir, n_train=8, n_dev=4, n_test=48,
                                  per_paragraph=1).test  # the default is unchanged
    three = build_task("xquad-lang", data_dir, n_train=8, n_dev=4, n_test=192, per_paragraph=3)
    assert len(three.test) == 192 and three.spec["per_paragraph"] == 3
    para = lambda items: {"/".join(it.id.split("/")[2:4]) for it in items}  # noqa: E731
    assert not (para(three.train) & para(three.test))  # snippets of a paragraph share a split
    assert not (para(three.dev) & para(three.test))
    assert len({it.id for it in three.test}) == 192
    assert all(it.prompt.startswith("Text: ") and it.prompt.endswith("\nLanguage:")
               for it in three.test)
