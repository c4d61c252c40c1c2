import pytest
import torch

import fxgrow
from fxgrow.errors import PlanError


def _report(values: dict[str, list[float]], fan_in=None, bias=None) -> fxgrow.SplittingReport:
    targets = list(values)
    return fxgrow.SplittingReport(
        eigenvalues={t: torch.tensor(v, dtype=torch.float64) for t, v in values.items()},
        fan_in=fan_in or {t: 4 for t in targets},
        bias=bias or {t: True for t in targets},
        tokens={t: 10 for t in targets},
        reservoir={t: 10 for t in targets},
        nonconverged={t: 0 for t in targets},
        settings={"form": "operator", "method": "exact"},
    )


def _neurons(plan):
    return {t: list(idx) for t, idx in plan.items()}


def test_most_negative_first_and_negative_only():
    report = _report({"a": [-1.0, 0.5, -3.0, 0.0], "b": [-2.0, -0.5, 1.0]})
    plan = fxgrow.select(report, budget=3, layer_threshold=0)
    assert isinstance(plan, fxgrow.GrowthPlan)
    assert _neurons(plan) == {"a": [0, 2], "b": [0]}  # -3, -2, -1
    everything = fxgrow.select(report, budget=100, layer_threshold=0)
    assert _neurons(everything) == {"a": [0, 2], "b": [0, 1]}  # zero and positive never
    assert everything.out_features == {"a": 4, "b": 3}


def test_layer_threshold_counts_eligible_neurons():
    report = _report({"a": [-1.0, -1.0, 5.0, 5.0], "b": [-0.1, -0.2, -0.3]})
    # a has 2 eligible neurons (< 3): skipped even though its eigenvalues are the most negative
    assert _neurons(fxgrow.select(report, budget=10, layer_threshold=3)) == {"b": [0, 1, 2]}
    assert _neurons(fxgrow.select(report, budget=10, layer_threshold=2)) == {
        "a": [0, 1], "b": [0, 1, 2]}
    assert len(fxgrow.select(report, budget=10, layer_threshold=4)) == 0


def test_neuron_budget_stops_when_spent():
    report = _report({"a": [-5.0, -4.0, -3.0], "b": [-4.5, -3.5]})
    assert _neurons(fxgrow.select(report, budget=2, layer_threshold=0)) == {"a": [0], "b": [0]}
    assert len(fxgrow.select(report, budget=0, layer_threshold=0)) == 0


def test_parameter_budget_costs_two_fan_in_plus_one():
    report = _report({"a": [-5.0, -1.0], "b": [-4.0, -3.0], "c": [-2.0]},
                     fan_in={"a": 9, "b": 4, "c": 4}, bias={"a": True, "b": False, "c": True})
    assert report.neuron_cost("a") == 20 and report.neuron_cost("b") == 8
    # a0 (20) + b0 (8) + b1 (8) = 36; c0 costs 10 > 39 - 36: stop there, and the cheaper
    # ones further down the ranking are not taken out of order either.
    plan = fxgrow.select(report, budget=39, layer_threshold=0, budget_unit="params")
    assert _neurons(plan) == {"a": [0], "b": [0, 1]}
    assert _neurons(fxgrow.select(report, budget=19, layer_threshold=0, budget_unit="params")) == {}
    plan = fxgrow.select(report, budget=46, layer_threshold=0, budget_unit="params")
    assert _neurons(plan) == {"a": [0], "b": [0, 1], "c": [0]}


def test_parameter_budget_matches_the_plans_own_count():
    gm = fxgrow.models.tiny_vit_reduced(img_size=16)
    targets = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    widths = [gm.get_submodule(t).out_features for t in targets]
    report = _report({t: [-1.0 - 0.01 * i for i in range(w)] for t, w in zip(targets, widths)},
                     fan_in={t: gm.get_submodule(t).in_features for t in targets})
    plan = fxgrow.select(report, budget=5000, layer_threshold=0, budget_unit="params")
    spent = plan.num_params(gm)
    assert spent <= 5000 and 5000 - spent < max(report.neuron_cost(t) for t in targets)


def test_ties_break_by_report_order_then_index():
    report = _report({"z": [-1.0, -1.0, -2.0], "a": [-1.0, -2.0]})
    # -2: z2 then a1 (z comes first in the report); then -1: z0, z1, a0
    for budget, expected in [(1, {"z": [2]}), (2, {"z": [2], "a": [1]}),
                             (3, {"z": [0, 2], "a": [1]}), (4, {"z": [0, 1, 2], "a": [1]})]:
        assert _neurons(fxgrow.select(report, budget=budget, layer_threshold=0)) == expected


def test_per_target_limit_and_target_subset():
    report = _report({"a": [-5.0, -4.0, -3.0], "b": [-2.0, -1.0]})
    plan = fxgrow.select(report, budget=4, layer_threshold=0, per_target_limit=1)
    assert _neurons(plan) == {"a": [0], "b": [0]}
    plan = fxgrow.select(report, budget=4, layer_threshold=0, per_target_limit={"a": 2})
    assert _neurons(plan) == {"a": [0, 1], "b": [0, 1]}
    plan = fxgrow.select(report, budget=4, layer_threshold=0, targets=["b"])
    assert _neurons(plan) == {"b": [0, 1]}


def test_bad_arguments():
    report = _report({"a": [-1.0]})
    with pytest.raises(PlanError, match="budget"):
        fxgrow.select(report, budget=-1)
    with pytest.raises(PlanError, match="budget_unit"):
        fxgrow.select(report, budget=1, budget_unit="flops")
    with pytest.raises(PlanError, match=r"targets not in the report: \['x'\]"):
        fxgrow.select(report, budget=1, targets=["x"])
    with pytest.raises(PlanError, match="per_target_limit names"):
        fxgrow.select(report, budget=1, per_target_limit={"x": 1})
    with pytest.raises(PlanError, match="layer_threshold"):
        fxgrow.select(report, budget=1, layer_threshold=1.5)
