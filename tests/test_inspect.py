"""Inspection of grown graphs: summary table, growth depths, diff, drawing."""

import copy

import pytest
import torch

import fxgrow
import fxgrow.models
from fxgrow.errors import FxgrowError
from fxgrow.inspection.diff import diff
from fxgrow.inspection.summary import growth, summary
from fxgrow.passes.grow import grow
from fxgrow.inspection.draw import draw_growth, growth_nodes

FC1 = "blocks.0.mlp.fc1"
QKV = "blocks.1.attn.qkv"
PLUS = "blocks.0.mlp.fc1_grow0_plus"
PLAN_1 = {FC1: [1, 2, 3], QKV: [0, 4]}
PLAN_2 = {FC1: [2, 7], PLUS: [0, 2]}  # rows 0 and 2 of PLUS copy neurons 1 and 3 of FC1
PLAN_3 = {"blocks.0.mlp.fc1_grow0_plus_grow0_fused": [0]}  # row 0 copies PLUS row 0: neuron 1


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = fxgrow.models.tiny_vit(depth=2, embed_dim=32, num_heads=2).eval()
    one = grow(base, PLAN_1)
    two = grow(one, PLAN_2, mode="fused")
    three = grow(two, PLAN_3)
    return base, one, two, three


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_growth_counts_equal_the_plans(models):
    base, one, two, three = models
    plans = [(PLAN_1, "paper"), (PLAN_2, "fused"), (PLAN_3, "paper")]
    fan_in = {t: s[0].in_features for t, s in fxgrow.linear_sites(three).items()}
    found = growth(three)
    assert set(found) == {t for plan, _ in plans for t in plan}
    for target, entry in found.items():
        per_round = [(plan[target], mode) for plan, mode in plans if target in plan]
        assert entry.neurons_grown == len({n for indices, _ in per_round for n in indices})
        assert entry.pseudo_layers == sum(len(indices) for indices, _ in per_round)
        copies = {"paper": 2, "fused": 1}
        assert entry.new_neurons == sum(copies[m] * len(i) for i, m in per_round)
        d = fan_in[target]
        assert entry.new_params == sum(copies[m] * len(i) * (d + 1) for i, m in per_round)
        for neuron in {n for indices, _ in per_round for n in indices}:
            assert entry.layers[neuron] == sum(neuron in i for i, _ in per_round)


def test_depth_of_nested_growth(models):
    *_, three = models
    found = growth(three)
    # Neuron 1: its pseudo-layer's plus copy (PLUS row 0) was grown, and that pseudo-layer's
    # fused copy again: 3 nested pseudo-layers. Neuron 3: PLUS row 2 grown once: 2. Neurons 2
    # and 7 carry only pseudo-layers of their own (neuron 2 two side by side): 1.
    assert found[FC1].depth == {1: 3, 2: 1, 3: 2, 7: 1}
    assert found[FC1].layers == {1: 1, 2: 2, 3: 1, 7: 1}
    assert found[PLUS].depth == {0: 2, 2: 1}
    assert found[PLUS].root == FC1
    assert found[QKV].depth == {0: 1, 4: 1}
    assert growth(models[0]) == {}


