import json

import pytest
import timm
import torch
from torch import nn

import fxgrow
from fxgrow import GrowthPlan, PlanError

DIM, HEADS, MLP_RATIO, DEPTH, CLASSES = 24, 2, 2.0, 2, 5


def _vit(dim: int = DIM) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=16,
        patch_size=8, depth=DEPTH, embed_dim=dim, num_heads=HEADS, mlp_ratio=MLP_RATIO,
    ).eval()


@pytest.fixture(scope="module")
def gm():
    return fxgrow.trace(_vit())


def test_indices_are_sorted_unique_and_targets_in_natural_order():
    plan = GrowthPlan({"blocks.10.mlp.fc1": [5, 1, 3], "blocks.2.mlp.fc1": (0,), "head": [2]})
    assert list(plan) == ["blocks.2.mlp.fc1", "blocks.10.mlp.fc1", "head"]
    assert plan["blocks.10.mlp.fc1"] == (1, 3, 5)
    assert plan.num_neurons == 5
    other = GrowthPlan({"head": [2], "blocks.2.mlp.fc1": [0], "blocks.10.mlp.fc1": [3, 5, 1]})
    assert plan == other and plan.to_json() == other.to_json()


def test_integer_like_indices_are_accepted():
    import numpy as np

    plan = GrowthPlan({"a": [np.int64(3), torch.tensor(1)], "b": torch.tensor([4, 0])})
    assert plan["a"] == (1, 3) and plan["b"] == (0, 4)
    assert all(type(i) is int for i in plan["a"] + plan["b"])


@pytest.mark.parametrize(
    "neurons, words",
    [
        ({"fc": [1, True]}, ["'fc'", "True", "not an integer"]),
        ({"fc": [1.0]}, ["'fc'", "1.0", "not an integer"]),
        ({"fc": ["2"]}, ["'fc'", "'2'", "not an integer"]),
        ({"fc": [torch.tensor(1.0)]}, ["'fc'", "not an integer"]),
        ({"fc": [0, -3]}, ["'fc'", "-3", "negative"]),
        ({"fc": [4, 2, 4]}, ["'fc'", "4", "more than once"]),
        ({"fc": []}, ["'fc'", "no neuron indices"]),
        ({"fc": 3}, ["'fc'", "sequence"]),
        ({"fc": "12"}, ["'fc'", "sequence"]),
        ({"": [1]}, ["non-empty string"]),
        ({3: [1]}, ["non-empty string"]),
    ],
)
def test_constructor_rejects_bad_indices_naming_target_and_index(neurons, words):
    with pytest.raises(PlanError) as info:
        GrowthPlan(neurons)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_non_mapping_plan_is_rejected():
    with pytest.raises(PlanError, match="mapping"):
        GrowthPlan([("fc", [1])])


def test_validate_returns_sites_of_a_good_plan(gm):
    sites = GrowthPlan({"blocks.0.mlp.fc1": [0, 47], "head": [4]}).validate(gm)
    assert sites["blocks.0.mlp.fc1"][0].out_features == int(DIM * MLP_RATIO)
    assert sites["head"][0].in_features == DIM


@pytest.mark.parametrize(
    "neurons, words",
    [
        ({"blocks.0.mlp.fc3": [0]}, ["unknown target", "'blocks.0.mlp.fc3'", "did you mean",
                                     "'blocks.0.mlp.fc1'"]),
        ({"nowhere": [0]}, ["unknown target", "'nowhere'"]),
        ({"blocks.0.norm1": [0]}, ["'blocks.0.norm1'", "not a linear"]),
        ({"cls_token": [0]}, ["'cls_token'", "not a linear", "tensor"]),
        ({"blocks.0.mlp.fc2": [DIM]}, ["'blocks.0.mlp.fc2'", f"index {DIM}", "out of range",
                                       f"out_features {DIM}"]),
        ({"head": [0, CLASSES + 3]}, ["'head'", f"index {CLASSES + 3}", "out of range"]),
    ],
)
def test_validate_names_the_problem(gm, neurons, words):
    with pytest.raises(PlanError) as info:
        GrowthPlan(neurons).validate(gm)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_empty_plan_is_rejected_by_validate(gm):
    with pytest.raises(PlanError, match="empty"):
        GrowthPlan().validate(gm)


