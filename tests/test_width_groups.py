"""Width groups found from the graph alone, on hand-written graphs and a small timm ViT."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.passes import WidthGroup, reduce, width_groups


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.inner(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim=12, heads=3, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (lin(x).reshape(B, N, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        attn = (self.q_norm(q) @ k.transpose(-2, -1)).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def by_producer(groups: list[WidthGroup]) -> dict[str, WidthGroup]:
    return {t: g for g in groups for t in g.producers}


def test_residual_tied_linears_name_the_add_node():
    gm = fxgrow.trace(Residual())
    groups = by_producer(width_groups(gm, torch.randn(1, 4, 8)))
    add_nodes = [n.name for n in gm.graph.nodes if n.target is __import__("operator").add]
    assert not groups["inner"].reducible and not groups["fc2"].reducible
    assert f"'{add_nodes[0]}'" in groups["inner"].reason
    assert f"'{add_nodes[1]}'" in groups["fc2"].reason
    mlp = groups["fc1"]
    assert mlp.reducible and mlp.kind == "mlp_hidden"
    assert mlp.consumers == ("fc2",) and mlp.segment_sizes == (16,) and mlp.width == 16
    assert "mlp_hidden" in repr(mlp) and "reducible" in repr(mlp)
    with pytest.raises(fxgrow.ReduceError, match=f"{add_nodes[0]}"):
        reduce(gm, {"widths": {"inner": 4}}, torch.randn(1, 4, 8))


def test_separate_qkv_attention_groups():
    gm = fxgrow.trace(Attention())
    groups = by_producer(width_groups(gm, torch.randn(1, 5, 12)))
    qk, v = groups["q"], groups["v"]
    assert qk is groups["k"] and qk is not v
    assert qk.kind == "attn_head" and v.kind == "attn_head"
    assert qk.consumers == () and v.consumers == ("proj",)
    assert qk.segment_sizes == (4, 4, 4) and v.segment_sizes == (4, 4, 4)  # 3 heads of dim 4
    assert qk.reducible and v.reducible and not groups["proj"].reducible


def _head_rows(rows, heads, head_dim):
    return [sorted(r - h * head_dim for r in rows if h * head_dim <= r < (h + 1) * head_dim)
            for h in range(heads)]


def test_q_and_k_keep_the_same_channels_per_head():
    model = Attention()
    with torch.no_grad():  # make q and k prefer different channels on their own
        model.q.weight.copy_(torch.linspace(1, 2, 12).unsqueeze(1).expand(12, 12))
        model.k.weight.copy_(torch.linspace(2, 1, 12).unsqueeze(1).expand(12, 12) * 0.9)
    gm = fxgrow.trace(model)
    out = reduce(gm, {"head_dim": 2}, torch.randn(1, 5, 12))
    indices = fxgrow.history(out)[-1]["args"]["indices"]
    assert indices["q"] == indices["k"]
    q_heads = _head_rows(indices["q"], 3, 4)
    assert all(len(h) == 2 for h in q_heads)
    # per head, the summed q and k row norms decide: norms ~ (a_q + a_k) are equal across the
    # head here, so the lower index wins (ties broken by index)
    qn = (model.q.weight.norm(dim=1) ** 2 + model.k.weight.norm(dim=1) ** 2).detach()
    for h, kept in enumerate(q_heads):
        expected = sorted(sorted(range(4), key=lambda d: (-float(qn[h * 4 + d]), d))[:2])
        assert kept == expected
    out(torch.randn(2, 7, 12)).sum().backward()


def test_qk_norm_makes_heads_keep_the_same_channels():
    gm = fxgrow.trace(Attention(qk_norm=True))
    groups = by_producer(width_groups(gm, torch.randn(1, 5, 12)))
    assert groups["q"].segment_sizes == (4,)  # one segment: the norm weight spans every head
    out = reduce(gm, {"head_dim": 0.5}, torch.randn(1, 5, 12))
    heads = _head_rows(fxgrow.history(out)[-1]["args"]["indices"]["q"], 3, 4)
    assert heads[0] == heads[1] == heads[2]
    assert out.get_submodule("q_norm").normalized_shape == (2,)
    out(torch.randn(2, 5, 12)).sum().backward()


def test_fused_vit_groups_cover_q_k_and_v_of_every_head():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=4).eval()
    groups = width_groups(fxgrow.trace(model), torch.randn(1, 3, 32, 32))
    attn = [g for g in groups if g.kind == "attn_head"]
    mlp = [g for g in groups if g.kind == "mlp_hidden"]
    assert [g.producers for g in attn] == [("blocks.0.attn.qkv",), ("blocks.1.attn.qkv",)]
    assert all(g.consumers == (g.producers[0].replace("qkv", "proj"),) for g in attn)
    # q+k of each head form one segment (aligned), v of each head another: 2 * 3 of 16
    assert all(g.segment_sizes == (16,) * 6 and g.width == 16 for g in attn)
    assert [g.width for g in mlp] == [192, 192]
    tied = [g for g in groups if not g.reducible]
    assert {g.producers[0] for g in tied} == {"blocks.0.attn.proj", "blocks.0.mlp.fc2",
                                              "blocks.1.attn.proj", "blocks.1.mlp.fc2", "head"}
    assert "graph output" in next(g for g in tied if g.producers == ("head",)).reason


def test_concat_with_other_tensors_ties():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(10, 3)

        def forward(self, x):
            return self.b(torch.cat([F.gelu(self.a(x)), x], dim=-1))

    gm = fxgrow.trace(Cat())
    group = by_producer(width_groups(gm, torch.randn(2, 4)))["a"]
    assert not group.reducible and "concatenated" in group.reason and "'cat'" in group.reason


def test_synthesised_inputs_and_a_graph_that_does_not_run():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=3, num_classes=4).eval()
    assert len(width_groups(fxgrow.trace(model))) == 5  # image size taken from the model
    with pytest.raises(fxgrow.ReduceError, match="does not run"):
        width_groups(fxgrow.trace(Residual()), torch.randn(1, 4, 9))


@pytest.mark.parametrize("act", [nn.GELU(), timm.layers.activations.GELU(), nn.Hardswish()],
                         ids=["torch", "timm", "hardswish"])
def test_every_activation_of_the_op_table_passes_channels_through(act):
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), act, nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    group = by_producer(width_groups(fxgrow.trace(Mlp()), (torch.randn(2, 8),)))["fc1"]
    assert group.kind == "mlp_hidden" and group.reducible
    assert group.consumers == ("fc2",) and group.segment_sizes == (16,)
