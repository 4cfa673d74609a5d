"""Selective Pruning: ranking by the mean |activation| ratio, zeroing, persistence."""
import pytest
import torch

from skilllens import load_model
from skilllens.core.collect import StatsCollection
from skilllens.errors import FingerprintMismatchError, SkillLensError
from skilllens.core.hooks import Hook, hooks_applied
from skilllens.stats.neuron_stats import NeuronStats
from skilllens.unlearning.selective_pruning import SelectivePruner


def _stats(data, site="key"):
    return StatsCollection({(site, l): NeuronStats(x.shape[1], ("moments", "abs"),
                                                   backend="torch").update(x)
                            for l, x in data.items()})


def test_ranking_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    f = {l: torch.randn(100, 30, generator=g) * (0.1 + 2 * torch.rand(30, generator=g))
         for l in range(2)}
    r = {l: torch.randn(100, 30, generator=g) * (0.1 + 2 * torch.rand(30, generator=g))
         for l in range(2)}
    sp = SelectivePruner(percent=10).fit_stats(_stats(f), _stats(r))
    ratio = torch.stack([f[l].double().abs().mean(0) / (r[l].double().abs().mean(0) + 1e-6)
                         for l in range(2)])
    assert torch.allclose(sp.scores_, ratio, rtol=1e-6)
    top = torch.topk(ratio.reshape(-1), 6).indices
    assert {(int(i) // 30, int(i) % 30) for i in top} == \
        {(l, int(i)) for l, idx in sp.selected_.items() for i in idx}
    per = SelectivePruner(percent=10, scope="per_layer").fit_stats(_stats(f), _stats(r))
    assert per.selected_per_layer() == {0: 3, 1: 3}


def test_pruning_zeroes_selected_neurons_and_is_reversible(tiny_llama, tmp_path):
    lm = tiny_llama
    sp = SelectivePruner(percent=10).fit(lm, ["1+1=2", "9*9=81", "7-3=4"],
                                         ["hello there", "good morning all"], progress=False)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    seen = {}
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        with sp.applied(lm):
            reads = [Hook("key", l, lambda a, l=l: seen.setdefault(l, a.clone()))
                     for l in sp.selected_]
            with hooks_applied(lm, reads):
                during = lm.model(input_ids=ids).logits
        after = lm.model(input_ids=ids).logits
        # reference: the same model with the selected value vectors (down-proj columns) zeroed
        saved = {l: lm.adapter.value_weight(l).detach().clone() for l in sp.selected_}
        try:
            for l, idx in sp.selected_.items():
                lm.adapter.value_weight(l)[:, idx] = 0
            ref = lm.model(input_ids=ids).logits
        finally:
            for l, w in saved.items():
                lm.adapter.value_weight(l).copy_(w)
    for l, idx in sp.selected_.items():
        assert (seen[l][..., idx] == 0).all()
    assert torch.equal(before, after) and not torch.allclose(before, during)
    assert torch.allclose(during, ref, atol=1e-5)
    back = SelectivePruner.load(sp.save(tmp_path / "sp.safetensors"), lm)
    assert {l: i.tolist() for l, i in back.selected_.items()} == \
        {l: i.tolist() for l, i in sp.selected_.items()}
    with pytest.raises(FingerprintMismatchError):
        SelectivePruner.load(tmp_path / "sp.safetensors", load_model("tiny-gpt2"))


@pytest.mark.parametrize("bad", [0, 150, -3])
def test_bad_percent(bad):
    with pytest.raises(SkillLensError, match=r"\(0, 100\]"):
        SelectivePruner(percent=bad)


def test_each_layer_gets_indices_on_its_own_device():
    """Defect 10: indices went to ``lm.device``; with layer 1 on another device (test double:
    ``meta``) its indices must live there, layer 0's on the CPU."""
    lm = load_model("tiny-llama")
    lm.model.model.layers[1].to("meta")
    g = torch.Generator().manual_seed(1)
    f = {l: torch.randn(40, 64, generator=g) * 3 for l in range(2)}
    r = {l: torch.randn(40, 64, generator=g) for l in range(2)}
    sp = SelectivePruner(percent=10, scope="per_layer").fit_stats(_stats(f), _stats(r))
    for h in sp.hooks(lm):
        dev = "meta" if h.layer == 1 else "cpu"
        idx = [c.cell_contents for c in h.fn.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
        assert len(idx) == 1 and idx[0].device.type == dev
        assert h.fn(torch.ones(1, 2, 64, device=dev)).device.type == dev
