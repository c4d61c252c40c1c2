import copy
import json
import math
import operator
import random

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow import GrowthPlan, PlanError
from fxgrow.passes import grow, grow_lineage
from fxgrow.passes.grow import add_to_channels
from fxgrow.verify import check_equivalence

DIM, HEADS, MLP_RATIO, DEPTH, CLASSES, IMG, PATCH = 24, 2, 2.0, 2, 5, 16, 8
HIDDEN = int(DIM * MLP_RATIO)
TOKENS = (IMG // PATCH) ** 2 + 1  # patches + class token


def _vit(**overrides) -> nn.Module:
    kwargs = dict(pretrained=False, num_classes=CLASSES, img_size=IMG, patch_size=PATCH,
                  depth=DEPTH, embed_dim=DIM, num_heads=HEADS, mlp_ratio=MLP_RATIO)
    kwargs.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG)


def _snapshot(gm: fx.GraphModule) -> tuple:
    return (
        gm.code,
        str(gm.graph),
        {k: v.clone() for k, v in gm.state_dict().items()},
        {n: type(m) for n, m in gm.named_modules()},
        json.dumps(fxgrow.recipe(gm)),
        gm.training,
    )


def _assert_unchanged(gm, snapshot) -> None:
    code, graph, state, modules, recipe, training = snapshot
    assert gm.code == code and str(gm.graph) == graph
    now = gm.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: type(m) for n, m in gm.named_modules()} == modules
    assert json.dumps(fxgrow.recipe(gm)) == recipe and gm.training == training


