"""A grown pair is one growth candidate: why (equal splitting matrices, twin growth that stays
identical) and how (analysis's default targets, selection)."""

import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.passes import analyze, default_targets, grow
from fxgrow.passes.analysis import SplittingReport
from fxgrow.passes.pairs import second_members, twin_of

from grown_models import randomise_grown


def _mlp() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    gm = grow(fxgrow.trace(model.double()), {"2": [0, 3, 5]})
    randomise_grown(gm, 1)
    return gm


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_twins_have_the_same_splitting_eigenvalues():
    gm = _mlp()
    report = analyze(gm, _batches(), F.cross_entropy, targets=["2_grow0_plus", "2_grow0_minus"],
                     method="exact", progress=False)
    plus, minus = report.eigenvalues["2_grow0_plus"], report.eigenvalues["2_grow0_minus"]
    assert plus.abs().max() > 0
    assert torch.allclose(plus, minus, rtol=1e-9, atol=1e-12 * float(plus.abs().max()))


def test_growing_both_twins_adds_two_pseudo_layers_that_stay_equal():
    gm = grow(_mlp(), {"2_grow0_plus": [1], "2_grow0_minus": [1]})
    randomise_grown(gm, 2)
    with torch.no_grad():  # the nested pairs start as growth makes them: zero sums
        for twin in ("2_grow0_plus_grow0", "2_grow0_minus_grow0"):
            plus, minus = gm.get_submodule(f"{twin}_plus"), gm.get_submodule(f"{twin}_minus")
            minus.weight.copy_(-plus.weight)
            minus.bias.copy_(-plus.bias)
    optimizer = torch.optim.AdamW(gm.parameters(), lr=0.05, weight_decay=0.1)
    for inputs, labels in _batches(6):
        optimizer.zero_grad()
        F.cross_entropy(gm(inputs), labels).backward()
        optimizer.step()

    def pair_sum(twin):
        plus, minus = gm.get_submodule(f"{twin}_plus"), gm.get_submodule(f"{twin}_minus")
        return plus.weight + minus.weight, plus.bias + minus.bias

    (w1, b1), (w2, b2) = pair_sum("2_grow0_plus_grow0"), pair_sum("2_grow0_minus_grow0")
    assert w1.abs().max() > 1e-3  # they moved
    assert torch.allclose(w1, w2, atol=1e-12) and torch.allclose(b1, b2, atol=1e-12)


def test_analysis_and_selection_treat_a_pair_as_one_candidate():
    gm = _mlp()
    targets = default_targets(gm)
    assert "2_grow0_plus" in targets and "2_grow0_minus" not in targets
    assert second_members(gm) == {"2_grow0_minus"}
    assert twin_of("2_grow0_minus") == "2_grow0_plus" and twin_of("2_grow0_plus") is None
    values = torch.tensor([-3.0, -2.0, -1.0], dtype=torch.float64)
    report = SplittingReport(
        eigenvalues={"2_grow0_plus": values, "2_grow0_minus": values.clone()},
        fan_in={"2_grow0_plus": 8, "2_grow0_minus": 8},
        bias={"2_grow0_plus": True, "2_grow0_minus": True},
        tokens={}, reservoir={}, nonconverged={}, settings={},
    )
    plan = fxgrow.select(report, budget=4, layer_threshold=1)
    assert dict(plan) == {"2_grow0_plus": (0, 1, 2)}
