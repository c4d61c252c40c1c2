import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxgrow
from fxgrow.errors import FxgrowError
from fxgrow.models import tiny_vit
from fxgrow.verify import (
    count_flops,
    count_params,
    cross_check_flops,
    params_by_module,
    torch_flops,
)
from helpers import vit_flops, vit_params

# ---------------------------------------------------------------- closed forms (from dims)


TINY = dict(patch_in=3 * 4 * 4, d=64, tokens=65, depth=4, qkv_out=192, attn_dim=64, hidden=256,
            classes=10)


def _attention_only_flops(report, prefix="blocks"):
    return sum(v for k, v in report.by_module.items()
               if k.startswith(prefix) and k.endswith("attn"))


# ---------------------------------------------------------------- attention and matmul handles


class _Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _ExplicitAttention(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape",
    [
        ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6)),  # L != S, E != Ev
        ((4, 9, 16), (4, 11, 16), (4, 11, 16)),  # no head dim
        ((1, 2, 4, 6), (1, 2, 4, 6), (1, 2, 4, 10)),
    ],
)
def test_attention_counts_both_products_fused_and_explicit(q_shape, k_shape, v_shape):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    *batch, length, e = q_shape
    s, ev = k_shape[-2], v_shape[-1]
    expected = math.prod(batch) * (length * s * e + length * s * ev)
    for module in (_Sdpa(), _ExplicitAttention()):
        gm = fxgrow.trace(module)
        report = count_flops(gm, (q, k, v))
        assert report.total == expected, type(module).__name__
        assert report.unsupported == {}
        assert torch_flops(gm, (q, k, v)) == expected


def test_flop_counter_mode_misses_cpu_fused_attention_and_torch_flops_adds_it():
    q = torch.randn(2, 3, 5, 8)
    with FlopCounterMode(display=False) as raw, torch.no_grad():
        F.scaled_dot_product_attention(q, q, q)
    assert raw.get_total_flops() == 0  # the gap torch_flops closes
    assert torch_flops(_Sdpa(), (q, q, q)) == 2 * 3 * (5 * 5 * 8) * 2


class _BroadcastMatmul(nn.Module):
    def forward(self, a, b):
        return a @ b


def test_matmul_with_a_broadcast_first_operand():
    a, b = torch.randn(5, 8), torch.randn(3, 8, 7)  # fvcore's default handle counts 5*8*7
    report = count_flops(fxgrow.trace(_BroadcastMatmul()), (a, b))
    assert report.total == 3 * 5 * 7 * 8
    assert torch_flops(_BroadcastMatmul(), (a, b)) == 3 * 5 * 7 * 8


# ---------------------------------------------------------------- a whole small ViT


@pytest.mark.parametrize("fused", [True, False])
def test_tiny_vit_matches_closed_form(fused):
    gm = tiny_vit(fused_attn=fused)
    assert ("scaled_dot_product_attention" in gm.code) == fused
    x = torch.randn(3, 3, 32, 32)
    report = count_flops(gm, x)
    assert report.total == vit_flops(batch=3, **TINY)
    assert report.unsupported == {}
    n, d = TINY["tokens"], TINY["d"]
    per_block_attention = 3 * (n * d * 3 * d + 2 * n * n * d + n * d * d)
    assert report.module("blocks.2.attn") == per_block_attention
    assert report.module("blocks.2.mlp") == 3 * 2 * n * d * TINY["hidden"]
    assert report.module("blocks") == sum(report.module(f"blocks.{i}") for i in range(4))
    assert _attention_only_flops(report) == 4 * per_block_attention


@pytest.mark.parametrize("fused", [True, False])
def test_cross_check_with_torch_flop_counter(fused):
    gm = tiny_vit(fused_attn=fused)
    x = torch.randn(2, 3, 32, 32)
    check = cross_check_flops(gm, x)
    assert check.agree, check
    n, d = TINY["tokens"], TINY["d"]
    norms = 2 * 9 * 5 * n * d  # 2 images, 2 norms per block, final norm: fvcore-only estimates
    assert check.fvcore_other == norms
    assert check.fvcore + check.fvcore_other == vit_flops(batch=2, **TINY)
    with FlopCounterMode(display=False) as raw, torch.no_grad():
        gm(x)
    attention_products = 2 * 4 * 2 * n * n * d
    # FlopCounterMode counts 2 flops per multiply-add; on the CPU it skips fused attention
    missed = attention_products if fused else 0
    assert raw.get_total_flops() == 2 * (check.torch - missed)


def test_graph_module_attribution_equals_fvcore_on_the_eager_model():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        num_classes=7,
    ).eval()
    gm = fxgrow.trace(model)
    x = torch.randn(2, 3, 32, 32)
    traced, eager = count_flops(gm, x), count_flops(model, x)
    assert traced.total == eager.total
    shared = set(traced.by_module) & set(eager.by_module)
    assert {"blocks.0.attn", "blocks.1.mlp", "head", "patch_embed"} <= shared
    assert {k: traced.by_module[k] for k in shared} == {k: eager.by_module[k] for k in shared}


