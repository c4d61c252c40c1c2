"""The reduction pass: closed-form parameter counts, equality with directly built timm models,
identity at ratio 1, input never mutated, exact replay, and clear errors."""

import json
import operator

import pytest
import timm
import torch

import fxgrow
from fxgrow.passes import ReduceSpec, reduce, replay_reduce
from helpers import vit_params, vit_shape


def small_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", **args).eval()


@pytest.mark.slow
def test_deit_small_paper_base_closed_form_and_runs_at_another_batch():
    model = timm.create_model("deit_small_patch16_224", num_classes=100).eval()
    base = vit_params(
        **vit_shape(dim=384, depth=12, heads=6, head_dim=64, hidden=1536, classes=100))
    assert base == sum(p.numel() for p in model.parameters())
    gm = fxgrow.trace(model)
    reduced = reduce(gm, ReduceSpec(head_dim=0.5, mlp_hidden=0.5), torch.randn(1, 3, 224, 224))
    assert sum(p.numel() for p in reduced.parameters()) == vit_params(
        **vit_shape(dim=384, depth=12, heads=6, head_dim=32, hidden=768, classes=100))
    out = reduced(torch.randn(2, 3, 224, 224))
    out.sum().backward()
    assert out.shape == (2, 100)
    assert reduced.get_parameter("blocks.0.attn.qkv.weight").grad.shape == (576, 384)
    # absolute widths give the same model as the ratios
    again = reduce(gm, {"head_dim": 32, "mlp_hidden": 768})
    assert fxgrow.history(again)[-1]["args"] == fxgrow.history(reduced)[-1]["args"]


def test_mlp_only_reduction_equals_timm_model_built_with_smaller_mlp_ratio():
    model = small_vit(mlp_ratio=4.0)
    gm = fxgrow.trace(model)
    reduced = reduce(gm, {"mlp_hidden": 0.25, "keep": "first"})
    direct = small_vit(mlp_ratio=1.0)
    assert sum(p.numel() for p in reduced.parameters()) == sum(p.numel() for p in direct.parameters())
    # the direct model with the sliced original weights computes the same function
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.fc1." in name:
            tensor = tensor[:48]
        elif ".mlp.fc2.weight" in name:
            tensor = tensor[:, :48]
        state[name] = tensor
    direct.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(reduced(x), direct(x), rtol=0, atol=1e-6)


def test_ratio_one_is_bitwise_identity_and_shares_weights():
    gm = fxgrow.trace(small_vit())
    x = torch.randn(2, 3, 32, 32)
    same = reduce(gm, {"head_dim": 1.0, "mlp_hidden": 1.0})
    assert torch.equal(same(x), gm(x))
    name = "blocks.0.attn.qkv.weight"
    assert same.get_parameter(name) is gm.get_parameter(name)
    assert fxgrow.history(same)[-1] == {"pass": "reduce", "args": {"indices": {}, "scale": "follow"}}


def _snapshot(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, [n.format_node() for n in gm.graph.nodes]


def _assert_unchanged(gm, snap):
    code, state, nodes = snap
    assert gm.code == code and [n.format_node() for n in gm.graph.nodes] == nodes
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def test_input_is_unchanged_after_success_and_failure():
    model = small_vit(qk_norm=True)
    eager_state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxgrow.trace(model)
    snap = _snapshot(gm)
    reduced = reduce(gm, {"head_dim": 0.5, "mlp_hidden": 0.5})
    reduced(torch.randn(2, 3, 32, 32)).sum().backward()
    _assert_unchanged(gm, snap)
    assert gm.get_parameter("blocks.0.attn.qkv.weight").grad is None
    for bad in ({"head_dim": 0.3}, {"widths": {"blocks.0.attn.proj": 8}}, {"mlp_hidden": 500}):
        with pytest.raises(fxgrow.ReduceError):
            reduce(gm, bad)
        _assert_unchanged(gm, snap)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in eager_state.items())
    assert fxgrow.history(gm) == []


def test_errors_name_the_reason():
    gm = fxgrow.trace(small_vit())
    with pytest.raises(fxgrow.ReduceError, match=r"ratio 0.3 does not divide width 16"):
        reduce(gm, {"head_dim": 0.3})
    with pytest.raises(fxgrow.ReduceError, match=r"width 0"):
        reduce(gm, {"mlp_hidden": 0})
    last_add = [n.name for n in gm.graph.nodes if n.target is operator.add][-1]
    with pytest.raises(fxgrow.ReduceError, match=rf"'blocks\.1\.mlp\.fc2'.*residual.*'{last_add}'"):
        reduce(gm, {"widths": {"blocks.1.mlp.fc2": 24}})
    with pytest.raises(fxgrow.ReduceError, match="not the producer of any width group"):
        reduce(gm, {"widths": {"blocks.0.mlp": 24}})
    with pytest.raises(fxgrow.ReduceError, match="unknown reduce spec keys"):
        reduce(gm, {"head_dims": 0.5})
    with pytest.raises(fxgrow.ReduceError, match="exceeds the current width"):
        reduce(gm, {"head_dim": 32})
    with pytest.raises(fxgrow.ReduceError, match="excludes"):
        reduce(gm, {"head_dim": 0.5, "indices": {}})


def test_explicit_widths_per_group_and_keep_first():
    gm = fxgrow.trace(small_vit())
    out = reduce(gm, {"widths": {"blocks.1.mlp.fc1": 40, "blocks.0.attn.qkv": 4}, "keep": "first"})
    width = lambda target: out.get_submodule(target).out_features
    assert width("blocks.1.mlp.fc1") == 40 and width("blocks.0.mlp.fc1") == 192
    assert width("blocks.0.attn.qkv") == 3 * 3 * 4 and width("blocks.1.attn.qkv") == 144
    rows = fxgrow.history(out)[-1]["args"]["indices"]["blocks.0.attn.qkv"]
    assert rows == [s * 48 + h * 16 + d for s in range(3) for h in range(3) for d in range(4)]
    assert "reshape(getitem_5, getitem_6, 3, 3, 4)" in out.code
    out(torch.randn(2, 3, 32, 32)).sum().backward()