def _all_grads(gm: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(gm(x).sum(), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def base():
    return fxgrow.trace(_vit())


def _full_plan(gm) -> GrowthPlan:
    sites = fxgrow.linear_sites(gm)
    g = torch.Generator().manual_seed(1)
    return GrowthPlan({
        t: torch.randperm(s[0].out_features, generator=g)[: max(1, s[0].out_features // 4)]
        for t, s in sites.items()
    })


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_grown_vit_is_exact_with_unchanged_gradients(base, mode):
    grown = grow(base, _full_plan(base), mode=mode)
    report = check_equivalence(base, grown, _x())
    assert report.ok, report.table(only_failures=True)
    grad_rows = [r for r in report.rows if r.kind == "grad"]
    assert {r.name for r in grad_rows} == {n for n, _ in base.named_parameters()}
    assert all(r.max_abs_diff == 0.0 for r in report.rows)
    value_rows = {r.name for r in report.rows if r.kind == "value"}
    assert value_rows == {n.name for n in base.graph.nodes}  # every original node matched
    x = _x()
    assert torch.equal(_bits(grown(x)), _bits(base(x)))


def test_pair_members_get_the_same_nonzero_gradient_of_one_and_a_half_g_x(base):
    plan = GrowthPlan({"blocks.0.mlp.fc1": [0, 7, 30], "blocks.1.attn.proj": [3]})
    grown = grow(base, plan)
    x = _x()
    grads = _all_grads(grown, x)
    for target, indices in plan.items():
        plus, minus = (f"{target}_grow0_{r}" for r in ("plus", "minus"))
        for kind in ("weight", "bias"):
            g_plus, g_minus = grads[f"{plus}.{kind}"], grads[f"{minus}.{kind}"]
            assert torch.equal(g_plus, g_minus) and g_plus.abs().sum() > 0
        # independent reference: at growth the new weight's gradient is 1.5 * g_S^T x
        stash = {}
        handles = [
            base.get_submodule(target).register_forward_hook(
                lambda m, i, o: stash.update(x=i[0], o=o) or o.retain_grad())
        ]
        out = base(x)
        out.sum().backward(inputs=[stash["o"]])
        handles[0].remove()
        g_s = stash["o"].grad[..., list(indices)].reshape(-1, len(indices)).double()
        inp = stash["x"].detach().reshape(-1, stash["x"].shape[-1]).double()
        expected = 1.5 * g_s.T @ inp
        torch.testing.assert_close(grads[f"{plus}.weight"].double(), expected, rtol=1e-5,
                                   atol=1e-6)


def test_signed_zero_outputs_stay_bitwise():
    # A linear whose output holds -0.0: O + 0.0 would make it +0.0.
    model = nn.Sequential(nn.Linear(1, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
        model[0].bias.copy_(torch.tensor([-0.0, -0.0, 0.5]))
    gm = fxgrow.trace(model)
    x = torch.tensor([[-0.0], [0.0], [-0.0], [1.5]])
    out = gm(x)
    assert torch.signbit(out[out == 0]).any()  # the case is really exercised
    assert not torch.equal(_bits(out + 0.0), _bits(out))
    for mode in ("paper", "fused"):
        grown = grow(gm, {"0": [0, 1, 2]}, mode=mode)
        assert torch.equal(_bits(grown(x)), _bits(out)), mode


def test_input_of_several_consumers_keeps_exact_gradients():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(x) * self.fc1(x) + x * 3.0

    model = Gate()
    gm = fxgrow.trace(model)
    grown = grow(gm, {"fc1": [0, 2, 5], "fc2": [1, 2]})
    grown = grow(grown, {"fc1": [5], "fc2_grow0_minus": [0, 1]})
    x = torch.randn(5, 8, requires_grad=True)
    ref_grad, = torch.autograd.grad(gm(x).sum(), [x])
    new_grad, = torch.autograd.grad(grown(x).sum(), [x])
    assert torch.equal(ref_grad, new_grad)
    assert check_equivalence(gm, grown, torch.randn(3, 8)).ok


def test_shared_module_grows_at_every_call_with_the_same_new_modules():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    gm = fxgrow.trace(Twice())
    grown = grow(gm, {"fc": [1, 4]})
    calls = [n.target for n in grown.graph.nodes if n.op == "call_module"]
    assert calls.count("fc_grow0_plus") == 2 and calls.count("fc_grow0_minus") == 2
    new_params = {n for n, _ in grown.named_parameters()} - {n for n, _ in gm.named_parameters()}
    assert new_params == {f"fc_grow0_{role}.{kind}" for role in ("plus", "minus")
                          for kind in ("weight", "bias")}
    report = check_equivalence(gm, grown, torch.randn(4, 6))
    assert report.ok, report.table(only_failures=True)


def test_functional_qkv_with_computed_bias_grows_from_the_cat_bias():
    model = timm.create_model(
        "beit_base_patch16_224", pretrained=False, num_classes=CLASSES, img_size=IMG,
        patch_size=PATCH, depth=1, embed_dim=DIM, num_heads=HEADS, mlp_ratio=MLP_RATIO,
    ).eval()
    with torch.no_grad():  # timm initialises these at zero; make the check meaningful
        model.blocks[0].attn.q_bias.normal_()
        model.blocks[0].attn.v_bias.normal_()
    gm = fxgrow.trace(model)
    target = "blocks.0.attn.qkv.weight"
    site = fxgrow.linear_sites(gm)[target][0]
    assert site.kind == "functional"
    indices = [1, DIM + 2, 2 * DIM + 3]  # one q, one k, one v channel
    grown = grow(gm, {target: indices}, scale=0.5)
    plus = grown.get_submodule("blocks.0.attn.qkv_grow0_plus")
    attn = model.blocks[0].attn
    bias = torch.cat([attn.q_bias, torch.zeros(DIM), attn.v_bias])
    assert torch.equal(plus.bias, 0.5 * bias[indices])
    assert torch.equal(plus.weight, 0.5 * attn.qkv.weight[indices])
    report = check_equivalence(gm, grown, _x())
    assert report.ok, report.table(only_failures=True)


def test_names_rounds_nested_growth_record_and_lineage(base):
    first = grow(base, {"blocks.0.mlp.fc1": [2, 9], "head": [0]}, scale=0.25)
    second = grow(first, {"blocks.0.mlp.fc1": [9], "blocks.0.mlp.fc1_grow0_plus": [1]},
                  mode="fused")
    new = {n for n, _ in second.named_modules()} - {n for n, _ in base.named_modules()}
    assert new == {
        "blocks.0.mlp.fc1_grow0_plus", "blocks.0.mlp.fc1_grow0_minus", "head_grow0_plus",
        "head_grow0_minus", "blocks.0.mlp.fc1_grow1_fused",
        "blocks.0.mlp.fc1_grow0_plus_grow0_fused",
    }
    records = fxgrow.history(second)
    assert [r["pass"] for r in records] == ["grow", "grow"]
    args = records[0]["args"]
    assert GrowthPlan.from_dict(args["plan"]) == GrowthPlan({"blocks.0.mlp.fc1": [2, 9],
                                                            "head": [0]})
    assert args["scale"] == 0.25 and args["mode"] == "paper"
    assert args["created"]["blocks.0.mlp.fc1_grow0_minus"] == {
        "target": "blocks.0.mlp.fc1", "indices": [2, 9], "role": "minus", "bias": True}
    json.dumps(records)
    lineage = grow_lineage(second)
    assert lineage["blocks.0.mlp.fc1_grow0_plus.weight"] == (
        "blocks.0.mlp.fc1", (2, 9), "plus", "weight")
    assert lineage["blocks.0.mlp.fc1_grow0_plus_grow0_fused.bias"] == (
        "blocks.0.mlp.fc1_grow0_plus", (1,), "fused", "bias")
    assert grow_lineage(records[1]).keys() < lineage.keys()
    assert set(lineage) == {n for n, _ in second.named_parameters()} - {
        n for n, _ in base.named_parameters()}
    # row i of a new weight is neuron indices[i] of its parent, scaled; minus is its negation
    parent = base.get_submodule("blocks.0.mlp.fc1")
    plus = second.get_submodule("blocks.0.mlp.fc1_grow0_plus")
    minus = second.get_submodule("blocks.0.mlp.fc1_grow0_minus")
    assert torch.equal(plus.weight[1], parent.weight[9] * 0.25)
    assert torch.equal(_bits(minus.weight), _bits(-plus.weight))
    fused = second.get_submodule("blocks.0.mlp.fc1_grow1_fused")
    assert not fused.weight.any() and not fused.bias.any()
    report = check_equivalence(base, second, _x())
    assert report.ok, report.table(only_failures=True)
    with pytest.raises(PlanError, match="'grow' pass record"):
        grow_lineage({"pass": "reduce"})


def test_growth_is_deterministic(base):
    plan = _full_plan(base)
    a, b = grow(base, plan), grow(base, plan)
    assert a.code == b.code and fxgrow.history(a) == fxgrow.history(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_input_is_unchanged_and_unchanged_parts_are_shared(base):
    before = _snapshot(base)
    grown = grow(base, _full_plan(base))
    grown = grow(grown, {"blocks.1.mlp.fc2": [0]})
    _assert_unchanged(base, before)
    assert grown.get_submodule("blocks.0.mlp.fc1") is base.get_submodule("blocks.0.mlp.fc1")
    assert grown.training == base.training


def test_parameter_delta_is_the_closed_form(base):
    plan = GrowthPlan({"blocks.0.attn.qkv": [0, 5, 40], "blocks.0.attn.proj": [1],
                       "blocks.1.mlp.fc1": list(range(10)), "blocks.1.mlp.fc2": [2, 3],
                       "head": [4]})
    # fan-ins from the model's definition, not from the graph
    closed = 3 * (DIM + 1) + 1 * (DIM + 1) + 10 * (DIM + 1) + 2 * (HIDDEN + 1) + 1 * (DIM + 1)
    n_base = sum(p.numel() for p in base.parameters())
    for mode, factor in (("paper", 2), ("fused", 1)):
        grown = grow(base, plan, mode=mode)
        assert sum(p.numel() for p in grown.parameters()) - n_base == factor * closed


def test_flop_delta_is_two_k_d_per_token(base):
    count_flops = pytest.importorskip("fxgrow.verify.flops").count_flops
    plan = GrowthPlan({"blocks.0.attn.qkv": [0, 5, 40], "blocks.1.mlp.fc2": [2, 3],
                       "head": [4]})
    batch = 2
    # per-token multiply-adds k*d; the head reads one (pooled) token per image
    per_pass = TOKENS * (3 * DIM + 2 * HIDDEN) + 1 * DIM
    x = _x(batch)
    f_base = count_flops(base, x).total
    for mode, factor in (("paper", 2), ("fused", 1)):
        grown = grow(base, plan, mode=mode)
        assert count_flops(grown, x).total - f_base == factor * batch * per_pass


@pytest.mark.parametrize(
    "plan, words",
    [
        ({"blocks.0.mlp.fcl": [0]}, ["unknown target", "'blocks.0.mlp.fc1'"]),
        ({"pos_embed": [0]}, ["'pos_embed'", "not a linear"]),
        ({"head": [CLASSES]}, ["'head'", f"index {CLASSES}", "out of range"]),
        ({"head": [-1]}, ["'head'", "negative"]),
        ({"head": [1, 1]}, ["'head'", "more than once"]),
        ({"head": [0.5]}, ["'head'", "not an integer"]),
        ({}, ["empty"]),
        (GrowthPlan({"head": [1]}, out_features={"head": CLASSES + 1}), ["another graph"]),
    ],
)
def test_bad_plans_raise_and_leave_the_input_unchanged(base, plan, words):
    before = _snapshot(base)
    with pytest.raises(PlanError) as info:
        grow(base, plan)
    assert all(w in str(info.value) for w in words), str(info.value)
    _assert_unchanged(base, before)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"mode": "wide"}, ["mode", "'wide'"]), ({"scale": math.nan}, ["scale", "nan"]),
     ({"scale": True}, ["scale"]), ({"scale": "0.2"}, ["scale"])],
)
def test_bad_arguments_raise_plan_error(base, kwargs, words):
    with pytest.raises(PlanError) as info:
        grow(base, {"head": [1]}, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_non_graph_module_is_rejected():
    with pytest.raises(PlanError, match="GraphModule"):
        grow(nn.Linear(2, 2), {"": [0]})


def test_pseudo_layer_structure(base):
    grown = grow(base, {"blocks.1.mlp.fc2": [3, 4]})
    nodes = {n.name: n for n in grown.graph.nodes}
    fc2 = nodes["blocks_1_mlp_fc2"]
    (out,) = fc2.users
    assert out.target is add_to_channels and out.args[0] is fc2
    assert out.args[1].target == "blocks.1.mlp.fc2_grow0_index"
    assert grown.get_buffer("blocks.1.mlp.fc2_grow0_index").tolist() == [3, 4]
    neg = out.args[2]
    assert neg.target is operator.neg and neg.args[0].target is operator.sub
    assert neg.args[0].args[0] == 0.0
    delta = neg.args[0].args[1]
    gelu, a = delta.args
    assert gelu.target is F.gelu and gelu.args[0] is a
    plus, minus = a.args
    assert (plus.target, minus.target) == ("blocks.1.mlp.fc2_grow0_plus",
                                           "blocks.1.mlp.fc2_grow0_minus")
    view = plus.args[0]
    assert minus.args[0] is view and view.target == "view_as"
    assert view.args == (fc2.args[0], fc2.args[0])  # the target's own input, no copy
    # every former user of fc2's output now reads the written-back value
    assert [u.name for u in out.users] == ["blocks_1_mlp_drop2"]


def test_backward_saves_only_the_index_of_the_write_back(base):
    # the write-back keeps no k-wide tensor for backward (index_add would)
    grown = grow(base, {"blocks.1.mlp.fc2": [3, 4]}, mode="fused")
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.dtype))
        return t

    x = _x()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base(x)
    before = list(shapes)
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grown(x)
    extra = list(shapes)
    for item in before:
        extra.remove(item)
    tokens = 2 * TOKENS
    # the new linear's input (a view of fc2's input) and weight, the GeLU input, the index
    assert sorted(extra, key=str) == sorted([
        ((tokens, HIDDEN), torch.float32), ((HIDDEN, 2), torch.float32),  # linear: x, W^T
        ((2, TOKENS, 2), torch.float32), ((2,), torch.int64)], key=str)


def test_fused_neuron_matches_the_pair_under_sgd_and_adam_with_twice_the_lr():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)).double()
    gm = fxgrow.trace(model)
    plan = {"0": [1, 4], "2": [0]}
    data = [(torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))
            for _ in range(5)]

    def train(grown, opt_cls, lr, wd, new_lr, new_wd):
        grown = copy.deepcopy(grown)
        new = set(grow_lineage(grown))
        named = dict(grown.named_parameters())
        old_params = [p for n, p in named.items() if n not in new]
        new_params = [p for n, p in named.items() if n in new]
        opt = opt_cls([{"params": old_params, "lr": lr, "weight_decay": wd},
                       {"params": new_params, "lr": new_lr, "weight_decay": new_wd}])
        for x, y in data:
            opt.zero_grad()
            F.mse_loss(grown(x), y).backward()
            opt.step()
        return grown(data[0][0])

    paper, fused = grow(gm, plan), grow(gm, plan, mode="fused")
    lr = 0.05
    for opt_cls, wd in ((torch.optim.SGD, 0.0), (torch.optim.Adam, 0.0), (torch.optim.AdamW, 0.1)):
        out_paper = train(paper, opt_cls, lr, wd, lr, wd)
        out_fused = train(fused, opt_cls, lr, wd, 2 * lr, wd / 2)
        torch.testing.assert_close(out_fused, out_paper, rtol=1e-9, atol=1e-10)
        assert not torch.allclose(out_paper, gm(data[0][0]))  # the new neurons did learn