# ---------------------------------------------------------------- graphs rewritten by passes


class _GrownLike(nn.Module):
    """The shapes a growth pass leaves behind: a functional linear on extra parameters,
    gelu, an index_add back into the selected output channels."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 12)
        self.extra = nn.Module()
        self.extra.weight = nn.Parameter(torch.randn(5, 16))
        self.extra.bias = nn.Parameter(torch.randn(5))
        self.register_buffer("index", torch.tensor([0, 2, 4, 6, 8]))

    def forward(self, x):
        out = self.fc(x)
        a = F.linear(x, self.extra.weight, self.extra.bias)
        return out.index_add(-1, self.index, F.gelu(a) + a)


def test_rewritten_graph_nodes_without_module_metadata_are_counted_and_attributed():
    gm = fxgrow.trace(_GrownLike())
    for node in gm.graph.nodes:  # as if a pass had created them
        node.meta.pop("nn_module_stack", None)
    x = torch.randn(3, 10, 16)
    report = count_flops(gm, x)
    assert report.unsupported == {}
    assert report.total == 3 * 10 * (16 * 12 + 16 * 5)
    assert report.module("extra") == 3 * 10 * 16 * 5  # the owner of the parameters it reads
    assert report.module("fc") == 3 * 10 * 16 * 12


def test_unknown_operators_are_reported_not_guessed():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumprod(x, 0) @ x.T

    report = count_flops(fxgrow.trace(Odd()), torch.randn(4, 6))
    assert report.unsupported == {"aten::cumprod": 1}
    assert report.total == 4 * 4 * 6
    assert "aten::cumprod" in report.table()


def test_count_flops_changes_nothing_and_fails_cleanly():
    gm = tiny_vit()
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in gm.named_modules()}
    count_flops(gm, torch.randn(1, 3, 32, 32))
    with pytest.raises(FxgrowError, match=r"inputs of shape \(1, 3, 31, 31\)"):
        count_flops(gm, torch.randn(1, 3, 31, 31))
    with pytest.raises(FxgrowError, match="tensor"):
        count_flops(gm, [])
    assert gm.code == code
    after = gm.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state) and state.keys() == after.keys()
    assert hooks == {
        n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in gm.named_modules()
    }


def test_table_lists_modules_with_flops():
    report = count_flops(tiny_vit(), torch.randn(1, 3, 32, 32))
    table = report.table(max_depth=2)
    assert f"{report.total / 1e9:.4f}" in table
    assert "blocks.3" in table and "blocks.3.attn" not in table
    assert "blocks.3.attn" in report.table(max_depth=3)


# ---------------------------------------------------------------- parameters


def test_count_params_tiny_vit_closed_form():
    gm = tiny_vit()
    expected = vit_params(**TINY)
    assert count_params(gm) == expected == sum(p.numel() for p in gm.parameters())
    by_module = params_by_module(gm)
    assert by_module[""] == expected
    assert by_module["blocks.1.mlp"] == 64 * 256 + 256 + 256 * 64 + 64
    assert by_module["blocks"] == sum(by_module[f"blocks.{i}"] for i in range(4))


def test_count_params_shared_and_frozen():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))
    model.append(model[0])  # tied: counted once
    model[1].weight.requires_grad_(False)
    assert count_params(model) == (4 * 3 + 3) + (3 * 4 + 4)
    assert count_params(model, trainable_only=True) == (4 * 3 + 3) + 4
    assert params_by_module(model)[""] == count_params(model)


# ---------------------------------------------------------------- DeiT-S at 224 (paper figures)

DEIT_S = dict(patch_in=3 * 16 * 16, d=384, tokens=197, depth=12, qkv_out=3 * 384, attn_dim=384,
              hidden=1536, classes=100)
DEIT_S_REDUCED = dict(DEIT_S, qkv_out=3 * 192, attn_dim=192, hidden=768)


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    gm = fxgrow.models.build("deit_small_patch16_224", num_classes=100)
    return gm, count_flops(gm, torch.randn(1, 3, 224, 224))


@pytest.mark.slow
def test_deit_s_params_and_flops(deit_s):
    gm, report = deit_s
    assert count_params(gm) == vit_params(**DEIT_S) == 21_704_164
    expected = vit_flops(**DEIT_S)
    assert report.total == expected
    assert abs(report.total - 4.61e9) / 4.61e9 < 0.01
    assert report.unsupported == {}
    without_attention = report.total - report.by_operator["scaled_dot_product_attention"]
    assert without_attention == expected - 12 * 2 * 197 * 197 * 384  # fvcore's 4.25G


@pytest.mark.slow
def test_deit_s_reduced_params_and_flops():
    gm = fxgrow.models.deit_small_reduced(num_classes=100)
    assert count_params(gm) == vit_params(**DEIT_S_REDUCED)
    assert abs(count_params(gm) - 11.07e6) / 11.07e6 < 0.001
    report = count_flops(gm, torch.randn(1, 3, 224, 224))
    assert report.total == vit_flops(**DEIT_S_REDUCED)
    assert abs(report.total - 2.33e9) / 2.33e9 < 0.02
    recipe = fxgrow.recipe(gm)
    assert recipe["base"]["name"] == "deit_small_patch16_224"
    assert recipe["base"]["kwargs"]["num_classes"] == 100
    assert [r["pass"] for r in recipe["history"]] == ["reduce"]
    loss = F.cross_entropy(gm(torch.randn(2, 3, 224, 224)), torch.tensor([3, 97]))
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in gm.parameters())


@pytest.mark.parametrize("mode,pairs", [("paper", 2), ("fused", 1)])
def test_grown_graph_counts_the_closed_form_growth_cost(mode, pairs):
    from fxgrow.passes import grow

    gm = tiny_vit()
    plan = {"blocks.1.mlp.fc1": list(range(0, 40, 2)), "blocks.2.attn.qkv": [3, 5, 7]}
    grown = grow(gm, plan, mode=mode)
    x = torch.randn(2, 3, 32, 32)
    before, after = count_flops(gm, x), count_flops(grown, x)
    tokens, d = 2 * TINY["tokens"], TINY["d"]  # both targets have fan-in d
    assert after.unsupported == {}
    assert after.total - before.total == pairs * tokens * d * (20 + 3)
    assert after.module("blocks.1") - before.module("blocks.1") == pairs * tokens * d * 20
    assert after.module("blocks.2.attn") - before.module("blocks.2.attn") == pairs * tokens * d * 3
    assert after.module("blocks.0") == before.module("blocks.0")
    assert count_params(grown) - count_params(gm) == pairs * (20 + 3) * (d + 1)
    assert cross_check_flops(grown, x).agree


FAMILIES = {
    "vit_small_patch16_224": {"depth": 1, "qk_norm": True, "img_size": 64},
    "deit3_small_patch16_224": {"depth": 1, "img_size": 64},
    "beit_base_patch16_224": {"depth": 1, "img_size": 64},
    "eva02_tiny_patch14_224": {"depth": 1, "img_size": 56},
    "cait_xxs24_224": {"depth": 1, "img_size": 64},
    "xcit_nano_12_p16_224": {"depth": 1, "img_size": 64},
    "levit_128s": {"img_size": 64},
    "pit_ti_224": {"img_size": 64},
    "swin_tiny_patch4_window7_224": {"depths": (1, 1, 1, 1), "embed_dim": 32},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_fully_counted_and_cross_checked(name):
    """Every operator of these timm families is either counted or zero by convention, fused
    and explicit attention count the same, and fvcore agrees with torch's counter."""
    kwargs = FAMILIES[name]
    side = kwargs.get("img_size", 224)
    x = torch.randn(1, 3, side, side)
    totals = []
    for fused in (True, False):
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
        switchable = [m for m in model.modules() if hasattr(m, "fused_attn")]
        if not fused and not switchable:
            break  # explicit attention only (LeViT): already counted
        for module in switchable:
            module.fused_attn = fused
        check = cross_check_flops(fxgrow.trace(model), x)
        assert check.report.unsupported == {}, (name, fused)
        assert check.agree, (name, fused, check)
        assert check.fvcore + check.fvcore_other == check.report.total
        totals.append(check.report.total)
    assert len(set(totals)) == 1