def test_uncalled_linear_is_unknown_to_the_graph():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    # a GraphModule keeps only the modules its graph calls
    with pytest.raises(PlanError, match="unknown target 'unused'.*did you mean 'used'"):
        GrowthPlan({"unused": [0]}).validate(fxgrow.trace(Model()))


def test_plan_for_another_graph_is_rejected(gm):
    plan = GrowthPlan.for_graph(gm, {"blocks.1.mlp.fc1": [3], "head": [0]})
    assert plan.out_features == {"blocks.1.mlp.fc1": int(DIM * MLP_RATIO), "head": CLASSES}
    wider = fxgrow.trace(_vit(dim=2 * DIM))
    with pytest.raises(PlanError) as info:
        plan.validate(wider)
    message = str(info.value)
    assert "another graph" in message and "'blocks.1.mlp.fc1'" in message
    assert str(int(DIM * MLP_RATIO)) in message and str(int(2 * DIM * MLP_RATIO)) in message
    # the same neurons without recorded widths fit the wider graph
    GrowthPlan(dict(plan)).validate(wider)


def test_recorded_width_must_cover_indices():
    with pytest.raises(PlanError, match="'fc'.*index 8.*out_features 8"):
        GrowthPlan({"fc": [8]}, out_features={"fc": 8})
    with pytest.raises(PlanError, match="'other'"):
        GrowthPlan({"fc": [1]}, out_features={"other": 8})


def test_json_and_dict_round_trip(gm):
    plan = GrowthPlan.for_graph(gm, {"blocks.0.attn.qkv": [7, 2], "blocks.1.mlp.fc2": [0]})
    text = plan.to_json()
    assert GrowthPlan.from_json(text) == plan
    assert GrowthPlan.from_dict(json.loads(text)) == plan
    assert json.loads(text)["neurons"] == {"blocks.0.attn.qkv": [2, 7], "blocks.1.mlp.fc2": [0]}
    assert GrowthPlan.from_dict(GrowthPlan({"x": [1]}).to_dict()).out_features == {}


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", ["not valid JSON"]),
        ('{"format": "other", "version": 1, "neurons": {}}', ["not a stored growth plan"]),
        ('{"format": "fxgrow.GrowthPlan", "version": 9, "neurons": {}}', ["version 9"]),
        ('{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {}, "x": 1}', ["'x'"]),
        ('{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"fc": [1.5]}}',
         ["'fc'", "1.5"]),
        ("[1, 2]", ["JSON object"]),
    ],
)
def test_bad_stored_plans_raise_plan_error(text, words):
    with pytest.raises(PlanError) as info:
        GrowthPlan.from_json(text)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_merge_unites_indices_and_checks_recorded_widths():
    a = GrowthPlan({"fc1": [1, 4], "fc2": [0]}, out_features={"fc1": 8})
    b = GrowthPlan({"fc1": [4, 2], "head": [3]})
    merged = a | b
    assert dict(merged) == {"fc1": (1, 2, 4), "fc2": (0,), "head": (3,)}
    assert merged.out_features == {"fc1": 8}
    assert a.merge({"fc2": [5]})["fc2"] == (0, 5)
    assert dict(a) == {"fc1": (1, 4), "fc2": (0,)}  # operands unchanged
    with pytest.raises(PlanError, match="different graphs.*'fc1'"):
        a | GrowthPlan({"fc1": [0]}, out_features={"fc1": 16})


def test_num_params_is_the_closed_form(gm):
    hidden = int(DIM * MLP_RATIO)
    plan = GrowthPlan({"blocks.0.attn.qkv": [0, 1, 2], "blocks.0.mlp.fc2": [5],
                       "blocks.1.mlp.fc1": list(range(hidden))})
    # fan-ins from the model's definition: qkv and fc1 read the residual width, fc2 the hidden
    expected = 3 * (DIM + 1) + 1 * (hidden + 1) + hidden * (DIM + 1)
    assert plan.num_params(gm) == 2 * expected
    assert plan.num_params(gm, mode="fused") == expected
    with pytest.raises(PlanError, match="mode"):
        plan.num_params(gm, mode="wide")


def test_num_params_without_bias():
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.GELU(), nn.Linear(4, 2))
    plan = GrowthPlan({"0": [0, 3], "2": [1]})
    assert plan.num_params(fxgrow.trace(model)) == 2 * (2 * 6 + 1 * (4 + 1))
