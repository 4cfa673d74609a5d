"""Mixture-of-experts support on the built-in tiny-mixtral: CLI end to end, mergeable expert
statistics, expert deactivation, refusals of what is not supported."""
import json

import pytest
import torch
from safetensors import safe_open

import skilllens
from skilllens.cli import main
from skilllens.core.collect import StatsCollection, collect
from skilllens.core.hooks import hooks_applied, run_with_hooks
from skilllens.core.moe import split_index
from skilllens.core.moe_hooks import ExpertHook, RouterHook, Routing
from skilllens.errors import SiteError
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.unlearning.experts import ExpertDeactivator, reroute

FORGET = ["2+2=4", "3*3=9", "7-1=6", "8/2=4", "10-3=7"]
RETAIN = ["the cat sat", "a dog ran far", "birds fly high", "fish swim", "trees grow tall"]


@pytest.fixture(scope="module")
def lm():
    return skilllens.load_model("tiny-mixtral", device="cpu")


def test_tiny_mixtral_is_a_builtin_moe_model(lm):
    assert lm.adapter.moe_layers == [0, 1]
    assert lm.adapter.describe()["experts"]["1"] == {"n_experts": 4, "n_shared": 0,
                                                     "widths": [32] * 4, "top_k": 2}
    assert tuple(lm.adapter.value_vectors(1).shape) == (128, 32)
    # flat neuron 70 = neuron 6 of expert 2; its value vector is column 6 of down_proj[2]
    assert torch.equal(lm.adapter.value_vectors(1)[70],
                       lm.model.model.layers[1].mlp.experts.down_proj[2][:, 6])
    parts = split_index([32] * 4, torch.tensor([3, 70, 71, 127]))
    assert {e: v[1].tolist() for e, v in parts.items()} == {0: [3], 2: [6, 7], 3: [31]}