def test_count_flops_is_quiet(caplog):
    import logging
    import warnings

    gm = tiny_vit()
    gm.get_submodule("blocks.0.mlp.fc1").register_forward_hook(lambda m, i, o: o.cumprod(-1))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        report = count_flops(gm, torch.randn(1, 3, 32, 32))
    assert report.unsupported == {"aten::cumprod": 1}  # reported in the result, not logged
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class _SelfAttention(nn.Module):
    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_counts_alike_in_train_and_eval():
    # eval takes the fused aten::_native_multi_head_attention kernel
    batch, length, embed = 2, 10, 32
    model = _SelfAttention(embed, 4)
    x = torch.randn(batch, length, embed)
    # q, k, v and output projections, QK^T and AV: closed form in multiply-adds
    expected = batch * (4 * length * embed * embed + 2 * length * length * embed)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert count_flops(model, x).total == expected, mode
        check = cross_check_flops(model, x)
        assert check.agree and check.fvcore == check.torch == expected, (mode, check)


def test_a_disagreeing_cross_check_fails_loudly():
    from fxgrow.errors import FlopCountError

    # In eval a whole encoder layer runs as one fused kernel that torch's counter sees as 0.
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 10, 32)
    with pytest.raises(FlopCountError, match="torch.utils.flop_counter"):
        cross_check_flops(layer, x)
    check = cross_check_flops(layer, x, strict=False)
    assert not check.agree and check.fvcore != check.torch