def test_summary_rows_agree_with_independent_counts(models):
    base, *_, three = models
    x = _x()
    for gm in (base, three):
        meta_before = [dict(n.meta) for n in gm.graph.nodes]
        code_before, rng_before = gm.code, torch.get_rng_state()
        table = summary(gm, x)
        assert gm.code == code_before and torch.equal(torch.get_rng_state(), rng_before)
        assert [dict(n.meta) for n in gm.graph.nodes] == meta_before
        assert table.total_params == sum(p.numel() for p in gm.parameters())
        assert table.total_flops == fxgrow.verify.count_flops(gm, x).total
        rows = {r["node"]: r for r in table.rows}
        assert [r["node"] for r in table.rows] == [n.name for n in gm.graph.nodes]
        fc1 = rows["blocks_0_mlp_fc1"]
        tokens = 2 * (32 // 4) ** 2 + 2  # batch 2, 64 patches + class token each
        assert fc1["shape"] == (2, 65, 128)
        assert fc1["params"] == 32 * 128 + 128
        assert fc1["flops"] == tokens * 32 * 128
    rows = {r["node"]: r for r in summary(three, x).rows}
    assert rows["blocks_0_mlp_fc1"]["grown"] == 4 and rows["blocks_0_mlp_fc1"]["depth"] == 3
    assert rows["blocks_0_mlp_fc1_grow0_plus"]["grown_from"] == f"{FC1} (plus)"
    assert rows["blocks_0_mlp_fc1_grow0_plus"]["params"] == 3 * 33
    text = str(summary(three, x))
    assert FC1 in text and "neurons by depth" in text and "1:2 2:1 3:1" in text


def test_growth_flops_are_2kd_per_token(models):
    base, one, *_ = models
    x = _x()
    tokens = 2 * 65
    expected = sum(2 * len(idx) * fxgrow.linear_sites(base)[t][0].in_features
                   for t, idx in PLAN_1.items()) * tokens
    assert summary(one, x).total_flops - summary(base, x).total_flops == expected


def test_diff_lists_exactly_the_new_modules(models):
    base, one, two, three = models
    for before, after in ((base, one), (one, two), (two, three), (base, three)):
        change = diff(before, after)
        records = fxgrow.history(after)[len(fxgrow.history(before)):]
        created = sorted(name for r in records for name in r["args"]["created"])
        assert change.modules_added == created
        assert not change.modules_removed and not change.nodes_removed
        assert not change.params_removed and not change.params_reshaped
        # "..._grow{r}_plus" and "..._grow{r}_minus" share the index buffer "..._grow{r}_index"
        index_buffers = {name.rsplit("_", 1)[0] + "_index" for name in created}
        assert set(change.params_added) == {
            f"{m}.{p}" for m in created for p in ("weight", "bias")
        } | index_buffers
        # Every new node is new to the graph, and the consumers of grown outputs changed.
        before_names = {n.name for n in before.graph.nodes}
        assert all(n not in before_names for n in change.nodes_added)
        assert change.nodes_changed
    assert diff(three, three).empty and str(diff(three, three)) == "no differences"
    assert "modules added (4)" in str(diff(base, one))


def test_diff_of_unrelated_edits():
    torch.manual_seed(0)
    a = fxgrow.models.tiny_vit(depth=1, embed_dim=32, num_heads=2, num_classes=10)
    b = fxgrow.models.tiny_vit(depth=1, embed_dim=32, num_heads=2, num_classes=7)
    change = diff(a, b)
    assert change.params_reshaped == {"head.weight": ((10, 32), (7, 32)), "head.bias": ((10,), (7,))}
    assert not change.nodes_added and not change.nodes_changed


def test_growth_nodes_cover_every_round_and_nesting(models):
    *_, three = models
    targets, grown = growth_nodes(three, FC1)
    assert [n.name for n in targets] == ["blocks_0_mlp_fc1"]
    modules = {n.target for n in grown if n.op == "call_module"}
    assert modules == {
        m for r in fxgrow.history(three) for m, info in r["args"]["created"].items()
        if info["target"] in (FC1, PLUS, "blocks.0.mlp.fc1_grow0_plus_grow0_fused")
    }
    # One index buffer per pseudo-layer: fc1 two rounds, PLUS one, PLUS's fused linear one.
    indices = sorted(n.target for n in grown if n.op == "get_attr")
    assert indices == [
        "blocks.0.mlp.fc1_grow0_index", "blocks.0.mlp.fc1_grow0_plus_grow0_fused_grow0_index",
        "blocks.0.mlp.fc1_grow0_plus_grow0_index", "blocks.0.mlp.fc1_grow1_index",
    ]
    assert all(n not in grown for n in three.graph.nodes if n.op == "placeholder")
    with pytest.raises(FxgrowError, match="has not been grown"):
        growth_nodes(three, "blocks.0.attn.proj")
    with pytest.raises(FxgrowError, match="not a linear target"):
        growth_nodes(three, "blocks.0.norm1")


def test_draw_growth_writes_a_png(models, tmp_path):
    *_, three = models
    before = copy.deepcopy(three.graph)
    path = tmp_path / "fc1.png"
    figure = draw_growth(three, FC1, path, radius=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 200
    assert figure.axes and "growth on blocks.0.mlp.fc1" in figure.axes[0].get_title()
    labels = {t.get_text() for t in figure.axes[0].texts}
    assert "mlp.fc1" in labels and "mlp.fc1_grow1_fused" in labels
    assert str(three.graph) == str(before)


@pytest.mark.parametrize("attention", [torch.nn.functional.scaled_dot_product_attention,
                                       torch.ops.aten.scaled_dot_product_attention.default],
                         ids=["functional", "aten"])
def test_summary_counts_attention_however_it_is_called(attention):
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    graph.output(graph.call_function(attention, (q, q, q)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    x = torch.randn(2, 3, 5, 4)  # batch 2, 3 heads, 5 tokens, head dim 4
    expected = 2 * 3 * (5 * 5 * 4 + 5 * 5 * 4)  # q k^T and the product with v
    assert summary(gm, x).total_flops == expected == fxgrow.verify.count_flops(gm, x).total