def test_cli_collect_key_and_audit_end_to_end(tmp_path, data_dir):
    out = tmp_path / "k.safetensors"
    assert main(["collect", "--model", "tiny-mixtral", "--data", "gsm8k", "--site", "key",
                 "--data-dir", str(data_dir), "--max-items", "6", "--no-progress",
                 "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["skilllens"])
        assert f.get_tensor("key.1.mean").shape == (128,)
        count = f.get_tensor("key.1.count")
    assert meta["experts"]["1"]["widths"] == [32] * 4
    # each expert counts only its routed tokens; top-2 of 4: counts sum to 2 x tokens
    per_expert = count.reshape(4, 32)
    assert (per_expert == per_expert[:, :1]).all()
    assert int(per_expert[:, 0].sum()) == 2 * meta["n_tokens"]
    aud = tmp_path / "audit"
    assert main(["audit", "--model", "tiny-mixtral", "--probe-items", "4", "--eval-items", "4",
                 "--max-length", "64", "--no-progress", "--out", str(aud)]) == 0
    res = json.loads((aud / "results.json").read_text())
    assert set(res["methods"]) == {"ksd", "na", "sp", "experts"}
    ex = res["experts"]
    from skilllens.unlearning.audit import DEFAULT_FORGET, DEFAULT_RETAIN
    assert set(ex["shares"]) == {DEFAULT_FORGET, *DEFAULT_RETAIN}  # every audited skill
    for shares in ex["shares"].values():  # top-2 routing: shares of a layer sum to 2
        assert all(abs(sum(row) - 2.0) < 1e-9 for row in shares)
    assert (aud / "figures" / "expert_routing.png").exists()
    report = (aud / "report.md").read_text()
    assert "Expert-level vs neuron-level forgetting" in report and "expert_routing" in report
    views = res["neuron_views"]  # every layer is a MoE layer: expert neurons are shown
    assert views and all(v["expert"] == v["neuron"] // 32 for v in views)
    assert "routed tokens only" in (aud / "report.html").read_text()


def test_expert_statistics_merge_exactly_across_shards(lm, tmp_path):
    kw = dict(sites=["gate", "key", "routing"], progress=False,
              stats=("moments", "extrema", "abs", "positive"))
    whole = collect(lm, FORGET + RETAIN, **kw)
    a = collect(lm, FORGET + RETAIN, rank=0, world_size=2, **kw)
    b = collect(lm, FORGET + RETAIN, rank=1, world_size=2, **kw)
    a.save(tmp_path / "a.safetensors")
    from_file = StatsCollection.load(tmp_path / "a.safetensors").merge(b)  # flat + per-expert
    in_memory = a.merge(b)                                                   # per-expert
    for key in whole.keys():
        # per-neuron counts: exact; each expert counted only the tokens routed to it
        assert torch.equal(from_file[key].count, whole[key].count)
        assert torch.equal(in_memory[key].count, whole[key].count)
        for stat in ("mean", "std", "max", "mean_abs", "frac_pos"):
            torch.testing.assert_close(getattr(from_file[key], stat),
                                       getattr(in_memory[key], stat), rtol=1e-12, atol=1e-12)
            # other batches (padding) change float32 activations slightly, nothing more
            torch.testing.assert_close(getattr(from_file[key], stat), getattr(whole[key], stat),
                                       rtol=1e-4, atol=1e-5)


def test_unseen_experts_are_never_selected(lm):
    """Regression: an expert no forget token reached has count 0 (mean 0, std 0); Neuron
    Adjust's signed score 0 - mu_r must not rank it (the old code selected it when mu_r < 0)."""
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster
    from skilllens.unlearning.selective_pruning import SelectivePruner

    def fake(count_e1, mean):
        st = NeuronStats(128, ("moments", "abs"))
        t = st.export()
        t["count"] = torch.full((128,), 10.0, dtype=torch.float64)
        t["count"][32:64] = count_e1
        t["mean"] = torch.full((128,), mean, dtype=torch.float64)
        t["mean"][32:64] = 0.0 if count_e1 == 0 else -5.0
        t["m2"] = t["count"] * 0.25
        t["sum_abs"] = t["mean"].abs() * t["count"]
        return StatsCollection({("gate", 1): NeuronStats.from_export(t),
                                ("key", 1): NeuronStats.from_export(t)})

    forget, retain = fake(0, 0.1), fake(10, 0.0)
    na = NeuronAdjuster(percent=10).fit_stats(forget, retain)
    assert not ((na.params_[1].index >= 32) & (na.params_[1].index < 64)).any()
    sp = SelectivePruner(percent=10).fit_stats(forget, retain)
    assert not ((sp.selected_[1] >= 32) & (sp.selected_[1] < 64)).any()


def test_reroute_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g)
    index = torch.topk(logits, 2, dim=1).indices
    weights = torch.rand(50, 2, generator=g)
    banned = torch.tensor([False, True, False, False, True, False])
    new = reroute(Routing(logits, index, weights), banned)
    for n in range(50):
        free = [e for e in logits[n].argsort(descending=True).tolist()
                if not banned[e] and e not in index[n].tolist()]
        want = []
        for e in index[n].tolist():
            want.append(free.pop(0) if banned[e] else e)
        assert new.index[n].tolist() == want
    assert torch.equal(new.weights, weights)
    dropped = reroute(Routing(logits, index, weights), banned, "drop")
    assert torch.equal(dropped.weights == 0, banned[index])


def test_expert_deactivator_fit_apply_save_load(lm, tmp_path):
    ed = ExpertDeactivator(n_experts=1).fit(lm, FORGET, RETAIN, progress=False)
    assert ed.n_selected >= 1 and set(ed.deactivated_) <= {0, 1}
    ids = {"input_ids": lm.tokenizer(["4+4=8, 5+5=10"], return_tensors="pt")["input_ids"]}
    seen = []
    with torch.no_grad():
        before = lm.model(**ids).logits
        layer = next(iter(ed.deactivated_))
        with ed.applied(lm), hooks_applied(lm, [RouterHook(layer, lambda r: seen.append(r.index))]):
            edited = lm.model(**ids).logits
        assert torch.equal(lm.model(**ids).logits, before)
    # the read hook (installed after) sees the routing without the deactivated expert
    assert not torch.isin(seen[0], ed.deactivated_[layer]).any()
    assert not torch.equal(edited, before)
    ed.save(tmp_path / "ed.safetensors")
    back = ExpertDeactivator.load(tmp_path / "ed.safetensors", lm)
    assert {l: v.tolist() for l, v in back.deactivated_.items()} == \
        {l: v.tolist() for l, v in ed.deactivated_.items()}
    with torch.no_grad(), back.applied(lm):
        assert torch.equal(lm.model(**ids).logits, edited)


def test_lens_and_nnsight_refuse_moe_sites(lm):
    hook = ExpertHook("key", 0, 0, lambda a: None)
    for backend in ("lens", "nnsight"):
        with pytest.raises(SiteError, match="mixture-of-experts"):
            run_with_hooks(lm, {"input_ids": torch.tensor([[1, 2]])}, [hook], backend=backend)
        with pytest.raises(SiteError, match="mixture-of-experts"):
            collect(lm, ["a b"], sites=["key"], backend=backend, progress=False)


def test_clear_errors_on_moe_and_dense_mismatches(lm):
    from skilllens.concepts.ablation import ConceptAblation

    with pytest.raises(SiteError, match="per expert"):
        run_with_hooks(lm, {"input_ids": torch.tensor([[1, 2]])},
                       [skilllens.core.hooks.Hook("key", 0, lambda a: None)])
    with pytest.raises(SiteError, match="mixture-of-experts"):
        ConceptAblation(1, 3, "project").fit(lm)
    from skilllens.concepts.data import Concept
    from skilllens.concepts.experiment import run_concepts
    with pytest.raises(SiteError, match="mixture-of-experts"):
        run_concepts(lm, [Concept("x", "some text", ["q?"], ["u?"])], progress=False)
    with pytest.raises(SiteError, match="mixture-of-experts models only"):
        collect("tiny-llama", ["a"], sites=["routing"], progress=False)
    with pytest.raises(SiteError, match="experts 0..3"):
        run_with_hooks(lm, {"input_ids": torch.tensor([[1, 2]])},
                       [ExpertHook("key", 0, 7, lambda a: None)])


def test_grafting_over_expert_parameters(lm):
    from skilllens.grafting import GraftLocalizer
    from skilllens.grafting.finetune import FineTuneConfig, finetune
    from skilllens.grafting.metrics import expert_location
    from skilllens.grafting.tasks import build_task

    task = build_task("synthetic", n_train=8, n_dev=4, n_test=4)
    ft = finetune(lm, task, FineTuneConfig(steps=2, progress=False))
    loc = GraftLocalizer(sparsity=0.05, steps=1, include="*experts*", progress=False).fit(
        lm, ft, task)
    where = expert_location(loc.masks_)
    assert set(where) <= {0, 1} and sum(sum(r.values()) for r in where.values()) > 0
    ids = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    with torch.no_grad():
        before = lm.model(**ids).logits
        with loc.grafted(lm):
            assert not torch.equal(lm.model(**ids).logits, before)
        assert torch.equal(lm.model(**ids).logits, before)


def test_concept_ablation_of_an_expert_value_vector(lm):
    """Zero ablation of flat neuron 70 of layer 1 = column 6 of expert 2's down_proj, written
    into the parameter inside the block and restored bit-exactly."""
    from skilllens.concepts.ablation import ConceptAblation

    down = lm.model.model.layers[1].mlp.experts.down_proj
    before_w = down.detach().clone()
    abl = ConceptAblation(1, 70, "zero").fit(lm, fingerprint=False)
    assert torch.equal(abl.original_, before_w[2][:, 6])
    with torch.no_grad(), abl.applied(lm):
        assert torch.equal(down[2][:, 6], torch.zeros(32))
        assert torch.equal(down[2][:, 7], before_w[2][:, 7]) and torch.equal(down[1], before_w[1])
    assert torch.equal(down, before_w)