def test_fused_gradient_equals_each_pair_members_gradient(base):
    plan = {"blocks.0.mlp.fc2": [1, 2, 3]}
    x = _x()
    g_paper = _all_grads(grow(base, plan), x)
    g_fused = _all_grads(grow(base, plan, mode="fused"), x)
    for kind in ("weight", "bias"):
        assert torch.equal(g_fused[f"blocks.0.mlp.fc2_grow0_fused.{kind}"],
                           g_paper[f"blocks.0.mlp.fc2_grow0_plus.{kind}"])


_VIT = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=4, depth=2)
FAMILIES = {
    "deit_small_patch16_224": _VIT,
    "beit_base_patch16_224": _VIT,
    "cait_xxs24_224": _VIT,
    "convit_tiny": _VIT,
    "eva02_tiny_patch14_224": dict(depth=2, img_size=28),
    "xcit_nano_12_p16_224": dict(depth=2, img_size=32),
    "swin_tiny_patch4_window7_224": dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=24,
                                         num_heads=(1, 1, 2, 2)),
    "levit_128s": dict(img_size=64),
    "pit_ti_224": dict(img_size=64),
    "maxvit_tiny_tf_224": dict(img_size=64),
    "mvitv2_tiny": dict(img_size=64),
}


def _random_plan(gm, rng: random.Random, fraction: float) -> GrowthPlan:
    sites = fxgrow.linear_sites(gm)
    targets = rng.sample(sorted(sites), max(1, round(fraction * len(sites))))
    plan = {}
    for t in targets:
        width = sites[t][0].out_features
        plan[t] = rng.sample(range(width), rng.randint(1, min(4, width)))
    return GrowthPlan(plan)


