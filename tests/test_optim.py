"""Optimizer surgery: the same optimizer trains the grown model; existing state untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

import fxgrow
from fxgrow.errors import FxgrowError
from fxgrow.training.optim import add_grown_params, group_param_names, set_group_params
from fxgrow.passes import grow


TARGETS = {
    "blocks.0.mlp.fc1": [1, 5, 9],
    "blocks.1.attn.qkv": [0, 7, 40],
    "blocks.0.attn.proj": [3],
    "blocks.1.mlp.fc2": [2, 30],
}


def _model():
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2, num_classes=5)
    return fxgrow.trace(model)


def _decay_groups(gm, lr=1e-2):
    decay = [p for p in gm.parameters() if p.ndim > 1]
    no_decay = [p for p in gm.parameters() if p.ndim <= 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05,
                                                        "lr": lr * 2}]


FACTORIES = {
    "adamw": lambda gm: torch.optim.AdamW(_decay_groups(gm), lr=1e-2),
    "sgd": lambda gm: torch.optim.SGD(_decay_groups(gm), lr=1e-2, momentum=0.9),
    "timm": lambda gm: create_optimizer_v2(gm, "adamw", lr=1e-2, weight_decay=0.05),
}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)


def _step(gm, optimizer, scheduler, seed, clip=None):
    x, y = _batch(seed)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(gm(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(gm.parameters(), clip)
    optimizer.step()
    scheduler.step()


def _trained(factory):
    gm = _model()
    optimizer = FACTORIES[factory](gm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for seed in range(3):
        _step(gm, optimizer, scheduler, seed)
    return gm, optimizer, scheduler


def _state_copy(optimizer, gm):
    return {name: {k: v.clone() if torch.is_tensor(v) else v
                   for k, v in optimizer.state[p].items()}
            for name, p in gm.named_parameters() if p in optimizer.state}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(torch.as_tensor(a[name][key]), torch.as_tensor(b[name][key])), (
                name, key)


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_existing_state_and_next_steps_match_the_ungrown_model(factory):
    gm, optimizer, scheduler = _trained(factory)
    ref_gm, ref_opt, ref_sched = copy.deepcopy((gm, optimizer, scheduler))
    before = _state_copy(optimizer, gm)
    groups_before = len(optimizer.param_groups)

    grown = grow(gm, TARGETS)
    added = add_grown_params(optimizer, grown)

    assert len(optimizer.param_groups) == groups_before
    assert set(added) == {n for n, _ in grown.named_parameters()} - {
        n for n, _ in gm.named_parameters()}
    _assert_state_equal(_state_copy(optimizer, gm), before)
    assert all(p not in optimizer.state for n, p in grown.named_parameters() if n in added)
    # The first step after growth: gradients and state of existing params are those of the
    # ungrown model, so they move exactly alike (afterwards the new neurons are non-zero).
    _step(grown, optimizer, scheduler, 3)
    _step(ref_gm, ref_opt, ref_sched, 3)
    ref_params = dict(ref_gm.named_parameters())
    for name, p in gm.named_parameters():
        assert torch.equal(p, ref_params[name]), (factory, name)
    for name in added:  # new params trained too
        assert optimizer.state[grown.get_parameter(name)], name
    assert any(grown.get_parameter(n).abs().sum() > 0 for n in added if n.endswith("bias"))
    for seed in range(4, 8):  # the learning-rate schedule goes on as without growth
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        _step(grown, optimizer, scheduler, seed)
        _step(ref_gm, ref_opt, ref_sched, seed)


def test_new_params_join_the_parent_groups():
    gm, optimizer, _ = _trained("timm")
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    grown = grow(gm, TARGETS)
    add_grown_params(optimizer, grown)
    group_after = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for name, (parent, _idx, _role, kind) in fxgrow.passes.grow_lineage(grown).items():
        parent_param = gm.get_parameter(f"{parent}.{kind}")
        assert group_after[id(grown.get_parameter(name))] == group_of[id(parent_param)], name
    decay = {i: g["weight_decay"] for i, g in enumerate(optimizer.param_groups)}
    new_bias = grown.get_parameter("blocks.0.mlp.fc1_grow0_plus.bias")
    new_weight = grown.get_parameter("blocks.0.mlp.fc1_grow0_plus.weight")
    assert decay[group_after[id(new_bias)]] == 0.0
    assert decay[group_after[id(new_weight)]] == 0.05


def test_surgery_is_idempotent_and_nested_growth_works():
    gm, optimizer, scheduler = _trained("adamw")
    grown = grow(gm, TARGETS)
    first = add_grown_params(optimizer, grown)
    assert add_grown_params(optimizer, grown) == []
    _step(grown, optimizer, scheduler, 7)
    nested = grow(grown, {"blocks.0.mlp.fc1_grow0_plus": [0, 2], "blocks.0.mlp.fc1": [1]})
    second = add_grown_params(optimizer, nested)
    assert set(second).isdisjoint(first) and len(second) == 2 * 2 * 2  # 2 targets, pairs, w+b
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in nested.parameters())
    _step(nested, optimizer, scheduler, 8)


@pytest.mark.parametrize("factory", ["adamw", "sgd"])
def test_parent_init_copies_the_parent_rows_scaled_as_the_gradient(factory):
    gm, optimizer, _ = _trained(factory)
    grown = grow(gm, TARGETS)
    add_grown_params(optimizer, grown, init_state="parent")
    lineage = fxgrow.passes.grow_lineage(grown)
    for name, (parent, indices, role, kind) in lineage.items():
        parent_state = optimizer.state[gm.get_parameter(f"{parent}.{kind}")]
        state = optimizer.state[grown.get_parameter(name)]
        rows = list(indices)
        assert state.keys() == parent_state.keys()
        for key, value in parent_state.items():
            if key == "step":
                assert torch.equal(state[key], value)
            else:
                factor = 2.25 if key == "exp_avg_sq" else 1.5
                assert torch.equal(state[key], value[rows] * factor), (name, key)
    # The reason for the 1.5: at growth each new row's gradient is 1.5x the parent row's.
    x, y = _batch(11)
    grown.zero_grad(set_to_none=True)
    F.cross_entropy(grown(x), y).backward()
    parent_grad = gm.get_submodule("blocks.0.mlp.fc1").weight.grad[[1, 5, 9]]
    for role in ("plus", "minus"):
        new_grad = grown.get_submodule(f"blocks.0.mlp.fc1_grow0_{role}").weight.grad
        torch.testing.assert_close(new_grad, 1.5 * parent_grad, rtol=1e-5, atol=1e-7)


def test_global_clipping_is_the_setting_that_sees_new_gradients():
    gm, optimizer, scheduler = _trained("sgd")
    ref_gm, ref_opt, ref_sched = copy.deepcopy((gm, optimizer, scheduler))
    grown = grow(gm, TARGETS)
    add_grown_params(optimizer, grown)
    _step(grown, optimizer, scheduler, 5, clip=1e-3)
    _step(ref_gm, ref_opt, ref_sched, 5, clip=1e-3)
    weight, ref_weight = gm.get_parameter("blocks.0.mlp.fc1.weight"), ref_gm.get_parameter(
        "blocks.0.mlp.fc1.weight")
    assert not torch.equal(weight, ref_weight)


def test_errors_and_group_names_round_trip():
    gm = _model()
    head_only = torch.optim.AdamW(gm.get_submodule("head").parameters(), lr=1e-3)
    grown = grow(gm, {"blocks.0.mlp.fc1": [0]})
    with pytest.raises(FxgrowError, match="blocks.0.mlp.fc1"):
        add_grown_params(head_only, grown)
    with pytest.raises(FxgrowError, match="init_state"):
        add_grown_params(head_only, grown, init_state="copy")

    optimizer = FACTORIES["timm"](gm)
    add_grown_params(optimizer, grown)
    names = group_param_names(optimizer, grown)
    fresh = FACTORIES["timm"](grown)
    assert group_param_names(fresh, grown) != names  # the factory orders new params otherwise
    set_group_params(fresh, grown, names)
    assert group_param_names(fresh, grown) == names
    with pytest.raises(FxgrowError, match="lacks"):
        set_group_params(fresh, gm, names)