def test_replay_on_different_weights_is_exact():
    a_model, b_model = small_vit(), small_vit()
    assert not torch.equal(a_model.blocks[0].mlp.fc1.weight, b_model.blocks[0].mlp.fc1.weight)
    a = reduce(fxgrow.trace(a_model), {"head_dim": 0.5, "mlp_hidden": 0.5})
    record = fxgrow.history(a)[-1]
    assert record["pass"] == "reduce"
    args = json.loads(json.dumps(record["args"]))  # what a checkpoint stores
    b = replay_reduce(fxgrow.trace(b_model), args)
    assert fxgrow.history(b)[-1]["args"] == args
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    kept = args["indices"]["blocks.0.mlp.fc1"]
    assert torch.equal(b.get_parameter("blocks.0.mlp.fc1.weight"), b_model.blocks[0].mlp.fc1.weight[kept])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    # the replay registry of fxgrow.load knows the pass, and keywords work too
    assert "reduce" in fxgrow.passes.registered_passes()
    c = reduce(fxgrow.trace(a_model), **args)
    assert torch.equal(c(x), a(x))
    d = fxgrow.passes.replay_history(fxgrow.trace(a_model), fxgrow.history(a))
    assert torch.equal(d(x), a(x))


def test_norm_keeps_the_largest_rows():
    model = small_vit(depth=1)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[5].mul_(100)
        model.blocks[0].mlp.fc1.weight[0].mul_(0)
    out = reduce(fxgrow.trace(model), {"mlp_hidden": 0.5})
    kept = fxgrow.history(out)[-1]["args"]["indices"]["blocks.0.mlp.fc1"]
    norms = model.blocks[0].mlp.fc1.weight.norm(dim=1).detach()
    expected = sorted(sorted(range(192), key=lambda i: (-float(norms[i]), i))[:96])
    assert kept == expected and 5 in kept and 0 not in kept


def _scale_constants(gm):
    return [a for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "mul"
            for a in n.args if isinstance(a, float)]


def test_scale_follows_or_is_kept_in_plain_attention():
    model = small_vit(depth=1)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    gm = fxgrow.trace(model)
    assert _scale_constants(gm) == [16 ** -0.5]
    assert _scale_constants(reduce(gm, {"head_dim": 0.5})) == [8 ** -0.5]
    assert _scale_constants(reduce(gm, {"head_dim": 0.5, "scale": "keep"})) == [16 ** -0.5]


def test_beit_cat_bias_is_sliced_per_operand():
    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=3, num_classes=5).eval()
    gm = fxgrow.trace(model)
    out = reduce(gm, {"head_dim": 0.5, "keep": "first"})
    attn = model.blocks[0].attn
    q_rows = [h * 16 + d for h in range(3) for d in range(8)]
    assert torch.equal(out.get_parameter("blocks.0.attn.q_bias"), attn.q_bias[q_rows])
    assert torch.equal(out.get_parameter("blocks.0.attn.v_bias"), attn.v_bias[q_rows])
    assert out.get_buffer("blocks.0.attn.k_bias").shape == (24,)
    out(torch.randn(2, 3, 32, 32)).sum().backward()


class SplitQKV(torch.nn.Module):
    """Fused qkv split by size, functional qk-norm on the head dim, sdpa with a given scale."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.qn_w, self.qn_b = torch.nn.Parameter(torch.rand(dim // heads)), torch.nn.Parameter(torch.rand(dim // heads))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.reshape(B, N, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        q = torch.nn.functional.layer_norm(q, (C // self.heads,), self.qn_w, self.qn_b)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
        return x + self.proj(a.transpose(1, 2).reshape(B, N, C))


def test_split_sizes_functional_norm_and_sdpa_scale_are_rewritten():
    model = SplitQKV()
    gm = fxgrow.trace(model)
    out = reduce(gm, {"head_dim": 0.5, "keep": "first"}, torch.randn(1, 3, 16))
    nodes = {n.name: n for n in out.graph.nodes}
    assert nodes["split"].args[1] == [8, 8, 8]
    assert nodes["layer_norm"].args[1] == (2,)
    assert nodes["scaled_dot_product_attention"].kwargs["scale"] == 2 ** -0.5
    assert torch.equal(out.get_parameter("qn_w"), model.qn_w[:2])
    removed = 16 * 24 + 24 + 16 * 8 + 2 + 2  # qkv rows, qkv bias, proj columns, norm weight+bias
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    # keep="first" on every head: the function equals one computed by hand from sliced weights
    x = torch.randn(2, 5, 16)
    rows = [s * 16 + h * 4 + d for s in range(3) for h in range(4) for d in range(2)]
    B, N, C = x.shape
    q, k, v = torch.nn.functional.linear(x, model.qkv.weight[rows], model.qkv.bias[rows]).split(8, dim=-1)
    q, k, v = (t.reshape(B, N, 4, 2).transpose(1, 2) for t in (q, k, v))
    q = torch.nn.functional.layer_norm(q, (2,), model.qn_w[:2], model.qn_b[:2])
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=2 ** -0.5)
    cols = [h * 4 + d for h in range(4) for d in range(2)]
    expected = x + torch.nn.functional.linear(a.transpose(1, 2).reshape(B, N, 8), model.proj.weight[:, cols], model.proj.bias)
    torch.testing.assert_close(out(x), expected)
    out(x).sum().backward()