_SLOW_FAMILIES = {"maxvit_tiny_tf_224", "mvitv2_tiny"}  # 20-35 s each on a loaded machine


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_FAMILIES else n for n in FAMILIES
])
def test_family_random_rounds_are_exact(name):
    kwargs = FAMILIES[name]
    # float64: some of the relations checked below hold for gradients that are zero in exact
    # arithmetic (CaiT's talking-heads proj_l bias shifts every logit of a softmax row), so
    # what is compared there is rounding noise, far below the tolerance only in float64
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval().double()
    base = fxgrow.trace(model)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], dtype=torch.float64)
    rng = random.Random(name)
    grown = base
    rounds = rng.randint(1, 3) if name != "deit_small_patch16_224" else 3
    for r in range(rounds):
        # every linear in the first round; later rounds also pick new linears (nesting)
        plan = _random_plan(grown, rng, 1.0 if r == 0 else 0.5)
        grown = grow(grown, plan, mode="paper" if r == 0 else rng.choice(["paper", "fused"]))
        report = check_equivalence(base, grown, x)
        assert report.ok, f"round {r}:\n{report.table(only_failures=True)}"
        assert sum(row.kind == "grad" for row in report.rows) == len(list(base.parameters()))
    grads = _all_grads(grown, x)
    lineage = grow_lineage(grown)
    assert any(role == "plus" for _, _, role, _ in lineage.values())
    parent_weight = {n: n if n.endswith(".weight") else f"{n}.weight"
                     for n in fxgrow.linear_sites(grown)}
    checked = 0
    for param, (parent, indices, role, kind) in lineage.items():
        # Nothing trained between rounds, so every pair still sums to zero and a new neuron's
        # output reaches its parent's through GeLU'(0) + 1 = 1.5: its gradient is exactly 1.5
        # times the gradient of the parent's rows it grew from, on any CPU up to rounding
        # (whereas a gradient that is zero in exact arithmetic, such as an attention key
        # neuron's bias, may come out 0.0 or 1e-9 depending on the kernels).
        weight = parent_weight[parent]
        reference = weight if kind == "weight" else weight.removesuffix("weight") + "bias"
        if reference not in grads:  # a bias assembled in the graph (BEiT's q/v biases)
            continue
        scale = float(grads[weight].abs().max())
        torch.testing.assert_close(grads[param], 1.5 * grads[reference][list(indices)],
                                   rtol=1e-4, atol=1e-5 * scale + 1e-30, msg=param)
        checked += 1
        if role == "plus":
            assert torch.equal(grads[param], grads[param.replace("_plus.", "_minus.")]), param
    assert checked >= sum(kind == "weight" for *_, kind in lineage.values())
    assert sum(float(grads[p].abs().sum()) for p, e in lineage.items() if e[3] == "weight") > 0


