"""Rerouting away from deactivated experts follows the router's own ranking: for DeepSeek-V3
and GLM-4.5 MoE routers that is sigmoid(logits) + the score-correction bias, within the expert
groups eligible without the banned experts (the old code ranked by raw logits)."""
import math

import pytest
import torch

from moe_families import tiny_moe
from skilllens.core.hooks import hooks_applied
from skilllens.core.moe_hooks import RouterHook, Routing
from skilllens.unlearning.experts import reroute


def _reference(logits, index, bias, n_group, topk_group, banned):
    """float64, one token at a time: the replacement of each banned slot."""
    out = []
    E = logits.shape[1]
    for n in range(logits.shape[0]):
        s = [1 / (1 + math.exp(-float(x))) + float(b) for x, b in zip(logits[n].double(), bias)]
        s = [-math.inf if banned[e] else v for e, v in enumerate(s)]
        size = E // n_group
        if n_group > 1 and topk_group < n_group:
            gsum = [sum(sorted([v for v in s[g * size:(g + 1) * size] if v > -math.inf],
                               reverse=True)[:2]) for g in range(n_group)]
            keep = sorted(range(n_group), key=lambda g: -gsum[g])[:topk_group]
            s = [v if e // size in keep else -math.inf for e, v in enumerate(s)]
        chosen = index[n].tolist()
        free = [e for e in sorted(range(E), key=lambda e: -s[e])
                if s[e] > -math.inf and e not in chosen]
        out.append([(free.pop(0) if free else e) if banned[e] else e for e in chosen])
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_reroute_follows_the_routers_own_ranking(family):
    lm = tiny_moe(family)
    layer = lm.adapter.moe_layers[0]
    router = lm.adapter.moe_layer(layer).router
    E = router.e_score_correction_bias.numel()
    with torch.no_grad():  # a bias large enough to reorder the experts (zero after init)
        router.e_score_correction_bias.copy_(torch.tensor([0.6, -0.5, 0.3, -0.2])[:E])
    seen = []
    ids = lm.tokenizer(["2+2=4, and 3*3=9; the cat sat on the mat."], return_tensors="pt")
    with torch.no_grad(), hooks_applied(lm, [RouterHook(layer, seen.append)]):
        lm.model(input_ids=ids["input_ids"])
    r = seen[0]
    k = r.index.shape[1]
    # the ranking reproduces the router's own top-k choice
    top = r.ranking().topk(k, dim=1).indices
    assert all(set(a) == set(b) for a, b in zip(top.tolist(), r.index.tolist()))
    counts = torch.bincount(r.index.flatten(), minlength=E)
    banned = torch.zeros(E, dtype=torch.bool)
    banned[int(counts.argmax())] = True
    new = reroute(r, banned)
    want = _reference(r.logits, r.index, router.e_score_correction_bias, r.n_group,
                      r.topk_group, banned)
    assert new.index.tolist() == want
    hit = banned[r.index]
    stuck = torch.tensor([[b and e == w for e, w, b in zip(row, wrow, hrow)]
                          for row, wrow, hrow in zip(r.index.tolist(), want, hit.tolist())])
    assert torch.equal(new.weights == 0, stuck)          # no allowed expert left: weight 0
    assert torch.equal(new.weights[~stuck], r.weights[~stuck])
    assert not banned[new.index[~stuck]].any()
    # ranking by raw logits (the old rule) reroutes some tokens elsewhere
    by_logits = reroute(Routing(r.logits, r.index, r.weights), banned)
    assert by_logits.index.tolist() != want or not torch.equal(by_logits.weights, new.weights)