@pytest.mark.slow
def test_paper_scale_reduced_deit_small_grows_to_19_4m_params_and_about_4_gflops():
    from fxgrow.models import deit_small_reduced
    from fxgrow.verify.flops import count_flops

    base = deit_small_reduced(num_classes=100).eval()
    sites = fxgrow.linear_sites(base)
    targets = [t for t in sites if t.startswith("blocks.")]
    assert len(targets) == 4 * 12
    # the same fraction of every block linear's neurons, sized so the new parameters total
    # 8.33M in the paper's two-neuron form (2k(d+1) per target)
    per_neuron = {t: 2 * (sites[t][0].in_features + 1) for t in targets}
    full = sum(per_neuron[t] * sites[t][0].out_features for t in targets)
    fraction = 8.33e6 / full
    plan = GrowthPlan({t: range(round(fraction * sites[t][0].out_features)) for t in targets})
    added = plan.num_params(base)
    assert abs(added - 8.33e6) < 0.01e6
    grown = grow(base, plan)
    n_base = sum(p.numel() for p in base.parameters())
    n_grown = sum(p.numel() for p in grown.parameters())
    assert n_grown - n_base == added
    assert round(n_base / 1e6, 2) == 11.07 and round(n_grown / 1e6, 1) == 19.4
    x = torch.randn(1, 3, 224, 224)
    f_base, f_grown = count_flops(base, x).total, count_flops(grown, x).total
    tokens = (224 // 16) ** 2 + 1
    assert f_grown - f_base == tokens * sum(2 * len(plan[t]) * sites[t][0].in_features
                                            for t in targets)
    assert 3.9e9 <= f_grown <= 4.0e9, f_grown
    with torch.no_grad():
        assert torch.equal(_bits(grown(x)), _bits(base(x)))


def test_add_to_channels_on_any_rank():
    index = torch.tensor([0, 2])
    for shape in ((3,), (2, 3), (2, 4, 3), (2, 2, 2, 3)):
        out = torch.randn(shape)
        rows = torch.randn(*shape[:-1], 2)
        expected = out.clone()
        expected[..., [0, 2]] += rows
        assert torch.equal(add_to_channels(out, index, rows), expected)


def test_gradient_layout_is_kept_through_the_write_back():
    # The parent's output is read through a permute, so its gradient arrives non-contiguous;
    # the bias gradient sums it in memory order and must see the same layout as before.
    class Talking(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

        def forward(self, a):
            return self.mix(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1) * a

    gm = fxgrow.trace(Talking())
    grown = grow(gm, {"mix": [0, 1, 3]})
    report = check_equivalence(gm, grown, torch.randn(3, 4, 9, 9) * 5)
    assert report.ok, report.table(only_failures=True)


def _small_vit(**kw):
    return dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, **kw)


# The families reduce supports (tests/test_reduce_families.py), at the same small sizes:
# (builder, image side, reduce spec). eva02 and xcit keep their head dim (RoPE tables and
# channel attention fix it); their MLPs are halved.
_HALF = dict(head_dim=0.5, mlp_hidden=0.5)
REDUCED_FAMILIES = {
    "vit": (lambda: timm.create_model("vit_small_patch16_224", **_small_vit()), 32, _HALF),
    "vit_qknorm": (lambda: timm.create_model("vit_small_patch16_224",
                                             **_small_vit(qk_norm=True)), 32, _HALF),
    "deit": (lambda: timm.create_model("deit_tiny_patch16_224", **_small_vit()), 32, _HALF),
    "deit3": (lambda: timm.create_model("deit3_small_patch16_224", **_small_vit()), 32, _HALF),
    "beit": (lambda: timm.create_model("beit_base_patch16_224", **_small_vit()), 32, _HALF),
    "cait": (lambda: timm.create_model("cait_xxs24_224", **_small_vit(depth_token_only=1)), 32,
             _HALF),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32,
                                       window_size=4, embed_dim=32, depths=(1, 1),
                                       num_heads=(2, 4)), 32, _HALF),
    "levit": (lambda: timm.create_model("levit_128s", img_size=64, embed_dim=(64, 96), key_dim=8,
                                        depth=(1, 1), num_heads=(2, 3)), 64, _HALF),
    "pit": (lambda: timm.create_model("pit_ti_224", img_size=64, depth=(1, 1, 1)), 64, _HALF),
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1), 28,
              dict(mlp_hidden=0.5)),
    "xcit": (lambda: timm.create_model("xcit_nano_12_p16_224", img_size=32, embed_dim=64,
                                       depth=1, num_heads=4, cls_attn_layers=1), 32,
             dict(mlp_hidden=0.5)),
}


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("name", list(REDUCED_FAMILIES))
def test_reduced_family_grows_exactly(name, fused_attn):
    from fxgrow.passes.reduce import reduce

    builder, side, spec = REDUCED_FAMILIES[name]
    torch.manual_seed(0)
    model = builder().eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    x = torch.randn(2, 3, side, side)
    base = reduce(fxgrow.trace(model), spec, x[:1])
    rng = random.Random(f"{name}{fused_attn}")
    grown = base
    for r in range(2):
        grown = grow(grown, _random_plan(grown, rng, 1.0 if r == 0 else 0.5),
                     mode=rng.choice(["paper", "fused"]))
    report = check_equivalence(base, grown, x)
    assert report.ok, report.table(only_failures=True)
    assert sum(row.kind == "grad" for row in report.rows) == len(list(base.parameters()))
    assert [r["pass"] for r in fxgrow.history(grown)][-2:] == ["grow", "grow"]
